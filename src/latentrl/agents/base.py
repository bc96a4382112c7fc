"""The interface between the trainer and every agent."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from latentrl.buffers import ReplayBuffer
from latentrl.envs.goal import map_obs


class Agent(nn.Module):
    """An agent acts, stores what it sees, and learns; the trainer knows nothing else about it.

    Subclasses register their networks as submodules (so module parameters and targets are
    checkpointed by `checkpoint_state`), list their optimizers in `self.optimizers`, and keep any
    other state they need to resume exactly (current goal, counters) in `extra_state`.

    Agents that can learn on goal-conditioned envs (dict observations) set `goal_conditioned` and
    take a `goal_fns` argument (latentrl.envs.goal.GoalFunctions: the env's reward and termination
    as functions of goals, for hindsight relabeling); the trainer refuses such envs for the others."""

    goal_conditioned = False

    def __init__(self, action_space, device: str | torch.device = "cpu", seed: int = 0):
        super().__init__()
        self.action_dim = int(np.prod(action_space.shape))
        self.device = torch.device(device)
        self.np_rng = np.random.default_rng(seed)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    # -- acting and storing
    def begin_episode(self, explore: bool) -> None:
        """Called at every episode start (explore=False for evaluation episodes)."""

    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        raise NotImplementedError

    def act_random(self, obs: np.ndarray) -> np.ndarray:
        """Warm-up action, uniform in [-1, 1]. Agents with internal state (a current goal) override
        this to keep that state moving during warm-up."""
        return self.np_rng.uniform(-1.0, 1.0, self.action_dim).astype(np.float32)

    def observe(self, obs, action, reward: float, next_obs, terminated: bool, truncated: bool) -> None:
        raise NotImplementedError

    # -- learning
    def update(self, step: int) -> dict[str, torch.Tensor | float]:
        """One learning step; returns metrics keyed by namespace ('loss/critic', 'goal/distance', ...)."""
        raise NotImplementedError

    def buffers(self) -> dict[str, ReplayBuffer]:
        """Every replay buffer the agent owns (checkpointed in their own file)."""
        return {}

    def images(self) -> dict[str, np.ndarray]:
        """Images for TensorBoard at evaluation time, name -> CHW uint8/float array (e.g. reconstructions)."""
        return {}

    # -- checkpointing
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def checkpoint_state(self) -> dict:
        return {
            "modules": self.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "np_rng": self.np_rng.bit_generator.state,
            "extra": self.extra_state(),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state["modules"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.np_rng.bit_generator.state = state["np_rng"]
        self.load_extra_state(state["extra"])

    # -- helpers shared by agents
    def obs_tensor(self, obs):
        """One observation -> a batch of one on the agent's device (dtype kept: pixels stay uint8; a
        dict observation gives a dict of such tensors)."""
        return map_obs(lambda o: torch.as_tensor(np.asarray(o), device=self.device).unsqueeze(0), obs)
