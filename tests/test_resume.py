"""Checkpoint/resume: exactness, SIGTERM and SIGKILL mid-run, TensorBoard continuity, refusals."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, TINY, train_run
from latentrl.checkpoint import CheckpointError
from latentrl.config import ConfigError

EXACT = ["trainer.warmup_steps=100", "trainer.eval_every=0", "trainer.eval_episodes=1", "trainer.log_every=50",
         "trainer.checkpoint_every=0", "trainer.progress=false"]


def params(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["agent"]


def same(a, b) -> bool:
    """Recursive equality over the plain containers and tensors a checkpoint holds."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_agent(a, b):
    for key in a["modules"]:
        assert torch.equal(a["modules"][key], b["modules"][key]), f"parameter {key} differs after resume"
    assert same(a["extra"], b["extra"]) and same(a["optimizers"], b["optimizers"])


def straight_and_resumed(tmp_path, overrides, total, half) -> tuple[dict, dict]:
    """Train `total` steps straight, and `half` steps then resumed to `total`; asserts the two agents
    are identical and returns both results.json."""
    train_run([*overrides, f"trainer.total_steps={total}"], tmp_path / "straight")
    train_run([*overrides, f"trainer.total_steps={half}"], tmp_path / "split")
    train_run([f"resume={tmp_path / 'split'}", f"trainer.total_steps={total}"], tmp_path / "unused")
    assert not (tmp_path / "unused").exists(), "a resumed run continues in its own directory"
    assert_same_agent(params(tmp_path / "straight"), params(tmp_path / "split"))
    return tuple(json.loads((tmp_path / run / "results.json").read_text()) for run in ("straight", "split"))


@pytest.mark.parametrize("overrides,total,half", [
    (["env=pendulum", "agent=sac"], 400, 230),  # resumes mid-episode (pendulum episodes are 200 steps)
    (["env=carracing", "env.resize=32", "env.action_repeat=2", "agent=sac", "agent.batch_size=16",
      "trainer.warmup_steps=40"], 110, 70),
])
def test_resume_is_exact(tmp_path, overrides, total, half):
    straight, split = straight_and_resumed(tmp_path, [*overrides, *EXACT], total, half)
    assert straight["eval/return_mean"] == split["eval/return_mean"]
    assert split["step"] == total


