"""Small wrappers gymnasium lacks in the form we need: action repeat, and pixel preprocessing
that yields uint8 channels-first frames (resize without OpenCV, optional grayscale, frame stack)."""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F


class ActionRepeat(gym.Wrapper):
    """Repeat an action `repeat` frames, summing rewards; stops early at episode ends."""

    def __init__(self, env: gym.Env, repeat: int):
        super().__init__(env)
        self.repeat = repeat

    def step(self, action):
        total = 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


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
