"""env=dmc (issue 12): every listed suite task makes, seeds and steps; pixel frames are what a twin
env draws `action_repeat` env steps apart; a dmc run resumes exactly; a missing renderer or an
unknown task is one line naming the fix; every agent runs on it. Skipped without dm_control."""

import ctypes.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("dm_control")

from conftest import ROOT, compose_cfg, train_run  # noqa: E402
from latentrl.config import ConfigError, validate  # noqa: E402
from latentrl.envs import dmc, make_env  # noqa: E402
from test_bad_input import cli  # noqa: E402
from test_resume import EXACT, assert_same_agent, params  # noqa: E402

TASKS = ["cheetah-run", "walker-walk", "cartpole-swingup", "reacher-easy", "finger-spin", "ball_in_cup-catch"]
# PlaNet/CURL/DrQ's action repeat from pixels
PAPER_REPEAT = {"cheetah-run": 4, "walker-walk": 2, "cartpole-swingup": 8, "reacher-easy": 4, "finger-spin": 2,
                "ball_in_cup-catch": 4}
# a few dozen steps, episodes cut short so the final evaluation is quick
SHORT = ["trainer.total_steps=40", "trainer.warmup_steps=20", "trainer.eval_every=0", "trainer.eval_episodes=1",
         "trainer.checkpoint_every=0", "trainer.log_every=20", "trainer.progress=false", "env.max_episode_steps=64"]


def dmc_cfg(*overrides):
    cfg = compose_cfg(["env=dmc", *overrides])
    validate(cfg)  # what train.py does: fills the null action_repeat / frame_stack
    return cfg


# ----------------------------------------------------------------------------- states
@pytest.mark.parametrize("task", TASKS)
def test_task_makes_seeds_and_steps(task):
    env = make_env(dmc_cfg(f"env.task={task}").env)
    assert env.observation_space.dtype == np.float32 and len(env.observation_space.shape) == 1
    assert env.action_space.dtype == np.float32
    assert env.action_space.low.tolist() == [-1] * env.action_space.shape[0] == (-env.action_space.high).tolist()
    first, _ = env.reset(seed=7)
    assert first.dtype == np.float32 and first.shape == env.observation_space.shape
    actions = np.random.default_rng(0).uniform(-1, 1, (5, *env.action_space.shape)).astype(np.float32)
    actions[0], actions[1] = -1, 1  # the bounds themselves

    def rollout():
        out = []
        for a in actions:
            obs, reward, terminated, truncated, _ = env.step(a)
            assert obs.dtype == np.float32 and np.isfinite(obs).all() and np.isfinite(reward)
            assert not terminated and not truncated
            out.append((obs, reward))
        return out

    run = rollout()
    again, _ = env.reset(seed=7)
    np.testing.assert_array_equal(first, again)  # same seed -> same initial state
    assert all(np.array_equal(o1, o2) and r1 == r2 for (o1, r1), (o2, r2) in zip(run, rollout()))
    assert not np.array_equal(first, env.reset(seed=8)[0]), "another seed, another initial state"
    env.close()


def test_actions_rescaled_to_the_task_bounds():
    env = dmc.DMCEnv("quadruped-walk")  # the one listed domain whose actuators are not [-1, 1]
    spec = env._env.action_spec()
    assert not np.allclose(spec.minimum, -1)
    env.reset(seed=0)
    for a, expected in ((-1, spec.minimum), (1, spec.maximum), (0, (spec.minimum + spec.maximum) / 2)):
        env.step(np.full(env.action_space.shape, a, np.float32))
        np.testing.assert_allclose(env._env.physics.data.ctrl, expected, rtol=1e-6)


def test_time_limit_is_a_truncation_not_a_termination():
    env = make_env(dmc_cfg("env.task=cartpole-swingup", "+env.kwargs.task_kwargs.time_limit=0.1").env)  # 10 steps
    env.reset(seed=0)
    ends = [env.step(np.zeros(1, np.float32))[2:4] for _ in range(10)]
    assert ends[:-1] == [(False, False)] * 9 and ends[-1] == (False, True)


