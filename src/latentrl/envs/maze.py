"""gymnasium-robotics mazes (`env=pointmaze`, `env=antmaze`): long-horizon, goal-conditioned tasks.

The config names a family (`env.id`: PointMaze | AntMaze), a layout (`env.map`) and a reward
(`env.reward`); the gymnasium id follows from them: PointMaze_<Map>[Dense]-v3, AntMaze_<Map>[Dense]-v5.
Every reset draws a start and a goal cell from the env's own seeded RNG (so training episodes get
fresh goals and evaluation episodes, reset with fixed seeds, the same goals every time).
gymnasium_robotics is imported only here: importing it re-registers some of gymnasium's old v2/v3
MuJoCo ids, which no other env should depend on."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from omegaconf import DictConfig

from latentrl.config import ConfigError

VERSIONS = {"PointMaze": "v3", "AntMaze": "v5"}  # the families env.id may name
MAPS = {"umaze": "UMaze", "medium": "Medium", "large": "Large"}
REWARDS = ("sparse", "dense")


def is_maze(env_id: str) -> bool:
    return env_id in VERSIONS


def maze_id(family: str, map_name, reward) -> str:
    """The gymnasium id of a maze, or ConfigError naming the key to fix."""
    if map_name not in MAPS:
        raise ConfigError(f"env.map={map_name!r} is not a {family} layout: set env.map to one of {', '.join(MAPS)}")
    if reward not in REWARDS:
        raise ConfigError(f"env.reward={reward!r} is unknown: set env.reward to one of {', '.join(REWARDS)}")
    return f"{family}_{MAPS[map_name]}{'Dense' if reward == 'dense' else ''}-{VERSIONS[family]}"


def make_maze(env_cfg: DictConfig, kwargs: dict) -> gym.Env:
    env_id = maze_id(env_cfg.id, env_cfg.get("map"), env_cfg.get("reward"))
    # the package prints a notice about its Adroit envs on import (one stderr line, unrelated to mazes)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import gymnasium_robotics  # noqa: F401  (registers the maze ids)
    except ImportError:
        raise ConfigError(f"env.id={env_cfg.id} needs the gymnasium-robotics package: pip install -e . "
                          "(it is a latentrl dependency) or pip install gymnasium-robotics") from None
    return gym.make(env_id, **kwargs)


@dataclass
class MazeLayout:
    """A maze's wall map and the transform from its (x, y) coordinates to pixels of a picture of it
    (for drawing landmarks and plans; gymnasium-robotics' Maze: cell (row, col) has its centre at
    x = (col + 0.5) * scaling - x_center, y = y_center - (row + 0.5) * scaling)."""

    walls: np.ndarray  # (rows, cols) bool, True where a wall block stands
    scaling: float  # metres per cell
    x_center: float
    y_center: float

    @classmethod
    def of(cls, env: gym.Env) -> "MazeLayout | None":
        """The layout of a gymnasium-robotics maze env (wrapped or not); None for any other env."""
        maze = getattr(env.unwrapped, "maze", None)
        if maze is None or not hasattr(maze, "maze_map"):
            return None
        walls = np.array([[cell == 1 for cell in row] for row in maze.maze_map], dtype=bool)
        return cls(walls, float(maze.maze_size_scaling), float(maze.x_map_center), float(maze.y_map_center))

    def to_pixel(self, xy: np.ndarray, cell_px: int) -> np.ndarray:
        """(n, 2) maze coordinates -> (n, 2) pixel coordinates (x right, y down) at cell_px per cell."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        col = (xy[:, 0] + self.x_center) / self.scaling
        row = (self.y_center - xy[:, 1]) / self.scaling
        return np.stack([col, row], 1) * cell_px
