"""Small wrappers gymnasium lacks in the form we need: action repeat, and pixel preprocessing
that yields uint8 channels-first frames (resize without OpenCV, optional grayscale, frame stack)."""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

try:  # box2d is a core dependency; without it there is no CarRacing to speed up
    from gymnasium.envs.box2d.car_racing import CarRacing
except ImportError:  # pragma: no cover
    CarRacing = ()


class ActionRepeat(gym.Wrapper):
    """Repeat an action `repeat` frames, summing rewards; stops early at episode ends.

    CarRacing draws its observation inside every step() (5 of its 6 ms per frame here), so its
    repeated frames skip the drawing and only the frame the agent sees is drawn: ~3x the env
    throughput at action_repeat=4, with observations, rewards and episode ends unchanged (drawing
    has no effect on the physics; tests/test_envs.py checks both paths give identical steps)."""

    def __init__(self, env: gym.Env, repeat: int, lazy_render: bool = True):
        super().__init__(env)
        self.repeat = repeat
        self.lazy_render = lazy_render and isinstance(env.unwrapped, CarRacing)  # other envs: no effect

    def step(self, action):
        total, car = 0.0, self.env.unwrapped
        for i in range(self.repeat):
            skip = self.lazy_render and i < self.repeat - 1
            if skip:  # an instance attribute shadows CarRacing._render for this one frame
                car._render = self._keep_frame
            try:
                obs, reward, terminated, truncated, info = self.env.step(action)
            finally:
                if skip:
                    del car._render
            total += float(reward)
            if terminated or truncated:
                if skip:  # the episode ended on a frame that was not drawn: draw it as step() would have
                    score, car.reward = car.reward, self._score_at_draw  # (step() lowers it after drawing)
                    obs = car.state = car._render("state_pixels")
                    car.reward = score
                break
        return obs, total, terminated, truncated, info

    def _keep_frame(self, mode: str):
        """Stands in for CarRacing._render on a repeated frame: the last drawn observation (a copy:
        handing back the array reset()/step() returned before trips gymnasium's shared-object check)."""
        car = self.env.unwrapped
        self._score_at_draw = car.reward  # the score the drawn frame shows in its corner
        return car.state.copy() if mode == "state_pixels" else type(car)._render(car, mode)


class PixelPreprocess(gym.ObservationWrapper):
    """HWC uint8 frames -> CHW uint8 (resized, optionally grayscale), as CNN encoders expect."""

    def __init__(self, env: gym.Env, resize: int | None, grayscale: bool):
        super().__init__(env)
        h, w, c = env.observation_space.shape
        self.size = (resize, resize) if resize else (h, w)
        self.grayscale = grayscale
        channels = 1 if grayscale else c
        self.observation_space = gym.spaces.Box(0, 255, (channels, *self.size), np.uint8)

    def observation(self, obs: np.ndarray) -> np.ndarray:
        frame = obs
        if self.grayscale:
            frame = (frame[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        frame = np.ascontiguousarray(np.moveaxis(frame, -1, 0))
        if tuple(frame.shape[1:]) != self.size:
            t = torch.from_numpy(frame.astype(np.float32)).unsqueeze(0)
            t = F.interpolate(t, size=self.size, mode="bilinear", antialias=True, align_corners=False)
            frame = t.squeeze(0).round_().clamp_(0, 255).numpy()
        return frame.astype(np.uint8)


class FrameStack(gym.Wrapper):
    """Stack the last k CHW frames along the channel axis (the first frame is repeated at reset)."""

    def __init__(self, env: gym.Env, k: int):
        super().__init__(env)
        c, h, w = env.observation_space.shape
        self.k = k
        self.frames: deque = deque(maxlen=k)
        self.observation_space = gym.spaces.Box(0, 255, (c * k, h, w), np.uint8)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(self.k):
            self.frames.append(obs)
        return np.concatenate(self.frames, axis=0), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.frames.append(obs)
        return np.concatenate(self.frames, axis=0), reward, terminated, truncated, info
