"""The interface between the trainer and every agent."""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
import torch.nn as nn

from latentrl.buffers import ReplayBuffer
from latentrl.envs.goal import map_obs

log = logging.getLogger("latentrl")


class Agent(nn.Module):
    """An agent acts, stores what it sees, and learns; the trainer knows nothing else about it.

    Subclasses register their networks as submodules (so module parameters and targets are
    checkpointed by `checkpoint_state`), list their optimizers in `self.optimizers`, and keep any
    other state they need to resume exactly (current goal, counters) in `extra_state`.

    Agents that can learn on goal-conditioned envs (dict observations) set `goal_conditioned` and
    take a `goal_fns` argument (latentrl.envs.goal.GoalFunctions: the env's reward and termination
    as functions of goals, for hindsight relabeling); the trainer refuses such envs for the others.

    Agents that can learn from several sub-envs at once (env.num_envs > 1) set `vector_envs`, take a
    `num_envs` argument (one replay stream per sub-env), accept `observe(..., env_index=i)` and act on
    a batch with `act_batch`; the trainer refuses num_envs > 1 for the others (agents with
    per-episode state, like goal_hrl's goal windows)."""

    goal_conditioned = False
    vector_envs = False

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

    def act_batch(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        """Actions (N, A) for a batch of N observations, one per sub-env (vector_envs agents)."""
        return np.stack([self.act(o, explore) for o in obs])

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

    def eval_metrics(self) -> dict[str, float]:
        """Metrics the agent gathered while acting in the evaluation episodes since the last call,
        logged beside eval/return_mean (goal_hrl: how its windows reach their goals)."""
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

    def batch_tensor(self, obs):
        """A batch of observations (N, ...) -> tensors on the agent's device, dtype kept."""
        return map_obs(lambda o: torch.as_tensor(np.asarray(o), device=self.device), obs)

    def compile_networks(self, *modules: nn.Module) -> bool:
        """agent.compile=true: torch.compile each module in place (nn.Module.compile keeps parameter
        names, so checkpoints do not change). Where compiling cannot work on this device (no C++
        compiler for CPU kernels, no Triton for CUDA ones, an unsupported platform) a tiny probe
        fails at start-up and the agent runs eagerly, saying why in one log line, instead of
        failing at its first update. Returns whether the modules are compiled."""
        reason = compile_unavailable(self.device.type)
        if reason:
            log.warning("agent.compile=true: running without torch.compile on %s (%s)", self.device, reason)
            return False
        for module in modules:
            module.compile()
        # a graph dynamo cannot compile later (a new shape or mode) runs eagerly instead of stopping the run
        torch._dynamo.config.suppress_errors = True
        log.info("agent.compile=true: torch.compile on %s for %d networks (the first updates compile them)",
                 self.device, len(modules))
        return True


@functools.lru_cache(maxsize=None)
def compile_unavailable(device_type: str) -> str | None:
    """Why torch.compile cannot run on this device type, or None when a tiny forward and backward
    compiles and runs. Torch's RNG streams are left as they were."""
    try:
        with torch.random.fork_rng(devices=[] if device_type != "cuda" else None):
            net = nn.Linear(4, 4).to(device_type)
            torch.compile(net)(torch.ones(2, 4, device=device_type)).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means the same thing: run eagerly
        while e.__cause__ is not None:  # the backend's own error says why, not dynamo's wrapper around it
            e = e.__cause__
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return f"{type(e).__name__}: {lines[0].strip() if lines else 'no message'}"
    return None
