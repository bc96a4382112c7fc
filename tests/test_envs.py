"""Env wrapper order: rescale -> action repeat -> pixel preprocess -> frame stack, checked on a tiny
fake pixel env whose every frame is filled with its raw frame counter."""

import gymnasium as gym
import numpy as np
import pytest

from conftest import compose_cfg
from latentrl.envs import make_env
from latentrl.envs.wrappers import PixelPreprocess

FAKE_ID = "LatentrlFrameCounter-v0"


class FrameCounterEnv(gym.Env):
    """HWC uint8 frames filled with the number of raw frames stepped since reset (mod 256)."""

    def __init__(self, **_):
        self.observation_space = gym.spaces.Box(0, 255, (16, 16, 3), np.uint8)
        self.action_space = gym.spaces.Box(np.array([-1, 0, 0], np.float32), np.ones(3, np.float32))
        self.t = 0

    def _frame(self):
        return np.full((16, 16, 3), self.t % 256, np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._frame(), {}

    def step(self, action):
        self.t += 1
        return self._frame(), 1.0, False, False, {}


if FAKE_ID not in gym.registry:
    gym.register(FAKE_ID, entry_point=FrameCounterEnv)


def _env(repeat, stack, grayscale=True):
    cfg = compose_cfg(["env=carracing", f"env.id={FAKE_ID}", f"env.action_repeat={repeat}",
                       f"env.frame_stack={stack}", "env.resize=8", f"env.grayscale={str(grayscale).lower()}"])
    return make_env(cfg.env)


@pytest.mark.parametrize("grayscale", [True, False])
def test_frame_stack_holds_frames_action_repeat_apart(grayscale):
    repeat, stack = 4, 3
    env = _env(repeat, stack, grayscale)
    c = 1 if grayscale else 3
    obs, _ = env.reset(seed=0)
    assert obs.shape == (c * stack, 8, 8)
    seen = [obs[::c, 0, 0].tolist()]
    for _ in range(3):
        obs, r, *_ = env.step(np.zeros(3, np.float32))
        assert r == pytest.approx(repeat)  # rewards of the repeated frames summed
        seen.append(obs[::c, 0, 0].tolist())
    # oldest -> newest; frames are `repeat` raw frames apart, the reset frame repeated at first
    assert seen == [[0, 0, 0], [0, 0, 4], [0, 4, 8], [4, 8, 12]]


def test_pixel_preprocess_runs_once_per_agent_step(monkeypatch):
    calls = []
    orig = PixelPreprocess.observation
    monkeypatch.setattr(PixelPreprocess, "observation", lambda self, o: calls.append(1) or orig(self, o))
    env = _env(repeat=5, stack=2)
    env.reset(seed=0)
    for _ in range(3):
        env.step(np.zeros(3, np.float32))
    assert len(calls) == 1 + 3  # reset + one per agent step, not one per raw frame
