"""Pixel encoder: the seed's three 4x4 stride-2 convolutions, then a LayerNorm'd tanh projection
(the SAC-AE/DrQ recipe that keeps pixel off-policy RL stable)."""

from __future__ import annotations

import gymnasium as gym
import torch
import torch.nn as nn

from latentrl.config import ConfigError
from latentrl.envs import is_pixel_space
from latentrl.envs.goal import describe_space


class CNNEncoder(nn.Module):
    is_pixel = True

    def __init__(self, obs_space: gym.Space, channels=(32, 64, 128), kernel_size: int = 4, stride: int = 2,
                 feature_dim: int = 64):
        super().__init__()
        if not is_pixel_space(obs_space):
            raise ConfigError(f"encoder=cnn needs pixel observations (uint8, channels-first), but the env gives "
                              f"{describe_space(obs_space)}: use encoder=mlp (or encoder=identity)")
        in_ch, h, w = obs_space.shape
        layers = []
        for ch in channels:
            layers += [nn.Conv2d(in_ch, ch, kernel_size, stride), nn.ReLU()]
            in_ch = ch
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(1, *obs_space.shape)).flatten(1).shape[1]
        self.head = nn.Sequential(nn.Linear(n_flat, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())
        self.obs_shape = tuple(obs_space.shape)
        self.out_dim = feature_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float() / 255.0 - 0.5  # scaled once, here; buffers keep uint8
        return self.head(self.convs(x).flatten(1))