def test_defaults_follow_the_papers():
    for task, repeat in PAPER_REPEAT.items():
        env = dmc_cfg(f"env.task={task}", "env.pixels=true", "encoder=cnn").env
        assert (env.action_repeat, env.frame_stack) == (repeat, 3), task
        env = dmc_cfg(f"env.task={task}").env
        assert (env.action_repeat, env.frame_stack) == (1, 1), task  # states: as state-based SAC baselines
    assert dmc_cfg("env.pixels=true", "encoder=cnn", "env.action_repeat=3").env.action_repeat == 3  # overrides win
    assert dmc.split_task("ball_in_cup-catch") == ("ball_in_cup", "catch")
    assert dmc.DMCEnv("quadruped-walk").camera_id == 2 and dmc.DMCEnv("cheetah-run").camera_id == 0


# ----------------------------------------------------------------------------- pixels
def test_eval_video_frames_from_states():
    env = make_env(dmc_cfg("env.task=reacher-easy").env, render_mode="rgb_array")  # trainer.log_eval_video=true
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (84, 84, 3) and frame.dtype == np.uint8 and frame.std() > 0
    assert env.metadata["render_fps"] == 50  # reacher's 0.02 s control step: videos play in real time


def test_pixel_frames_are_action_repeat_env_steps_apart():
    """The stacked observation holds the frames a twin env renders after 0, R, 2R, ... raw steps
    of the same actions (oldest first, the reset frame repeated at first)."""
    cfg = dmc_cfg("env.task=cartpole-swingup", "env.pixels=true", "encoder=cnn")
    repeat = cfg.env.action_repeat
    env = make_env(cfg.env)
    assert env.observation_space.shape == (9, 84, 84) and env.observation_space.dtype == np.uint8
    twin = dmc.DMCEnv("cartpole-swingup", render_mode="rgb_array")
    obs, _ = env.reset(seed=3)
    twin.reset(seed=3)
    drawn = [twin.render().transpose(2, 0, 1)]  # CHW, as the pixel pipeline stores frames
    np.testing.assert_array_equal(obs, np.concatenate(drawn * 3))  # the reset frame, repeated
    actions = [np.array([a], np.float32) for a in (1.0, -0.5, 0.25)]
    for a in actions:
        obs, reward, *_ = env.step(a)
        assert obs.dtype == np.uint8 and obs.shape == (9, 84, 84)
        twin_reward = sum(twin.step(a)[1] for _ in range(repeat))
        assert reward == pytest.approx(twin_reward)  # rewards of the repeated env steps summed
        drawn.append(twin.render().transpose(2, 0, 1))
    np.testing.assert_array_equal(obs, np.concatenate(drawn[-3:]))
    assert not np.array_equal(drawn[-1], drawn[-2]), "the frames must show motion"


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("overrides,total,half", [
    (["env.task=cheetah-run", "env.max_episode_steps=200"], 160, 110),  # mid-episode
    (["env.task=finger-spin", "env.pixels=true", "env.resize=32", "encoder=cnn", "env.max_episode_steps=40"], 30, 13),
])
def test_resume_is_exact_on_dmc(tmp_path, overrides, total, half):
    exact = [o for o in EXACT if not o.startswith("trainer.warmup_steps=")] + ["trainer.warmup_steps=10"]
    common = ["env=dmc", "agent=sac", "agent.batch_size=16", "agent.hidden_dims=[64,64]", *overrides, *exact]
    train_run([*common, f"trainer.total_steps={total}"], tmp_path / "straight")
    train_run([*common, f"trainer.total_steps={half}"], tmp_path / "split")
    train_run([f"resume={tmp_path / 'split'}", f"trainer.total_steps={total}"], tmp_path / "unused")
    assert_same_agent(params(tmp_path / "straight"), params(tmp_path / "split"))
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    split = json.loads((tmp_path / "split" / "results.json").read_text())
    assert straight["eval/return_mean"] == split["eval/return_mean"] and split["step"] == total


# ----------------------------------------------------------------------------- bad input
def test_unknown_task_is_one_line_listing_the_tasks(tmp_path):
    with pytest.raises(ConfigError, match=r"env.task='nonsense' is not a DeepMind Control Suite task.*cheetah-run"):
        make_env(dmc_cfg("env.task=nonsense").env)
    code, out = cli("env=dmc", "env.task=nonsense", "agent=sac", *SHORT)
    assert code == 2 and "Traceback" not in out
    line = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "env.task=" in line[0] and "ball_in_cup-catch" in line[0] and "walker-walk" in line[0]


