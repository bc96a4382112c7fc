"""What users do with finished runs: evaluate a checkpoint, plot a sweep, watch the eval video and the
scalars in a real TensorBoard server. The runs are made once per module (three tiny Pendulum runs:
two seeds of one setting, one of another)."""

import importlib.util
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, TINY, train_run

RUN = [*TINY, "env=pendulum", "agent=sac", "threads=1", "trainer.total_steps=200", "trainer.eval_every=100",
       "trainer.eval_episodes=2", "trainer.log_eval_video=true"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"latentrl_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in [("a_s0", ["seed=0"]), ("a_s1", ["seed=1"]), ("b_s0", ["seed=0", "agent.lr=1e-3"])]:
        train_run([*RUN, *extra], root / name)
        made[name] = root / name
    return root, made


def results(run):
    return json.loads((run / "results.json").read_text())


def test_evaluate_checkpoint_reproduces_the_final_eval(runs, tmp_path, capsys):
    _, made = runs
    evaluate = load_script("evaluate")
    run = made["a_s0"]
    out = tmp_path / "eval.json"
    # same seed and episode count as the trainer's final evaluation -> the same episodes, the same return
    assert evaluate.main([str(run / "checkpoints" / "last.pt"), "--episodes", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["returns"] == pytest.approx(results(run)["returns"], rel=1e-6)
    assert report["return_mean"] == pytest.approx(results(run)["eval/return_mean"], rel=1e-6)
    assert report["return_std"] == pytest.approx(float(np.std(report["returns"])))
    assert report["step"] == 200 and "±" in capsys.readouterr().out


def test_evaluate_run_dir_writes_video(runs, tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    _, made = runs
    evaluate = load_script("evaluate")
    video = tmp_path / "episode.mp4"
    assert evaluate.main([str(made["a_s1"]), "--episodes", "1", "--seed", "7", "--video", str(video),
                          "--out", str(tmp_path / "e.json")]) == 0
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(video))
    assert frames == 200  # one frame per step of a Pendulum episode


def test_evaluate_refuses_a_path_that_is_not_a_run(runs, tmp_path, capsys):
    _, made = runs
    evaluate = load_script("evaluate")
    for bad in [tmp_path, tmp_path / "missing", made["a_s0"] / "results.json"]:
        assert evaluate.main([str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err


def test_plot_groups_seeds_and_tables_their_results(runs, tmp_path):
    root, made = runs
    plot = load_script("plot")
    png, md = tmp_path / "curves.png", tmp_path / "results.md"
    assert plot.main([str(root), "--out", str(png), "--table", str(md)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in md.read_text().splitlines()
             if line.startswith("| agent."))}
    # the legend/table name only what differs between groups: the learning rate
    assert set(rows) == {"agent.lr=0.0003", "agent.lr=0.001"}
    a = [results(made["a_s0"])["eval/return_mean"], results(made["a_s1"])["eval/return_mean"]]
    b = results(made["b_s0"])["eval/return_mean"]
    assert rows["agent.lr=0.0003"][0] == f"{np.mean(a):.1f} ± {np.std(a):.1f}"
    assert rows["agent.lr=0.0003"][1].startswith("2 (0, 1)")
    assert rows["agent.lr=0.001"][0] == f"{b:.1f} ± 0.0"


def config_only_runs(tmp_path, configs: dict) -> list:
    """Run directories holding only a config.yaml each (enough for plot.group_runs)."""
    runs = []
    for name, cfg in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(cfg))
        runs.append(tmp_path / name)
    return runs


def test_plot_labels_tell_apart_groups_that_differ_only_in_keys_of_one_agent(tmp_path):
    """goal_hrl with planning on and off beside sac: the planning key exists only in goal_hrl's
    configs, yet the two goal_hrl groups must not share a label (or a table column)."""
    plot = load_script("plot")
    configs = {"hrl_on": {"agent": {"_target_": "x.GoalHRL", "planning": {"candidates": 8}}},
               "hrl_off": {"agent": {"_target_": "x.GoalHRL", "planning": {"candidates": 0}}},
               "sac": {"agent": {"_target_": "x.SAC", "her": {"relabel_fraction": 0.8}}}}
    groups, _ = plot.group_runs(config_only_runs(tmp_path, configs), set())
    assert sorted(g["label"] for g in groups) == ["agent=GoalHRL, agent.planning.candidates=0",
                                                   "agent=GoalHRL, agent.planning.candidates=8", "agent=SAC"]
    assert plot.fmt(0.7333) == "0.73" and plot.fmt(-183.26) == "-183.3" and plot.fmt(4.21, -183.0) == "4.2"


def test_plot_labels_name_a_key_added_to_the_agent_after_older_runs(tmp_path):
    """A run made before agent.low.own_encoder existed and one that sets it differ in that key alone
    (besides one both have): the label must name it, not only the shared key."""
    plot = load_script("plot")
    configs = {"old": {"agent": {"_target_": "x.GoalHRL", "planning": {"candidates": 8}}},
               "new": {"agent": {"_target_": "x.GoalHRL", "planning": {"candidates": 0}, "low": {"own_encoder": True}}}}
    groups, _ = plot.group_runs(config_only_runs(tmp_path, configs), set())
    assert sorted(g["label"] for g in groups) == ["agent.low.own_encoder=None, agent.planning.candidates=8",
                                                   "agent.low.own_encoder=True, agent.planning.candidates=0"]


def test_eval_video_is_an_animated_gif_in_tensorboard(runs):
    _, made = runs
    acc = EventAccumulator(str(made["a_s0"] / "tb"), size_guidance={"images": 0})
    acc.Reload()
    events = acc.Images("eval/video")
    assert [e.step for e in events] == [100, 200]
    from PIL import Image

    gif = events[-1].encoded_image_string
    assert gif.startswith(b"GIF8")
    assert Image.open(io.BytesIO(gif)).n_frames > 1


def test_tensorboard_server_serves_the_run_scalars(runs):
    _, made = runs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data/plugin/scalars"
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(made["a_s0"] / "tb"),
                             "--host", "127.0.0.1", "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        tags, deadline = {}, time.time() + 60
        while "eval/return_mean" not in tags.get(".", {}) and time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                tags = json.load(urllib.request.urlopen(f"{url}/tags", timeout=2))
            except OSError:  # not listening yet
                time.sleep(0.5)
        assert "eval/return_mean" in tags.get(".", {}), f"no eval scalars served after 60 s: {tags}"
        series = json.load(urllib.request.urlopen(f"{url}/scalars?run=.&tag=eval/return_mean", timeout=5))
        assert [step for _, step, _ in series] == [100, 200]
        assert series[-1][2] == pytest.approx(results(made["a_s0"])["eval/return_mean"], rel=1e-5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_bins_average_each_runs_values_per_step_bin_and_mark_its_onset_and_gate(tmp_path, capsys):
    """scripts/bins.py: a value logged at step 2000 closes the 0-2k bin, each bin is the mean of its values,
    the first bin above the onset is bold per run, and the goal-phase gate is read from goal/phase_open."""
    bins = load_script("bins")
    rows = {"early": [(1000, -50.0), (2000, -30.0), (3000, 10.0), (4000, 30.0), (5000, 70.0)],
            "late": [(1000, -60.0), (2000, -40.0), (3000, -20.0), (4000, -10.0), (5000, 5.0)]}
    runs = config_only_runs(tmp_path, {name: {"agent": {"_target_": "x.GoalHRL"}, "seed": i}
                                       for i, name in enumerate(rows)})
    for run, (name, values) in zip(runs, rows.items()):
        (run / "tb").mkdir()
        lines = [{"step": s, "train/episode_return": v, "goal/phase_open": float(name == "late" and s >= 4000)}
                 for s, v in values]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert bins.binned({1000: -50.0, 2000: -30.0, 3000: 10.0}, 2000) == {0: -40.0, 2000: 10.0}
    out = tmp_path / "bins.md"
    assert bins.main([str(tmp_path), "--bin", "2000", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| GoalHRL seed 0 | -40.0 | **20.0** | 70.0 |" in table
    assert "| GoalHRL seed 1 (goals on from 4k) | -50.0 | -15.0 | **5.00** |" in table
    assert bins.main([str(tmp_path), "--bin", "0"]) == 2 and "--bin must be >= 1" in capsys.readouterr().err


def test_bins_labels_name_the_differing_key_and_a_branch_whose_goals_were_already_on(tmp_path):
    bins = load_script("bins")
    configs = {f"mult{m}": {"agent": {"_target_": "x.GoalHRL", "high": {"scale_motion_mult": m}}, "seed": 0,
                            "branch_from": "outputs/src"} for m in (1.0, 2.0)}
    runs = config_only_runs(tmp_path, configs)
    for run in runs:
        (run / "tb").mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "goal/phase_open": 1.0}) + "\n"
                                                   for s in (25500, 26000)))
    labels = sorted(bins.run_labels(runs).values())
    assert labels == [f"GoalHRL seed 0, agent.high.scale_motion_mult={m} (goals already on at its first log, 25.5k)"
                      for m in (1, 2)]


def test_plot_groups_branches_of_any_source_apart_from_runs_from_scratch(tmp_path):
    plot = load_script("plot")
    runs = config_only_runs(tmp_path, {
        name: {"seed": seed, "branch_from": source, "agent": {"high": {"scale_motion_mult": mult}}}
        for name, seed, source, mult in [("scratch0", 0, None, 2.0), ("scratch1", 1, None, 2.0),
                                         ("branch0", 0, "outputs/a", 2.0), ("branch1", 1, "outputs/b", 2.0),
                                         ("branch0_half", 0, "outputs/a", 1.0)]})
    groups, _ = plot.group_runs(runs, plot.IGNORED_KEYS)
    members = sorted(sorted(r.name for r in g["runs"]) for g in groups)
    assert members == [["branch0", "branch1"], ["branch0_half"], ["scratch0", "scratch1"]]
