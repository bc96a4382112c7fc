"""A run never fails silently and never loses its last good state (issue 11): divergence stops the run
with its last finite checkpoint kept, SIGTERM is honoured inside a long update, outputs are strict JSON.

The test agents below (SAC subclasses) are also imported by train.py subprocesses: PYTHONPATH=tests."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, train_run
from latentrl.agents.sac import SAC
from latentrl.checkpoint import UpdateInterrupted, nonfinite
from latentrl.config import DivergenceError
from latentrl.logging import strict_json

EXACT = ["env=pendulum", "trainer.warmup_steps=100", "trainer.eval_every=0", "trainer.eval_episodes=1",
         "trainer.log_every=50", "trainer.progress=false"]


class PoisonedSAC(SAC):
    """SAC whose parameters turn NaN after the update at env step $POISON_STEP (unset: never).
    Its metrics stay finite, so only the checkpoint's parameter check can catch it."""

    def update(self, step):
        metrics = super().update(step)
        if step == int(os.environ.get("POISON_STEP", "-1")):
            with torch.no_grad():
                next(self.parameters()).fill_(float("nan"))
        return metrics


class SlowRetrainSAC(SAC):
    """SAC with a 60 s 'model retrain' at env step $RETRAIN_STEP when $RETRAIN_MARKER is set (a file it
    creates on entry). The retrain changes nothing and polls should_stop(); on a stop it raises
    UpdateInterrupted, so the resumed run repeats the whole update: exact."""

    def update(self, step):
        marker = os.environ.get("RETRAIN_MARKER")
        if marker and step == int(os.environ["RETRAIN_STEP"]):
            open(marker, "w").close()
            deadline = time.time() + 60
            while time.time() < deadline:
                if self.should_stop():
                    raise UpdateInterrupted
                time.sleep(0.05)
        return super().update(step)