def test_renderer_falls_back_from_egl_to_osmesa(monkeypatch):
    monkeypatch.delitem(sys.modules, "dm_control._render")  # as before dm_control's first import
    monkeypatch.setattr(dmc, "_renderer_errors", None)
    monkeypatch.setenv("MUJOCO_GL", "egl")
    tried = []
    errors = dmc.select_renderer(lambda b: tried.append(b) or ("no EGL device" if b == "egl" else None))
    assert tried == ["egl", "osmesa"] and os.environ["MUJOCO_GL"] == "osmesa" and errors == {"egl": "no EGL device"}


def test_no_renderer_is_one_line_naming_the_packages(monkeypatch):
    monkeypatch.delitem(sys.modules, "dm_control._render")
    monkeypatch.setattr(dmc, "_renderer_errors", None)
    monkeypatch.setenv("MUJOCO_GL", "egl")
    errors = dmc.select_renderer(lambda b: f"{b} is missing")
    assert os.environ["MUJOCO_GL"] == "disable"  # states still run without a renderer
    msg = str(dmc.renderer_error(errors))
    assert "\n" not in msg and "libosmesa6" in msg and "libegl1" in msg and "egl is missing" in msg


@pytest.mark.skipif(ctypes.util.find_library("OSMesa") is not None,
                    reason="OSMesa is installed here: the fallback would render instead of failing")
def test_cli_without_a_working_renderer(tmp_path):
    """A real failure: EGL pointed at a device that does not exist, and no OSMesa on this machine."""
    env = {**os.environ, "MUJOCO_GL": "egl", "MUJOCO_EGL_DEVICE_ID": "99"}
    proc = subprocess.run([sys.executable, "train.py", "env=dmc", "env.pixels=true", "encoder=cnn", "agent=sac",
                           *SHORT, f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    line = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "libosmesa6" in line[0] and "env.pixels=false" in line[0]


# ----------------------------------------------------------------------------- every agent
AGENT_SMALL = {
    "sac": ["agent.batch_size=16", "agent.hidden_dims=[64,64]"],
    "goal_hrl": ["agent.batch_size=16", "agent.high.batch_size=8", "agent.low.hidden_dims=[64,64]",
                 "agent.high.hidden_dims=[64,64]", "agent.model.hidden_dims=[64,64]", "agent.decoder.hidden_dims=[64]",
                 "agent.decoder.batch_size=8", "agent.goal_dim=16", "agent.buffer_size=2000"],
    "latent_mbrl": ["agent.model_hidden_dims=[32,32]", "agent.hidden_dims=[32,32]", "agent.latent_dim=8",
                    "agent.batch_size=16", "agent.buffer_size=2000", "agent.diagnostics_every=10"],
}


@pytest.mark.parametrize("pixels", [False, True], ids=["states", "pixels"])
@pytest.mark.parametrize("agent", sorted(AGENT_SMALL))
def test_every_agent_runs_on_dmc(tmp_path, agent, pixels):
    view = ["env.pixels=true", "encoder=cnn", "env.resize=32"] if pixels else []
    ret = train_run(["env=dmc", "env.task=walker-walk", f"agent={agent}", *AGENT_SMALL[agent], *view, *SHORT],
                    tmp_path)
    assert np.isfinite(ret)
    repeat = 2 if pixels else 1  # walker's action repeat from pixels; 1 from states
    assert json.loads((tmp_path / "results.json").read_text())["frames"] == 40 * repeat
    logged = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["perf/frames"] for m in logged if "perf/frames" in m] == [20 * repeat, 40 * repeat]


def test_checkpoint_of_another_task_is_refused(tmp_path):
    """env.id is `dmc` for every task: the task itself must be part of the checkpoint's fingerprint."""
    from latentrl import checkpoint as ckpt_io

    cheetah = {"env": {"id": "dmc", "task": "cheetah-run"}, "agent": {"_target_": "a"}, "encoder": {"_target_": "e"}}
    walker = {**cheetah, "env": {"id": "dmc", "task": "walker-walk"}}
    ckpt = {"format_version": ckpt_io.FORMAT_VERSION, "fingerprint": ckpt_io.fingerprint(cheetah)}
    ckpt_io.check_compatible(ckpt, cheetah, tmp_path / "last.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="env.task"):
        ckpt_io.check_compatible(ckpt, walker, tmp_path / "last.pt")
