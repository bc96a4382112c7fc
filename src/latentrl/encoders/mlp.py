"""Encoders for vector observations, and for the dict observations of goal-conditioned envs (they
read the observation and the desired goal, concatenated: latentrl.envs.goal.policy_input)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

from latentrl.config import ConfigError
from latentrl.envs import is_pixel_space
from latentrl.envs.goal import is_goal_space, policy_input_dim, vector_input


def _vector_dim(obs_space: gym.Space, name: str) -> int:
    if is_pixel_space(obs_space):
        raise ConfigError(f"encoder={name} cannot read pixel observations of shape {obs_space.shape}: "
                          "use encoder=cnn")
    if is_goal_space(obs_space):
        return policy_input_dim(obs_space)
    return int(np.prod(obs_space.shape))


class MLPEncoder(nn.Module):
    """Linear+ReLU stack ending in a LayerNorm'd, tanh-bounded feature vector (bounded features
    keep latent models and goal distances on a fixed scale)."""

    is_pixel = False

    def __init__(self, obs_space: gym.Space, hidden_dims=(256,), feature_dim: int = 64):
        super().__init__()
        in_dim = _vector_dim(obs_space, "mlp")
        layers, d = [], in_dim
        for h in hidden_dims:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers += [nn.Linear(d, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.out_dim = feature_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(vector_input(obs))


class IdentityEncoder(nn.Module):
    """Raw (flattened) vector observations as features: plain state-based SAC."""

    is_pixel = False

    def __init__(self, obs_space: gym.Space):
        super().__init__()
        self.out_dim = _vector_dim(obs_space, "identity")

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return vector_input(obs)
