"""Build one environment from the `env` config: gymnasium.make plus our wrappers.

Agents always act in [-1, 1]^n; RescaleAction maps that onto the env's own bounds (CarRacing's
gas and brake live in [0, 1]). Pixel observations come out as uint8 channels-first arrays."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
from omegaconf import DictConfig, OmegaConf

from latentrl.config import ConfigError
from latentrl.envs.dmc import make_dmc
from latentrl.envs.goal import is_goal_space
from latentrl.envs.maze import is_maze, make_maze
from latentrl.envs.wrappers import ActionRepeat, FrameStack, PixelPreprocess

os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo rendering; a user's choice wins


def make_env(env_cfg: DictConfig, render_mode: str | None = None) -> gym.Env:
    if env_cfg.id == "dmc":  # DeepMind Control Suite: our adapter, then the same wrappers (envs/dmc.py)
        return make_dmc(env_cfg, render_mode)
    kwargs = OmegaConf.to_container(env_cfg.kwargs, resolve=True) if env_cfg.get("kwargs") else {}
    if env_cfg.get("max_episode_steps"):
        kwargs["max_episode_steps"] = int(env_cfg.max_episode_steps)
    if render_mode:
        kwargs["render_mode"] = render_mode
    try:
        env = make_maze(env_cfg, kwargs) if is_maze(env_cfg.id) else gym.make(env_cfg.id, **kwargs)
    except gym.error.Error as e:
        raise ConfigError(f"env.id='{env_cfg.id}' could not be made ({e}); pick one of conf/env/*.yaml") from None
    if not isinstance(env.action_space, gym.spaces.Box):
        raise ConfigError(f"env.id='{env_cfg.id}' has a {type(env.action_space).__name__} action space; "
                          "latentrl agents need continuous (Box) actions")
    ones = np.ones(env.action_space.shape, dtype=np.float32)
    env = gym.wrappers.RescaleAction(env, -ones, ones)
    if is_goal_space(env.observation_space) and (env_cfg.pixels or env_cfg.action_repeat > 1):
        raise ConfigError(f"{env_cfg.id} is goal-conditioned (dict observations): set env.pixels=false and "
                          "env.action_repeat=1 (hindsight relabeling recomputes one env step's reward)")
    if env_cfg.pixels:
        shape = env.observation_space.shape
        if len(shape) != 3:
            raise ConfigError(f"env.pixels=true but {env_cfg.id} observations have shape {shape}: set env.pixels=false")
    elif env_cfg.frame_stack > 1 or env_cfg.resize or env_cfg.grayscale:
        raise ConfigError("env.frame_stack/resize/grayscale apply to pixel envs only: set env.pixels=true or drop them")
    # order: rescale -> repeat -> preprocess -> stack. Repeat sits inside the pixel wrappers so that
    # preprocessing runs once per agent step and stacked frames are `action_repeat` env frames apart
    # (the motion signal the stack exists for), not consecutive raw frames.
    if env_cfg.action_repeat > 1:
        env = ActionRepeat(env, env_cfg.action_repeat, lazy_render=env_cfg.get("lazy_render", True))
    if env_cfg.pixels:
        env = PixelPreprocess(env, env_cfg.resize, env_cfg.grayscale)
        if env_cfg.frame_stack > 1:
            env = FrameStack(env, env_cfg.frame_stack)
    return env


def episode_seed(seed: int, episode: int, stream: int = 0, env_index: int = 0) -> int:
    """Seed of one episode's reset. Seeding every reset explicitly makes episodes replayable:
    a resumed run rebuilds its env mid-episode by replaying that episode's actions. Sub-env
    `env_index` of a vector env has a seed stream of its own; sub-env 0's is a single env's."""
    entropy = [seed, stream, episode] + ([env_index] if env_index else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def is_pixel_space(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3
