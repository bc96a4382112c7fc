"""Goal-conditioned envs (gymnasium's GoalEnv convention, as in gymnasium-robotics' mazes).

Their observations are dicts: `observation` (the state), `achieved_goal` (where the agent is in
goal space) and `desired_goal` (the task's goal). Everything downstream handles them through the
few helpers here, so vector and pixel envs keep their plain arrays:

- `map_obs` applies a function to an observation whatever its form (array, or dict of arrays);
- `policy_input` is what a vector encoder reads from a dict: observation and desired goal,
  concatenated (the achieved goal is stored for hindsight relabeling, not fed to networks), and
  `vector_input` the same for either kind of vector observation;
- `GoalFunctions` exposes the env's own `compute_reward` / `compute_terminated` over batches, so
  hindsight relabeling recomputes rewards and terminations exactly as the env would have;
- `success_of` reads the success flag an env reports in its step info.
"""

from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch

GOAL_KEYS = ("observation", "achieved_goal", "desired_goal")
SUCCESS_KEYS = ("success", "is_success")  # gymnasium-robotics mazes report the first, Fetch/Shadow hand the second


def is_goal_space(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Dict) and all(k in space.spaces for k in GOAL_KEYS)


def map_obs(fn: Callable[[Any], Any], obs):
    """fn(obs) for an array observation; {key: fn(value)} for a dict observation."""
    if isinstance(obs, dict):
        return {k: fn(v) for k, v in obs.items()}
    return fn(obs)


def obs_layout(space: gym.Space) -> tuple[Any, Any]:
    """(shape, dtype) of a Box; ({key: shape}, {key: dtype}) of a goal env's Dict (what replay allocates)."""
    if isinstance(space, gym.spaces.Dict):
        return ({k: tuple(s.shape) for k, s in space.spaces.items()}, {k: s.dtype for k, s in space.spaces.items()})
    return tuple(space.shape), space.dtype


def policy_input_dim(space: gym.spaces.Dict) -> int:
    return int(np.prod(space["observation"].shape) + np.prod(space["desired_goal"].shape))


def policy_input(obs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, obs + goal) float features of a batch of goal-env observations."""
    return torch.cat([obs["observation"].flatten(1), obs["desired_goal"].flatten(1)], -1).float()


def vector_input(obs) -> torch.Tensor:
    """(B, n) float features of a batch of vector observations, or of goal-env dicts (policy_input)."""
    return policy_input(obs) if isinstance(obs, dict) else obs.flatten(1).float()


def success_of(info: dict) -> bool | None:
    """The env's success flag for this step, or None when the env reports none."""
    for key in SUCCESS_KEYS:
        if key in info:
            return bool(info[key])
    return None


def describe_space(space: gym.Space) -> str:
    """'shape (3,) float32', or 'dict observations {observation: (4,) float64, ...}' (for logs and errors)."""
    if isinstance(space, gym.spaces.Dict):
        return "dict observations {" + ", ".join(f"{k}: {s.shape} {s.dtype}" for k, s in space.spaces.items()) + "}"
    return f"shape {space.shape} {space.dtype}"


class GoalFunctions:
    """The env's reward and termination as functions of (achieved goal, desired goal) batches.

    Rewards use the env's vectorised `compute_reward`. `compute_terminated` is written per
    transition in gymnasium-robotics (a batch would be reduced to one norm), so it is called row
    by row; envs without it never terminate on success."""

    def __init__(self, env: gym.Env):
        self.env = env.unwrapped

    def reward(self, achieved: np.ndarray, desired: np.ndarray) -> np.ndarray:
        r = self.env.compute_reward(achieved, desired, None)
        return np.asarray(r, dtype=np.float32).reshape(len(achieved))

    def terminated(self, achieved: np.ndarray, desired: np.ndarray) -> np.ndarray:
        fn = getattr(self.env, "compute_terminated", None)
        if fn is None:
            return np.zeros(len(achieved), dtype=bool)
        return np.array([bool(fn(a, d, None)) for a, d in zip(achieved, desired)], dtype=bool)
