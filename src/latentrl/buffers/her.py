"""Hindsight experience replay (Andrychowicz et al. 2017) for goal-conditioned envs, "future" strategy.

A share of each sampled batch gets, in place of the episode's desired goal, a goal the agent
actually achieved later in the same episode: the achieved goal of an observation drawn uniformly
from the transition's next observation to the episode's last (as SB3's HerReplayBuffer draws it:
relabel_fraction 0.8 is its n_sampled_goal=4). Reward and termination of those transitions are
recomputed with the env's own functions on (achieved goal of the next observation, new goal), so a
relabelled success terminates exactly as the env would have ended the episode there.

The desired goal is replaced in both obs and next_obs: the goal is constant within an episode, and
the critic's bootstrap target must be conditioned on the same goal as its prediction."""

from __future__ import annotations

import numpy as np
import torch

from latentrl.buffers.replay import ReplayBuffer
from latentrl.envs.goal import GoalFunctions


def relabel_future(batch: dict, replay: ReplayBuffer, goal_fns: GoalFunctions, fraction: float) -> dict:
    """Relabel `fraction` of a batch from `replay.gather` in place (dict observations); adds
    batch["goal_relabeled"] (bool per row) and batch["goal_idx"] (the slot each new goal comes from, -1 if kept).
    Draws from the replay's own RNG, so a resumed run relabels exactly as an uninterrupted one."""
    idx = batch["idx"]
    rows = np.flatnonzero(replay.rng.random(len(idx)) < fraction)
    goal_idx = np.full(len(idx), -1, dtype=np.int64)
    if len(rows):
        goal_idx[rows] = replay.sample_future(idx[rows])
        goal = replay.obs["achieved_goal"][goal_idx[rows]]
        reached = replay.obs["achieved_goal"][replay.next_idx(idx[rows])]
        device = batch["reward"].device
        t_rows = torch.as_tensor(rows, device=device)
        new_goal = torch.as_tensor(goal, device=device, dtype=batch["obs"]["desired_goal"].dtype)
        batch["obs"]["desired_goal"][t_rows] = new_goal
        batch["next_obs"]["desired_goal"][t_rows] = new_goal
        batch["reward"][t_rows] = torch.as_tensor(goal_fns.reward(reached, goal), device=device)
        batch["terminated"][t_rows] = torch.as_tensor(goal_fns.terminated(reached, goal), device=device,
                                                      dtype=batch["terminated"].dtype)
    batch["goal_relabeled"] = torch.as_tensor(goal_idx >= 0, device=batch["reward"].device)
    batch["goal_idx"] = goal_idx
    return batch