def strict_load(text: str):
    """json.loads that refuses NaN/Infinity tokens, as jq or a browser would."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def assert_strict_outputs(run_dir):
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        strict_load(line)
    if (run_dir / "results.json").exists():
        strict_load((run_dir / "results.json").read_text())


def load_ckpt(path):
    return torch.load(path, weights_only=True)


def env_with(**extra):
    path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def wait_for_marker(proc, marker, timeout_s, message):
    """Block until the training subprocess creates `marker` (it is inside SlowRetrainSAC's retrain)."""
    deadline = time.time() + timeout_s
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, message
        time.sleep(0.1)


def test_strict_json_writes_null_for_non_finite():
    assert strict_load(strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": 2})) == {"a": None,
                                                                                              "b": [1.0, None], "c": 2}


def test_nonfinite_names_bad_tensors_only():
    tree = {"modules": {"w": torch.ones(3), "b": torch.tensor([1.0, float("inf")])}, "steps": torch.tensor([3]),
            "opt": [{"exp_avg": torch.tensor(float("nan"))}]}
    assert sorted(nonfinite(tree)) == ["modules.b", "opt.0.exp_avg"]
    assert nonfinite({"w": torch.zeros(2)}) == []


def test_huge_learning_rate_stops_with_one_line_and_keeps_finite_checkpoint(tmp_path):
    """The issue's own reproduction: agent.lr=1e4 turns the losses NaN within the first updates."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "env=pendulum", "agent=sac", "agent.lr=1e4", "threads=1",
                           *EXACT, "trainer.total_steps=3000", "trainer.checkpoint_every=100",
                           f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "training diverged at step" in errors[0] and "loss/critic" in errors[0] and "agent.lr=10000" in errors[0]
    ckpt = load_ckpt(run_dir / "checkpoints" / "last.pt")
    assert ckpt["counters"]["step"] == 100 and nonfinite(ckpt["agent"]) == []
    assert not (run_dir / "results.json").exists()
    assert_strict_outputs(run_dir)
    assert any(v is None for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
               for v in strict_load(ln).values()), "the non-finite window is logged (as null)"


def test_nonfinite_parameters_never_overwrite_last_checkpoint_and_run_resumes_exactly(tmp_path, monkeypatch):
    target = f"agent._target_={__name__}.PoisonedSAC"
    common = [*EXACT, "agent=sac", target, "trainer.checkpoint_every=100"]
    train_run([*common, "trainer.total_steps=400"], tmp_path / "straight")
    assert_strict_outputs(tmp_path / "straight")

    monkeypatch.setenv("POISON_STEP", "300")
    with pytest.raises(DivergenceError, match=r"diverged at step 300: non-finite parameter .*last finite checkpoint "
                                              r"\(step 200\)"):
        train_run([*common, "trainer.total_steps=400"], tmp_path / "split")
    ckpts = tmp_path / "split" / "checkpoints"
    assert load_ckpt(ckpts / "last.pt")["counters"]["step"] == 200
    assert load_ckpt(ckpts / "prev.pt")["counters"]["step"] == 100, "the previous good checkpoint is kept too"
    assert nonfinite(load_ckpt(ckpts / "last.pt")["agent"]) == []
    assert not (tmp_path / "split" / "results.json").exists()
    assert_strict_outputs(tmp_path / "split")

    monkeypatch.delenv("POISON_STEP")
    train_run([f"resume={tmp_path / 'split'}", "trainer.total_steps=400"], tmp_path / "unused")
    straight, split = load_ckpt(tmp_path / "straight/checkpoints/last.pt"), load_ckpt(ckpts / "last.pt")
    for key, value in straight["agent"]["modules"].items():
        assert torch.equal(value, split["agent"]["modules"][key]), key
    assert strict_load((tmp_path / "split" / "results.json").read_text())["step"] == 400


def test_unreadable_last_checkpoint_falls_back_to_prev(tmp_path):
    run_dir = tmp_path / "run"
    train_run(["env=pendulum", "agent=sac", *TINY, "trainer.checkpoint_every=100"], run_dir)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"truncated")
    train_run([f"resume={run_dir}", "trainer.total_steps=350"], tmp_path / "unused")
    assert strict_load((run_dir / "results.json").read_text())["step"] == 350


def test_sigterm_inside_a_long_update_exits_promptly_and_resumes_exactly(tmp_path):
    target = f"agent._target_={__name__}.SlowRetrainSAC"
    common = [*EXACT, "agent=sac", target, "trainer.checkpoint_every=0"]
    run_dir, marker = tmp_path / "run", tmp_path / "in_retrain"
    proc = subprocess.Popen([sys.executable, "train.py", *common, "threads=1", "trainer.total_steps=100000",
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env_with(RETRAIN_MARKER=marker, RETRAIN_STEP=230))
    try:
        wait_for_marker(proc, marker, 120, "the run never reached the retrain")
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.time() - sent < 30, "the stop request must not wait for the 60 s retrain"
    assert proc.returncode == 0 and "checkpoint saved" in out, out[-3000:]
    counters = load_ckpt(run_dir / "checkpoints" / "last.pt")["counters"]
    assert counters["step"] == 230 and not counters["step_done"] and counters["update_credit"] >= 1.0

    train_run([f"resume={run_dir}", "trainer.total_steps=400"], tmp_path / "unused")
    train_run([*common, "trainer.total_steps=400"], tmp_path / "straight")
    straight = load_ckpt(tmp_path / "straight/checkpoints/last.pt")
    resumed = load_ckpt(run_dir / "checkpoints" / "last.pt")
    assert straight["counters"]["num_updates"] == resumed["counters"]["num_updates"]
    for key, value in straight["agent"]["modules"].items():
        assert torch.equal(value, resumed["agent"]["modules"][key]), key
    assert_strict_outputs(run_dir)


def _children(pid):
    sys.path.insert(0, str(ROOT))
    from train import _children as children
    return children(pid)


def test_stop_while_the_run_is_still_building_leaves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    """A sweep stopped as its next job starts: the signal lands while the envs are being built. The job
    must not die with nothing to resume from: it stops before its first step with a step-0 checkpoint."""
    import latentrl.trainer as trainer_module

    build_envs = trainer_module.TrainEnvs

    def envs_then_sigterm(*args, **kwargs):
        envs = build_envs(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return envs

    def unhandled(*_):  # what the signal would meet without the trainer's handler (by default: death)
        raise AssertionError("SIGTERM arrived before the trainer handled it")

    common = [*EXACT, "agent=sac", "trainer.checkpoint_every=0", "trainer.total_steps=300"]
    monkeypatch.setattr(trainer_module, "TrainEnvs", envs_then_sigterm)
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert train_run(common, tmp_path / "split") is None  # interrupted, not finished
        assert signal.getsignal(signal.SIGTERM) is unhandled, "the trainer restores the handler it replaced"
    finally:
        signal.signal(signal.SIGTERM, before)
    monkeypatch.undo()
    assert load_ckpt(tmp_path / "split/checkpoints/last.pt")["counters"]["step"] == 0
    assert not (tmp_path / "split" / "results.json").exists()

    train_run([f"resume={tmp_path / 'split'}"], tmp_path / "unused")
    train_run(common, tmp_path / "straight")
    straight = load_ckpt(tmp_path / "straight/checkpoints/last.pt")
    resumed = load_ckpt(tmp_path / "split/checkpoints/last.pt")
    for key, value in straight["agent"]["modules"].items():
        assert torch.equal(value, resumed["agent"]["modules"][key]), key


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_sigterm_stops_a_sweep_with_checkpoints_and_no_orphan_workers(tmp_path, n_jobs):
    """In-process (n_jobs=1) the interrupted job must end the sweep, not start the next one; with worker
    processes (n_jobs=2) the parent must not die alone and leave its workers training."""
    marker = tmp_path / "in_retrain"
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "train.py", "-m", *EXACT, "agent=sac",
                             f"agent._target_={__name__}.SlowRetrainSAC", "trainer.checkpoint_every=0", "threads=1",
                             "trainer.total_steps=100000", "seed=0,1,2", f"hydra.launcher.n_jobs={n_jobs}",
                             f"hydra.sweep.dir={sweep}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env_with(RETRAIN_MARKER=marker, RETRAIN_STEP=230))
    try:
        wait_for_marker(proc, marker, 180, "no job reached the retrain")
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    time.sleep(1)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}") and
                open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"], "orphan workers left training"
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir() and d.name[0].isdigit())
    assert 1 <= len(jobs) <= n_jobs, [d.name for d in jobs]  # no job started after the stop
    for job in jobs:
        assert (job / "checkpoints" / "last.pt").exists() and not (job / "results.json").exists(), job


def test_stop_during_evaluation_is_prompt_and_redone_on_resume(tmp_path):
    from conftest import compose_cfg
    from latentrl.trainer import Trainer

    cfg = compose_cfg(["env=pendulum", "agent=sac", *TINY, "trainer.eval_episodes=50"])
    before = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(cfg, tmp_path)
    assert signal.getsignal(signal.SIGTERM) is not before  # honoured from construction on
    calls = []

    def stop_after_some_steps():
        calls.append(1)
        trainer.stop_requested = len(calls) > 30
        return trainer.stop_requested

    trainer.should_stop = stop_after_some_steps
    trainer.stop_requested = False
    assert trainer.evaluate() is None and trainer.eval_pending
    assert len(calls) <= 32, "the evaluation stopped within a step of the request, not after 50 episodes"
    assert trainer.last_eval == {}
    trainer.close()  # a trainer that never trains gives the process its handlers back
    assert signal.getsignal(signal.SIGTERM) is before
    trainer.close()  # twice is harmless


def test_sweep_marks_the_diverging_job_failed_and_finishes_the_others(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "-m", "env=pendulum", "agent=sac", "threads=1", *EXACT[1:],
                           "trainer.checkpoint_every=0", "trainer.total_steps=300", "agent.lr=3e-4,1e4",
                           f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    good, bad = sorted((d for d in tmp_path.iterdir() if d.is_dir() and d.name[0].isdigit()),
                       key=lambda d: int(d.name.split("_", 1)[0]))
    assert strict_load((good / "results.json").read_text())["step"] == 300 and not (good / "FAILED").exists()
    assert "DivergenceError" in (bad / "FAILED").read_text() and not (bad / "results.json").exists()
    assert "failed" in proc.stdout + proc.stderr
    for d in (good, bad):
        assert_strict_outputs(d)


def test_threads_default_is_one_and_busy_machine_warns(monkeypatch, caplog):
    import latentrl.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(trainer_mod.os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # another process keeps 2 cores busy
    try:
        with caplog.at_level("INFO", logger="latentrl"):
            assert trainer_mod.configure_threads(None) == 1 and torch.get_num_threads() == 1
            assert "threads=null: 1" in caplog.text and "load average" not in caplog.text
            assert trainer_mod.configure_threads(2) == 2
            assert "threads=2 but the load average is 2.0 on 2 cores" in caplog.text
    finally:
        torch.set_num_threads(1)  # conftest's setting for the rest of the session
