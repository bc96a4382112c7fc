"""Env wrapper order: rescale -> action repeat -> pixel preprocess -> frame stack, checked on a tiny
fake pixel env whose every frame is filled with its raw frame counter."""

import warnings

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


def _carracing(lazy: bool, max_frames: int):
    """experiment=carracing_cpu's env (48x48 gray, 3 stacked, repeat 4), drawing every frame or lazily."""
    cfg = compose_cfg(["experiment=carracing_cpu", f"env.max_episode_steps={max_frames}", f"env.lazy_render={lazy}"])
    return make_env(cfg.env)


def test_carracing_lazy_render_gives_the_same_steps():
    """Skipping the drawing of repeated frames changes nothing the agent sees: same frames, rewards
    and episode ends, including an episode cut mid-repeat (30 frames = 7 agent steps + 2 frames)."""
    envs = [_carracing(lazy, max_frames=30) for lazy in (False, True)]
    rng = np.random.default_rng(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compare_lazy_and_drawn(envs, rng)
    # gymnasium's checker: a repeated frame must not hand back an array reset()/step() returned before
    assert not [w for w in caught if "share an object" in str(w.message)]


def _compare_lazy_and_drawn(envs, rng):
    for episode in range(2):
        obs = [env.reset(seed=episode)[0] for env in envs]
        np.testing.assert_array_equal(obs[0], obs[1])
        for t in range(8):
            action = rng.uniform(-1, 1, 3).astype(np.float32)
            out = [env.step(action) for env in envs]
            np.testing.assert_array_equal(out[0][0], out[1][0])
            assert out[0][1:4] == out[1][1:4]  # reward, terminated, truncated
            if out[0][3]:
                break
        assert t == 7 and out[0][3], "the 30-frame limit ends the 8th agent step after 2 of its 4 frames"


@pytest.mark.parametrize("lazy, draws", [(True, 5), (False, 20)])
def test_carracing_lazy_render_draws_once_per_agent_step(monkeypatch, lazy, draws):
    from gymnasium.envs.box2d.car_racing import CarRacing

    drawn = []
    orig = CarRacing._render
    monkeypatch.setattr(CarRacing, "_render", lambda self, mode, **kw: drawn.append(mode) or orig(self, mode, **kw))
    env = _carracing(lazy=lazy, max_frames=1000)
    env.reset(seed=0)
    before = len(drawn)
    for _ in range(5):
        env.step(np.zeros(3, np.float32))
    assert len(drawn) - before == draws  # lazily one drawing per agent step, else one per frame (repeat 4)


def test_random_shift_crops_the_padded_image_at_whole_pixel_offsets():
    """DrQ's augmentation: every image is its replicate-padded self cropped at an integer offset
    in [0, 2 * pad] per axis, offsets differ between images, and pad=0 returns the input."""
    import torch
    import torch.nn.functional as F

    from latentrl.agents.networks import random_shift

    torch.manual_seed(0)
    pad, obs = 4, torch.randint(0, 256, (16, 3, 20, 20), dtype=torch.uint8)
    out, padded = random_shift(obs, pad), F.pad(obs.float(), (pad,) * 4, mode="replicate")
    offsets = []
    for img, src in zip(out, padded):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.allclose(img, src[:, dy:dy + 20, dx:dx + 20], atol=1e-3)]
        assert found, "not a whole-pixel crop of the padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 4
    assert torch.allclose(random_shift(obs, 0), obs.float(), atol=1e-3)