def _train_proc(run_dir, *overrides):
    return subprocess.Popen([sys.executable, "train.py", "env=pendulum", "agent=sac", f"hydra.run.dir='{run_dir}'", "threads=1",
                             *EXACT, *overrides], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_step(run_dir, step, proc, timeout=120):
    path, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if path.exists():
            lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            if lines and lines[-1]["step"] >= step:
                return
        time.sleep(0.2)
    raise TimeoutError(f"run did not reach step {step}")


def test_sigterm_saves_checkpoint_and_run_resumes(tmp_path):
    run_dir = tmp_path / "0_agent.tau=0.005,seed=0"  # named like a sweep job: '=' and ',' are Hydra syntax
    proc = _train_proc(run_dir, "trainer.total_steps=100000")
    _wait_for_step(run_dir, 300, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "checkpoint saved" in out
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    stopped_at = state["counters"]["step"]
    assert stopped_at >= 300 and not (run_dir / "results.json").exists()
    # the command the log prints works as written (Hydra would reject an unquoted 'resume=...=...,...')
    command = shlex.split(out.split("Continue with: ", 1)[1].splitlines()[0])
    assert command[:2] == ["python", "train.py"] and len(command) == 3
    train_run([command[2], f"trainer.total_steps={stopped_at + 150}"], tmp_path / "unused")
    assert json.loads((run_dir / "results.json").read_text())["step"] == stopped_at + 150


def test_sigkill_then_resume_gives_one_tensorboard_curve(tmp_path):
    """A hard kill after the last checkpoint leaves events past it; the resumed run purges them."""
    run_dir = tmp_path / "run"
    proc = _train_proc(run_dir, "trainer.total_steps=100000", "trainer.checkpoint_every=300")
    _wait_for_step(run_dir, 400, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["counters"]["step"] == 300
    train_run([f"resume={run_dir}", "trainer.total_steps=500"], tmp_path / "unused")

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/episode_return", "train/episode_length", "eval/return_mean", "eval/return_std", "loss/critic",
            "loss/actor", "loss/alpha", "train/alpha", "perf/env_steps_per_s", "perf/updates_per_s"} <= tags
    for tag in ("loss/critic", "perf/env_steps_per_s", "train/episode_return"):
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), f"{tag} has duplicated or unordered steps: {steps}"
    assert [e.step for e in acc.Scalars("loss/critic")] == list(range(150, 501, 50))
    assert [e.step for e in acc.Scalars("eval/return_mean")] == [500]
    assert "config" in acc.Tags().get("tensors", []) or acc.Tags().get("tensors")  # resolved config as text
    jsonl_steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert jsonl_steps == sorted(jsonl_steps)


def test_checkpoint_from_another_config_is_refused(tmp_path):
    train_run(["env=pendulum", "agent=sac", *TINY], tmp_path / "pendulum")
    train_run(["env=hopper", "agent=sac", *TINY], tmp_path / "hopper")
    shutil.copy(tmp_path / "pendulum" / "checkpoints" / "last.pt", tmp_path / "hopper" / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="env.id: checkpoint='Pendulum-v1' config='Hopper-v5'"):
        train_run([f"resume={tmp_path / 'hopper'}", "trainer.total_steps=600"], tmp_path / "unused")


def test_resume_refuses_changing_the_experiment(tmp_path):
    train_run(["env=pendulum", "agent=sac", *TINY], tmp_path / "run")
    with pytest.raises(ConfigError, match="cannot change 'env'"):
        train_run([f"resume={tmp_path / 'run'}", "env=hopper"], tmp_path / "unused")
    with pytest.raises(ConfigError, match="cannot change 'agent.lr'"):
        train_run([f"resume={tmp_path / 'run'}", "agent.lr=0.1"], tmp_path / "unused")
    with pytest.raises(ConfigError, match="no config.yaml"):
        train_run([f"resume={tmp_path / 'nowhere'}"], tmp_path / "unused")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint loadable."""
    from latentrl import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"step": 1}, path)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"step": 2}, path)
    assert checkpoint.load(path)["step"] == 1


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    from latentrl import checkpoint

    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        checkpoint.load(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")


def test_weights_only_refuses_code(tmp_path):
    """Checkpoints load with weights_only=True: a pickle that would run code is refused."""
    from latentrl import checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"x": Evil()}, f)
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "evil.pt")


def test_branch_with_the_same_config_continues_exactly_as_its_source(tmp_path):
    """branch_from starts a new run at the source's checkpoint; with the source's own config it must
    continue as the source itself would (so a branch that changes one setting differs by that setting
    alone), leave the source untouched, and resume in its own directory."""
    base = ["env=pendulum", "agent=sac", *EXACT]
    train_run([*base, "trainer.total_steps=400"], tmp_path / "straight")
    train_run([*base, "trainer.total_steps=230"], tmp_path / "source")
    before = (tmp_path / "source" / "checkpoints" / "last.pt").read_bytes()
    train_run([*base, f"branch_from={tmp_path / 'source'}", "trainer.total_steps=330"], tmp_path / "branch")
    train_run([f"resume={tmp_path / 'branch'}", "trainer.total_steps=400"], tmp_path / "unused")
    assert (tmp_path / "source" / "checkpoints" / "last.pt").read_bytes() == before, "the source is not written"
    assert_same_agent(params(tmp_path / "straight"), params(tmp_path / "branch"))
    results = [json.loads((tmp_path / r / "results.json").read_text()) for r in ("straight", "branch")]
    assert results[0]["eval/return_mean"] == results[1]["eval/return_mean"] and results[1]["step"] == 400
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "branch" / "metrics.jsonl").read_text().splitlines()]
    assert min(steps) > 230, "the branch logs only what it trained itself, from the source's step on"


def test_branch_takes_its_own_config_and_keeps_the_learned_state(tmp_path):
    base = ["env=pendulum", "agent=sac", *EXACT]
    train_run([*base, "trainer.total_steps=230"], tmp_path / "source")
    train_run([*base, f"branch_from={tmp_path / 'source'}", "agent.lr=0.001", "trainer.total_steps=260"],
              tmp_path / "branch")
    src, branch = params(tmp_path / "source"), params(tmp_path / "branch")
    for opt in branch["optimizers"].values():  # the moments come from the source, the rate from this config
        assert all(g["lr"] == 0.001 for g in opt["param_groups"]) and opt["state"]
    assert all(g["lr"] == 3e-4 for opt in src["optimizers"].values() for g in opt["param_groups"])
    assert all(opt["state"][0]["step"] > src["optimizers"][k]["state"][0]["step"]
               for k, opt in branch["optimizers"].items()), "the optimizers' step counts go on from the source's"


def test_branch_refusals_name_the_key(tmp_path):
    base = ["env=pendulum", "agent=sac", *TINY]
    train_run(base, tmp_path / "source")  # 300 steps
    src = f"branch_from={tmp_path / 'source'}"
    with pytest.raises(ConfigError, match="'seed' differs"):
        train_run([*base, src, "seed=1", "trainer.total_steps=400"], tmp_path / "a")
    with pytest.raises(ConfigError, match="'env.action_repeat' differs"):
        train_run([*base, src, "env.action_repeat=2", "trainer.total_steps=400"], tmp_path / "b")
    with pytest.raises(ConfigError, match="set trainer.total_steps above it"):
        train_run([*base, src], tmp_path / "c")
    with pytest.raises(ConfigError, match="checkpoints/last.pt there"):
        train_run([*base, f"branch_from={tmp_path / 'nowhere'}"], tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists(), "refused before the run dir is written"
    with pytest.raises(ConfigError, match="keep one"):
        train_run([f"resume={tmp_path / 'source'}", src], tmp_path / "e")
