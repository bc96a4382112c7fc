"""The trainer's training envs: one env, or `env.num_envs` sub-envs through gymnasium's vector API.

`TrainEnvs` gives the trainer one interface for both, per sub-env: reset one sub-env with its own
seed, step all of them at once, and rebuild each one's running episode on resume by replaying its
actions from its seeded reset. With num_envs=1 it drives the single env exactly as before (no
vector API, no subprocess); with more it drives a SyncVectorEnv (state envs: stepping is cheap,
processes would cost more than they save) or an AsyncVectorEnv (pixel envs: rendering and physics
run in parallel worker processes), as `env.vector_mode` says.

The vector env never resets on its own (autoreset disabled): every episode starts from an explicit
seeded reset, which is what makes a sub-env's episodes replayable and the same as a single env's
run with the same seeds."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from omegaconf import DictConfig

from latentrl.envs.make_env import make_env


class Replayable(gym.Wrapper):
    """The outermost wrapper of sub-env `index`: `replay_episode(plans)` rebuilds this sub-env's
    running episode from plans[index] = (seed, actions). Called on every sub-env at once through
    the vector env's `call`, so it works the same inside async worker processes."""

    def __init__(self, env: gym.Env, index: int):
        super().__init__(env)
        self.index = index

    def replay_episode(self, plans: list):
        return replay_episode(self.env, *plans[self.index])


def replay_episode(env: gym.Env, seed: int, actions) -> np.ndarray:
    """Reset `env` with the episode's seed and step its actions; -> the observation reached."""
    obs, _ = env.reset(seed=seed)
    for action in actions:
        obs, *_ = env.step(action)
    return obs


def _sub_env(env_cfg: DictConfig, index: int, worker: bool):
    """Sub-env factory (pickled into async workers). A worker uses one torch thread: its only torch
    work is resizing frames, and N workers with several threads each would fight for the cores.
    It ignores SIGINT/SIGTERM (Ctrl-C and SLURM signal every process of the job): the trainer stops
    at a safe point, checkpoints and closes it; a worker whose parent died exits on its closed pipe.
    AsyncVectorEnv also calls the factory once in the trainer's own process (to read the spaces): there
    the signals stay the trainer's."""
    builder = os.getpid()

    def make():
        if worker and os.getpid() != builder:
            import signal

            import torch

            torch.set_num_threads(1)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        return Replayable(make_env(env_cfg), index)
    return make


def vector_mode(env_cfg: DictConfig) -> str:
    """sync or async: `env.vector_mode` (validated in config.py), auto meaning async for pixel envs
    and sync for states."""
    mode = env_cfg.get("vector_mode", "auto")
    return ("async" if env_cfg.pixels else "sync") if mode == "auto" else mode


def info_row(infos: dict, i: int) -> dict:
    """Sub-env i's step info out of a vector env's batched info (keys with a `_key` mask)."""
    return {k: v[i] for k, v in infos.items() if not k.startswith("_") and infos.get(f"_{k}", np.ones(i + 1))[i]}


class TrainEnvs:
    """`num` training envs stepped together; observations, rewards and flags come back per sub-env."""

    def __init__(self, env_cfg: DictConfig, num: int):
        self.num = int(num)
        if self.num == 1:
            self.env = make_env(env_cfg)
            self.observation_space, self.action_space = self.env.observation_space, self.env.action_space
            return
        mode = vector_mode(env_cfg)
        fns = [_sub_env(env_cfg, i, worker=mode == "async") for i in range(self.num)]
        if mode == "async":
            self.env = AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
        else:
            self.env = SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
        self.observation_space = self.env.single_observation_space
        self.action_space = self.env.single_action_space

    def reset(self, seeds: dict[int, int]) -> dict[int, np.ndarray]:
        """Reset the sub-envs named in `seeds` (index -> seed); -> index -> first observation. The
        first reset names them all (a vector env resets a subset only once every sub-env has an
        observation)."""
        if self.num == 1:
            return {0: self.env.reset(seed=seeds[0])[0]}
        mask = np.zeros(self.num, dtype=bool)
        mask[list(seeds)] = True
        options = None if mask.all() else {"reset_mask": mask}
        obs, _ = self.env.reset(seed=[seeds.get(i) for i in range(self.num)], options=options)
        return {i: obs[i] for i in seeds}

    def step(self, actions: list[np.ndarray]) -> list[tuple]:
        """One step of every sub-env -> per sub-env (next_obs, reward, terminated, truncated, info)."""
        if self.num == 1:
            return [self.env.step(actions[0])]
        obs, rewards, terminated, truncated, infos = self.env.step(np.stack(actions))
        return [(obs[i], rewards[i], terminated[i], truncated[i], info_row(infos, i)) for i in range(self.num)]

    def replay(self, plans: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        """Rebuild every sub-env's running episode from (seed, actions so far); -> its observations."""
        if self.num == 1:
            return [replay_episode(self.env, *plans[0])]
        return list(self.env.call("replay_episode", plans))

    def close(self) -> None:
        self.env.close()
