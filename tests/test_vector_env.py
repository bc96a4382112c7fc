"""Vector envs (env.num_envs) and the fast path (agent.compile): sub-envs are single envs with their
own seed streams, a multi-stream replay is one replay per sub-env, exact resume per sub-env,
per-sub-env episode bookkeeping, start-up refusals, and compile's fallback."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, compose_cfg, train_run
from latentrl.agents import base
from latentrl.buffers import ReplayBuffer
from latentrl.config import ConfigError
from latentrl.envs import episode_seed, make_env
from latentrl.envs.vector import TrainEnvs
from test_resume import EXACT, _wait_for_step, straight_and_resumed


@pytest.mark.parametrize("overrides,steps", [
    (["env=pendulum", "env.max_episode_steps=6"], 16),  # sync, several seeded resets per sub-env
    (["env=carracing", "env.resize=16", "env.action_repeat=2", "env.max_episode_steps=8", "env.vector_mode=async"], 6),
])
def test_sub_envs_produce_the_transitions_of_single_envs_with_their_seeds(overrides, steps):
    """Sub-env i of a vector env, reset with sub-env i's seeds, is a single env reset with the same
    seeds: same observations, rewards and episode ends under the same actions."""
    cfg = compose_cfg(overrides)
    n, rng = 3, np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (steps, n, *make_env(cfg.env).action_space.shape)).astype(np.float32)

    def run(step_all, reset):
        """Transitions of each sub-env; step_all(actions) -> per sub-env results, reset({i: seed}) -> {i: obs}."""
        episode, trace = [0] * n, [[] for _ in range(n)]
        first = reset({i: episode_seed(0, 0, env_index=i) for i in range(n)})
        obs = [first[i] for i in range(n)]
        for t in range(steps):
            for i, (nxt, reward, term, trunc, _) in enumerate(step_all(actions[t])):
                trace[i].append((obs[i], float(reward), bool(term), bool(trunc)))
                obs[i] = nxt
                if term or trunc:
                    episode[i] += 1
                    obs[i] = reset({i: episode_seed(0, episode[i], env_index=i)})[i]
        return trace, episode

    envs = TrainEnvs(cfg.env, n)
    try:
        vector, episodes = run(envs.step, envs.reset)
    finally:
        envs.close()
    singles = [make_env(cfg.env) for _ in range(n)]
    single, _ = run(lambda acts: [env.step(a) for env, a in zip(singles, acts)],
                    lambda seeds: {i: singles[i].reset(seed=seed)[0] for i, seed in seeds.items()})
    assert min(episodes) >= 1, "the test must cross seeded resets"
    for i in range(n):
        for (o1, r1, te1, tr1), (o2, r2, te2, tr2) in zip(vector[i], single[i]):
            np.testing.assert_array_equal(o1, o2)
            assert (r1, te1, tr1) == (r2, te2, tr2)
    assert not np.array_equal(vector[0][0][0], vector[1][0][0]), "each sub-env has its own seed stream"


def test_multi_stream_replay_is_one_replay_per_sub_env():
    """Interleaved transitions of 2 sub-envs land in 2 segments, each holding exactly what a
    single-stream replay fed only that sub-env holds (next observations, episode ends, sequences)."""
    rng = np.random.default_rng(1)
    multi = ReplayBuffer(40, (2,), np.float32, 1, seed=0, streams=2)
    singles = [ReplayBuffer(20, (2,), np.float32, 1, seed=0) for _ in range(2)]
    counter = [0.0, 1000.0]  # sub-env 1's observations are 1000 apart from sub-env 0's
    for _ in range(70):  # wraps each 20-slot segment more than once
        for s in range(2):
            end = rng.random() < 0.15
            obs = np.full(2, counter[s], np.float32)
            args = (obs, np.array([counter[s]], np.float32), counter[s], obs + 1, end and rng.random() < 0.5, end)
            multi.add(*args, stream=s)
            singles[s].add(*args)
            counter[s] += 2 if end else 1
    for s in range(2):
        seg = slice(s * 20, (s + 1) * 20)
        for name in ("valid", "terminated", "reward"):
            np.testing.assert_array_equal(getattr(multi, name)[seg], getattr(singles[s], name))
        np.testing.assert_array_equal(multi.obs[seg], singles[s].obs)
    idx = multi.sample_idx(500)
    assert {0, 1} == set(idx // 20), "both sub-envs' transitions are sampled"
    b = multi.gather(idx)
    np.testing.assert_array_equal(b["next_obs"][:, 0].numpy(), b["obs"][:, 0].numpy() + 1)
    seq = multi.sample_sequences(200, 4)
    steps = (seq["obs"][:, 1:, 0] - seq["obs"][:, :1, 0]).numpy()
    # observations advance one per valid step of the same episode, then stay at its last one
    np.testing.assert_array_equal(steps, np.cumsum(seq["mask"].numpy(), 1))
    assert (seq["mask"] == 0).any() and (seq["mask"].sum(1) == 4).any()
    state = multi.state_dict()
    copy = ReplayBuffer(40, (2,), np.float32, 1, seed=5, streams=2)
    copy.load_state_dict(state)
    np.testing.assert_array_equal(copy.sample_idx(64), multi.sample_idx(64))


def test_resume_is_exact_per_sub_env(tmp_path):
    """2 Hopper sub-envs (episodes end at different steps, so the split leaves them at different
    points of their episodes) in async workers: straight == split + resumed."""
    overrides = ["env=hopper", "agent=sac", "agent.hidden_dims=[64,64]", "agent.batch_size=32", "env.num_envs=2",
                 "env.vector_mode=async", *EXACT]
    straight, split = straight_and_resumed(tmp_path, overrides, total=300, half=170)
    assert straight["eval/return_mean"] == split["eval/return_mean"] and split["step"] == 300
    state = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["sub_envs"]) == 2


def test_episodes_counted_per_sub_env(tmp_path):
    """3 Pendulum sub-envs with 40-step episodes: every episode is logged once, with its own return
    (the sum of that episode's rewards in the replay); N envs x 1 update per step = N updates per
    iteration; intervals that N steps jump over still fire."""
    from latentrl.trainer import Trainer

    cfg = compose_cfg(["env=pendulum", "agent=sac", "agent.hidden_dims=[32,32]", "env.num_envs=3",
                       "env.max_episode_steps=40", *TINY])
    trainer = Trainer(cfg, tmp_path)
    results = trainer.train()
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [ln for ln in lines if "train/episode_return" in ln]
    assert results["episodes"] == len(logged) == 3 * (300 // 3 // 40)
    assert all(ln["train/episode_length"] == 40 for ln in logged)
    assert len({ln["step"] for ln in logged}) == len(logged), "each sub-env's episode end has its own step"
    rb = trainer.agent.replay
    closed = np.unique(rb.episode[rb.valid & (rb.episode_last >= 0)])
    sums = sorted(rb.reward[rb.valid & (rb.episode == e)].sum() for e in closed)
    np.testing.assert_allclose(sums, sorted(ln["train/episode_return"] for ln in logged), rtol=1e-5)
    assert len({round(ln["train/episode_return"], 3) for ln in logged}) == len(logged), "no episode counted twice"
    assert results["updates"] == 300 - 100
    assert [ln["step"] for ln in lines if "loss/critic" in ln] == [102, 150, 201, 252, 300]  # log_every=50, 3 at a time


def test_ctrl_c_to_the_process_group_checkpoints_and_leaves_no_workers(tmp_path):
    """Ctrl-C (and SLURM's SIGTERM) reach every process of the group, async sub-env workers too:
    the run still stops at a safe point with a checkpoint, and no worker outlives it."""
    proc = subprocess.Popen([sys.executable, "train.py", "env=pendulum", "agent=sac", "agent.hidden_dims=[32,32]",
                             "env.num_envs=2", "env.vector_mode=async", f"hydra.run.dir={tmp_path}", "threads=1",
                             *EXACT, "trainer.total_steps=100000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_step(tmp_path, 150, proc)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "checkpoint saved" in out, out[-2000:]
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the run still alive: {left}"


@pytest.mark.parametrize("overrides,fix", [
    (["env=carracing", "agent=goal_hrl"], "goal_hrl.GoalHRL keeps per-episode state and trains on one env; set env.num_envs=1"),
    (["env=pointmaze", "agent=sac"], "goal-conditioned envs (env.id=PointMaze, dict observations) train on one env"),
])
def test_vector_envs_refused_in_one_line(tmp_path, overrides, fix):
    with pytest.raises(ConfigError, match="env.num_envs=2") as err:
        train_run([*overrides, "env.num_envs=2", *TINY], tmp_path)
    assert fix in str(err.value) and "\n" not in str(err.value)


def test_bad_vector_mode_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="env.vector_mode.*set env.vector_mode=auto"):
        train_run(["env=pendulum", "agent=sac", "env.num_envs=2", "env.vector_mode=threads", *TINY], tmp_path)


def test_compile_falls_back_with_one_log_line(tmp_path, monkeypatch, caplog):
    """Where torch.compile cannot run, agent.compile=true trains eagerly and says why, once."""
    def unavailable(*args, **kwargs):
        raise RuntimeError("no C++ compiler here\nsecond line of a long error")

    monkeypatch.setattr(torch, "compile", unavailable)
    base.compile_unavailable.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="latentrl"):
            train_run(["env=pendulum", "agent=latent_mbrl", "agent.compile=true", "agent.hidden_dims=[32,32]",
                       "agent.model_hidden_dims=[32,32]", "agent.batch_size=32", *TINY], tmp_path)
    finally:
        base.compile_unavailable.cache_clear()
    said = [r.getMessage() for r in caplog.records if "agent.compile" in r.getMessage()]
    assert said == ["agent.compile=true: running without torch.compile on cpu (RuntimeError: no C++ compiler here)"]
    assert (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_compile_on_cpu_trains(tmp_path, caplog):
    """Real torch.compile on this CPU (~1 min: the probe and the update's graphs compile): either
    compiled or one line saying why not; training finishes either way."""
    base.compile_unavailable.cache_clear()
    with caplog.at_level(logging.INFO, logger="latentrl"):
        train_run(["env=pendulum", "agent=sac", "agent.compile=true", *TINY], tmp_path)
    said = [r.getMessage() for r in caplog.records if "agent.compile" in r.getMessage()]
    assert len(said) == 1 and ("torch.compile on cpu" in said[0] or "running without" in said[0]), said
    assert json.loads((tmp_path / "results.json").read_text())["step"] == 300
