"""Latent goal-conditioned hierarchical RL (seed: latent_goal_hrl.md).

Two SAC levels share one observation encoder (with `low.own_encoder` the worker reads an encoder of
its own, trained only by its critics as sac's is, and the shared one serves the goal machinery):

- a **goal encoder** E(s) = tanh(LN(W h(s))) on top of the encoder trunk h(s), trained by
  reconstruction (RIG-style autoencoder: MLP decoder for vectors, deconv decoder for pixels) and
  by the prediction loss of the goal transition model; an EMA copy of it gives rewards, HER goals
  and model targets so they do not chase themselves;
- a **low level** pi(a|s,g), Q(s,a,g) (SACCore over [h(s), g], or with `low.goal_input=offset` over
  [h(s), (g - E(s)) / goal_scale], HIRO's relative goal) rewarded for reaching the goal:
  r = -||E(s')-g||^2 / d, cos(E(s'), g) (Director), an InfoNCE critic's similarity, or reach (SoRB:
  -1 per step until E(s') is within a radius of g, which ends the goal's episode, so the value
  counts steps, as graph planning reads it); trained on
  replay with HER "future" relabeling (goals = EMA encodings of observations up to her_horizon steps
  later, at sample time). Where the env reward matters too (`low.extrinsic_weight` > 0), the worker
  either learns the weighted sum in one critic, or (`low.split_critics`) the env return and the goal
  return in two critics with their own discounts, its actor maximising Q_env + w Q_goal (Q_goal
  rescaled to Q_env's magnitude): on CarRacing the summed reward stopped the car at every weight tried;
- a **goal transition model** f(g_t, h_t, a_t) -> (g_{t+1}, h_{t+1}), trained on multi-step
  rollouts of the real actions (as it is used): its error shapes the latent space (auxiliary loss) and it plans: the high level proposes candidates, f rolls each out k steps
  under the low-level policy, and the one predicted most reachable (traded off against Q_high) wins;
- optionally an **inverse dynamics** head (ICM) predicting a_t from the online goals (g_t, g_{t+1})
  (`model.inverse_weight` > 0): where the observation changes whatever the agent does (CarRacing's
  scrolling track), it pulls the goal space toward what the actions change, so goals can be steered to;
- a **high level** (SACCore over h(s), squashed actions u in [-1,1]^d) choosing a goal every k
  steps, trained on the extrinsic reward summed over the window, with HAC's hindsight action
  relabeling (the goal actually reached replaces the proposed one) so its off-policy data stays
  valid while the low level changes, and HAC's subgoal testing as a penalty: a window whose goal
  was missed costs `reach_penalty` x the miss distance (with `normalize_penalty`, counted in k-step
  motions and priced in spreads of the window reward), so the manager learns to propose goals the
  worker can reach. Goals are relative by default, as in HIRO: g = clip(E(s) + goal_scale * u, -1, 1),
  so even an untrained, high-entropy manager proposes goals near states the worker can reach
  (absolute goals g = u are the alternative); goal_scale follows the measured k-step motion of the
  latent, so a goal's reach means "about one window's travel" whatever the encoder's scale. A window
  succeeds when it ends closer to its goal than `success_ratio` x where it started.

One update() computes every loss that touches the encoder on the same batch and takes one
backward pass: on a CPU the encoder forward is the cost that matters.

On a goal-conditioned env (env=pointmaze, antmaze) the encoder reads the observation and the task's
desired goal, so the manager proposes latent subgoals conditioned on the task goal while the worker
reaches latent subgoals as anywhere else; the manager's windows also get HER on the task goal
(`high.task_relabel_fraction`: goals achieved later in the episode, the window scored by the env's
reward where it ended, as HAC's hindsight goal transitions).

Graph planning (`agent.planning.method=graph`, goal-conditioned envs only; SoRB/DHRL): every
`planning.graph.rebuild_every` env steps, landmarks are picked from replay by farthest-point sampling
over EMA latents, the worker's value is fitted to the env steps it stands for, edges longer than
`max_edge_steps` are dropped and all shortest paths are computed (agents/landmarks.py). At each window
the route from the current state to the landmark nearest the task goal (in env goal space) gives the
subgoal: its first landmark. Without a route, or once the target landmark is within one window, the
manager proposes the goal as without planning. See `rebuild_graph` and `graph_route`.
"""

from __future__ import annotations

import contextlib
import copy
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentrl.agents.base import Agent
from latentrl.agents.landmarks import (LandmarkGraph, StepsFromValue, draw_plan, farthest_point_sampling, plan_route,
                                       rank_correlation, shortest_paths)
from latentrl.agents.networks import PixelDecoder, TwinCritic, mlp, random_shift, soft_update
from latentrl.agents.sac import SACCore
from latentrl.buffers import ReplayBuffer
from latentrl.buffers.her import relabel_future
from latentrl.config import ConfigError
from latentrl.envs.goal import (GoalFunctions, describe_space, is_goal_space, map_obs, obs_layout, policy_input_dim,
                                vector_input)
from latentrl.envs.maze import MazeLayout

REWARDS = ("distance", "cosine", "direction", "contrastive", "reach")
CORRECTIONS = ("hac", "none")
GOAL_SPACES = ("relative", "absolute")
MOTION_STATS = ("rms", "median")
MOTION_SOURCES = ("replay", "recent")
GOAL_SPREADS = ("std", "iqr")
GOAL_INPUTS = ("absolute", "offset")
OFFSET_CLIP = 10.0  # low.goal_input=offset: bound of the worker's goal offset, in goal_scale units
PLAN_METHODS = ("sample", "cem", "graph")
GRAPH_DEFAULTS = {"n_landmarks": 100, "sample_size": 2000, "rebuild_every": 2000, "max_edge_steps": 20.0,
                  "fit_pairs": 2048, "fit_horizon": None, "steps": "fit"}
GRAPH_STEPS = ("fit", "discount")


# ----------------------------------------------------------------------------- goal-reaching rewards
def goal_distance(achieved: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Mean squared distance per goal dimension (the seed's ||E(s)-g||^2 divided by d, so reward
    scale and the success threshold do not depend on goal_dim)."""
    return (achieved - goal).pow(2).mean(-1)


def robust_std(x: torch.Tensor) -> torch.Tensor:
    """Interquartile range / 1.349: the std of Gaussian data, unmoved by a heavy tail."""
    q = torch.quantile(x.float(), torch.tensor([0.25, 0.75], device=x.device))
    return (q[1] - q[0]) / 1.349


def distance_reward(achieved: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    return -goal_distance(achieved, goal)


def cosine_reward(achieved: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Director's worker reward: direction matters, scale does not."""
    return F.cosine_similarity(achieved, goal, dim=-1, eps=1e-6)


def direction_reward(start: torch.Tensor, achieved: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Cosine between the step's latent motion (achieved - start) and the way to the goal (goal - start):
    +1 for a step straight at the goal, whatever its size. Unlike -||achieved - goal||^2, whose expectation
    under motion the worker cannot aim falls by the motion's squared size, it does not tax moving: on
    CarRacing a step that gains a track tile moves the latent 3-9x a median step (median over such steps),
    and the distance reward's progress on the largest quarter of steps is negative: it pays for standing still."""
    return F.cosine_similarity(achieved - start, goal - start, dim=-1, eps=1e-8)


class ContrastiveReward(nn.Module):
    """InfoNCE critic over (achieved, goal) latents: score = <phi(z), psi(g)> / temperature.
    Positives are (E(s_{t+1}), E(s_{t+j})) pairs of the same episode, negatives the other goals of the
    batch, so the score learns temporal reachability (contrastive RL). The reward of a pair is its
    similarity <phi, psi> in [-1, 1] (the logit times the temperature): bounded like the cosine reward,
    and unlike the batch log-softmax (which spans -20..log B) it does not depend on the other goals
    sampled with it."""

    def __init__(self, goal_dim: int, hidden_dims=(256,), embed_dim: int = 64, temperature: float = 0.1):
        super().__init__()
        self.phi = mlp(goal_dim, hidden_dims, embed_dim)
        self.psi = mlp(goal_dim, hidden_dims, embed_dim)
        self.temperature = temperature

    def embed(self, achieved: torch.Tensor, goal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.phi(achieved), dim=-1), F.normalize(self.psi(goal), dim=-1)

    def logits(self, achieved: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        a, g = self.embed(achieved, goal)
        return a @ g.T / self.temperature  # (B achieved, B goals)

    def loss(self, achieved: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(achieved, goal), torch.arange(len(goal), device=goal.device))

    def reward(self, achieved: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        a, g = self.embed(achieved, goal)
        return (a * g).sum(-1)


# ----------------------------------------------------------------------------- networks
class GoalEncoder(nn.Module):
    """Encoder trunk h(s) (from the `encoder` config group) plus a tanh-bounded goal head g = E(s)."""

    def __init__(self, trunk: nn.Module, goal_dim: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential(nn.Linear(trunk.out_dim, goal_dim), nn.LayerNorm(goal_dim), nn.Tanh())

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs)
        return h, self.head(h)


class VectorDecoder(nn.Module):
    def __init__(self, goal_dim: int, obs_shape: tuple, hidden_dims=(256, 256)):
        super().__init__()
        self.net = mlp(goal_dim, hidden_dims, int(np.prod(obs_shape)))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.net(g)


class GoalTransitionModel(nn.Module):
    """f(g_t, h_t, a_t) -> (g_{t+1}, h_{t+1}) as residuals. The seed's f predicts g_{t+1} from
    (g_t, s_t, a_t); predicting the next state features h too is what lets it roll out k steps in
    latent space under the low-level policy pi(a | h, g) without seeing observations."""

    def __init__(self, goal_dim: int, feat_dim: int, action_dim: int, hidden_dims=(256, 256)):
        super().__init__()
        self.goal_dim = goal_dim
        self.net = mlp(goal_dim + feat_dim + action_dim, hidden_dims, goal_dim + feat_dim)

    def forward(self, g: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dg, dh = self.net(torch.cat([g, h, a], -1)).split([self.goal_dim, h.shape[-1]], -1)
        return g + dg, h + dh


def _prefixed(metrics: dict, level: str) -> dict:
    """'loss/critic' -> 'loss/low_critic': SACCore's metric names, one namespace per level."""
    return {k.replace("/", f"/{level}_", 1): v for k, v in metrics.items()}


def typical_motion(msq: torch.Tensor, stat: str) -> torch.Tensor:
    """The k-step motion of a set of windows, given each one's mean squared motion per dim: their RMS
    (stat=rms) or the median window's RMS (stat=median, blind to rare huge windows)."""
    return (msq.median() if stat == "median" else msq.mean()).sqrt()


class RunningMean(nn.Module):
    """Bias-corrected exponential running mean of a scalar (a latent's motion, a reward's spread, a
    loss's magnitude); buffers, so it is checkpointed with the networks. nan before the first value."""

    def __init__(self, rate: float = 0.01):
        super().__init__()
        self.rate = float(rate)
        self.register_buffer("sum", torch.zeros(()))
        self.register_buffer("weight", torch.zeros(()))

    @torch.no_grad()
    def update(self, value: torch.Tensor) -> None:
        self.sum.mul_(1 - self.rate).add_(self.rate * value.detach().float())
        self.weight.mul_(1 - self.rate).add_(self.rate)

    @property
    def ready(self) -> bool:
        return bool(self.weight > 0)

    @property
    def value(self) -> torch.Tensor:
        return self.sum / self.weight


class RecentMotion(nn.Module):
    """The k-step motion of the last `windows` training windows as they were collected (ring buffer of
    their mean squared motion per dim; buffers, so checkpointed): it follows the current policy's speed,
    where a running mean over replayed windows lags it while old, slow windows fill the buffer.
    value: the RMS (stat=rms) or the median window's RMS (stat=median); nan before the first window."""

    def __init__(self, windows: int, stat: str):
        super().__init__()
        self.stat = stat
        self.register_buffer("msq", torch.zeros(int(windows)))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def add(self, msq: torch.Tensor) -> None:
        self.msq[int(self.count) % len(self.msq)] = msq.detach().float()
        self.count += 1

    @property
    def ready(self) -> bool:
        return bool(self.count > 0)

    @property
    def value(self) -> torch.Tensor:
        filled = self.msq[: min(int(self.count), len(self.msq))]
        if not len(filled):
            return torch.tensor(float("nan"), device=self.msq.device)
        return typical_motion(filled, self.stat)


class GoalGatedActor(nn.Module):
    """The worker's actor with its goal input multiplied by `mix` (a buffer in [0, 1], checkpointed):
    at 0 it acts on its features alone, as sac's actor does, and every caller (acting, the critics'
    targets, the actor's own loss) sees the same goal-blind policy; the critics still read the goal.
    low.goal_phase_return raises mix from 0 to 1 once the worker drives (see GoalHRL.goal_mix)."""

    def __init__(self, actor: nn.Module, goal_dim: int):
        super().__init__()
        self.actor, self.goal_dim = actor, int(goal_dim)
        self.register_buffer("mix", torch.zeros(()))

    def forward(self, feat: torch.Tensor, *args, **kwargs):
        n_feat = feat.shape[-1] - self.goal_dim
        return self.actor(torch.cat([feat[..., :n_feat], feat[..., n_feat:] * self.mix], -1), *args, **kwargs)


# ----------------------------------------------------------------------------- the agent
class GoalHRL(Agent):
    goal_conditioned = True

    def __init__(self, encoder: nn.Module, obs_space: gym.spaces.Box, action_space: gym.spaces.Box,
                 device: str = "cpu", seed: int = 0, goal_dim: int = 64, k: int = 10, reward: str = "distance",
                 lr: float = 3e-4, batch_size: int = 256, buffer_size: int = 1_000_000, encoder_tau: float = 0.01,
                 augment_pad: int = 4, actor_update_every: int = 1, success_ratio: float = 0.5,
                 low=None, high=None, model=None, decoder=None, contrastive=None, planning=None,
                 goal_fns: GoalFunctions | None = None):
        super().__init__(action_space, device, seed)
        self.seed = int(seed)
        low, high, model = dict(low or {}), dict(high or {}), dict(model or {})
        decoder, contrastive, planning = dict(decoder or {}), dict(contrastive or {}), dict(planning or {})
        self._validate(goal_dim, k, reward, low, high, model, planning)
        graph_cfg = self._validate_graph(planning, obs_space, reward)
        self.goal_dim, self.k, self.reward_type = int(goal_dim), int(k), reward
        self.batch_size, self.actor_update_every = int(batch_size), int(actor_update_every)
        self.encoder_tau, self.success_ratio = float(encoder_tau), float(success_ratio)
        self.is_pixel = bool(getattr(encoder, "is_pixel", False))
        self.augment_pad = int(augment_pad) if self.is_pixel else 0
        # what the decoder reconstructs: the observation, or what the encoder reads of a goal env's dict
        self.obs_shape = (policy_input_dim(obs_space),) if is_goal_space(obs_space) else tuple(obs_space.shape)
        feat_dim, d, n_act = encoder.out_dim, self.goal_dim, self.action_dim

        # goal encoder, its EMA copy, decoder, goal transition model, optional contrastive critic
        self.goal_encoder = GoalEncoder(encoder, d)
        self.goal_encoder_target = copy.deepcopy(self.goal_encoder).requires_grad_(False)
        self.decoder = (PixelDecoder(d, self.obs_shape, tuple(decoder.get("channels", (128, 64, 32)))) if self.is_pixel
                        else VectorDecoder(d, self.obs_shape, tuple(decoder.get("hidden_dims", (256, 256)))))
        self.recon_weight = float(decoder.get("weight", 1.0))
        self.recon_batch = decoder.get("batch_size") or self.batch_size
        self.f = GoalTransitionModel(d, feat_dim, n_act, tuple(model.get("hidden_dims", (256, 256))))
        self.f_weight = float(model.get("aux_weight", 1.0))
        self.f_horizon = int(model.get("horizon") or self.k)  # planning rolls f out k steps: train it so
        self.f_batch = int(model.get("rollout_batch", 32))
        # optional inverse dynamics head a_t <- (g_t, g_t+1); off (0) builds none, so runs and checkpoints
        # without it stay exactly as they were
        self.inverse_weight = float(model.get("inverse_weight", 0.0))
        self.inverse = (mlp(2 * d, tuple(model.get("inverse_hidden_dims", (256,))), n_act)
                        if self.inverse_weight > 0 else None)
        self.contrastive = (ContrastiveReward(d, tuple(contrastive.get("hidden_dims", (256,))),
                                              int(contrastive.get("embed_dim", 64)),
                                              float(contrastive.get("temperature", 0.1)))
                            if reward == "contrastive" else None)
        # low.own_encoder: the worker (actor, both critics) reads features of an encoder of its own, a
        # copy of the trunk trained only by the worker's critics, as sac's is by its critic; the goal
        # encoder is then shaped by reconstruction, f, the inverse head and the manager alone. Shared,
        # the track critic's features are shaped mostly by the goal machinery's ~10x larger losses.
        self.worker_encoder = copy.deepcopy(encoder) if low.get("own_encoder", False) else None
        model_params = [*self.goal_encoder.parameters(), *self.decoder.parameters(), *self.f.parameters()]
        if self.worker_encoder is not None:  # stepped once per update with the rest (see update())
            model_params += list(self.worker_encoder.parameters())
        if self.contrastive is not None:
            model_params += list(self.contrastive.parameters())
        if self.inverse is not None:
            model_params += list(self.inverse.parameters())
        self.model_opt = torch.optim.Adam(model_params, lr=float(model.get("lr", lr)))

        # the two SAC levels; the encoder is in neither critic optimizer: model_opt steps it once per
        # update with the gradients of both critics, reconstruction and f summed
        def sac_core(cfg: dict, in_dim: int, out_dim: int, critic_feat_dim: int | None = None) -> SACCore:
            return SACCore(in_dim, out_dim, tuple(cfg.get("hidden_dims", (256, 256))), float(cfg.get("lr", lr)),
                           float(cfg.get("gamma") or low.get("gamma") or 0.99), float(cfg.get("tau", 0.005)),
                           float(cfg.get("init_temperature", 0.1)), cfg.get("target_entropy"),
                           critic_feat_dim=critic_feat_dim)

        # low.track_critic_reads_goal=false (split_critics): the track critic is Q_env(s, a), blind to the
        # goal. The track return does not change with the goal the manager set, but a critic that reads
        # it fits noise along it, and the actor follows: on CarRacing, with goal weight 0, the worker's
        # actions moved as much with the goal offset as with the state after 2k updates (README).
        self.track_critic_reads_goal = bool(low.get("track_critic_reads_goal", True))
        if not self.track_critic_reads_goal and not low.get("split_critics", False):
            raise ConfigError("agent.low.track_critic_reads_goal=false needs agent.low.split_critics=true (one critic "
                              "of the summed reward must read the goal)")
        if not self.track_critic_reads_goal and planning.get("method", "sample") == "graph":
            raise ConfigError("agent.low.track_critic_reads_goal=false is not supported with "
                              "agent.planning.method=graph (its edge values read the worker's critic on goals)")
        self.low = sac_core(low, feat_dim + d, n_act, None if self.track_critic_reads_goal else feat_dim)
        # split_critics: the worker learns its env (track) return and its goal return in two critics,
        # each with its own discount (a goal lives k steps: goal_gamma ~ 1 - 1/k; the track return
        # keeps low.gamma), and its actor maximises Q_env + w * Q_goal, Q_goal rescaled to Q_env's
        # running magnitude. One critic of the summed reward lets the dense goal term's noise drown
        # the sparse track reward, and discounts goals that change every k steps over 100s of steps.
        self.split_critics = bool(low.get("split_critics", False))
        if self.split_critics:
            if not float(low.get("extrinsic_weight", 0.0)):
                raise ConfigError("agent.low.split_critics=true needs agent.low.extrinsic_weight > 0 "
                                  "(the env-return critic); set it, or split_critics=false")
            if reward == "reach":
                raise ConfigError("agent.low.split_critics=true does not support agent.reward=reach "
                                  "(reaching ends the goal's episode, not the env's); use reward=distance")
            self.goal_gamma = float(low.get("goal_gamma") or 1.0 - 1.0 / max(self.k, 2))
            self.goal_critic = TwinCritic(feat_dim + d, n_act, tuple(low.get("hidden_dims", (256, 256))))
            self.goal_critic_target = copy.deepcopy(self.goal_critic).requires_grad_(False)
            self.goal_critic_opt = torch.optim.Adam(self.goal_critic.parameters(), lr=float(low.get("lr", lr)))
            self.env_q_scale, self.goal_q_scale = RunningMean(), RunningMean()
        # goal_encoder_weight (split_critics): the goal critic's gradient into the shared encoder is
        # scaled so its loss counts at most this x the env critic's (running magnitudes), and the
        # manager's share is then measured against the env critic's loss alone. Unscaled, the goal
        # critic's loss (~20 on CarRacing) and the manager's (capped at the sum) are ~20x the track
        # critic's (~2): the encoder the track critic reads is shaped almost only by goals.
        self.goal_encoder_weight = low.get("goal_encoder_weight")
        if self.goal_encoder_weight is not None:
            self.goal_encoder_weight = float(self.goal_encoder_weight)
            if not self.split_critics or self.goal_encoder_weight < 0:
                raise ConfigError("agent.low.goal_encoder_weight needs agent.low.split_critics=true and a value "
                                  f">= 0 (got {self.goal_encoder_weight}); leave it null otherwise")
            self.env_loss_scale, self.goal_loss_scale = RunningMean(), RunningMean()
        self.low_relabel = float(low.get("relabel_fraction", 0.5))
        self.her_horizon = int(low.get("her_horizon") or self.k)
        self.low_extrinsic = float(low.get("extrinsic_weight", 0.0))
        self.low_reward_scale = float(low.get("reward_scale", 1.0))
        # the goal reward's weight is 0 before env step goal_weight_from and rises linearly to
        # reward_scale over goal_weight_ramp steps: a worker paid to reach goals from the first step
        # learns to sit still on CarRacing (goals of a car that does not move are easy), before the
        # sparse track reward has taught it to drive
        self.goal_weight_from = int(low.get("goal_weight_from", 0))
        self.goal_weight_ramp = int(low.get("goal_weight_ramp", 0))
        if self.goal_weight_from < 0 or self.goal_weight_ramp < 0:
            raise ConfigError("agent.low.goal_weight_from and agent.low.goal_weight_ramp must be >= 0 env steps, "
                              f"got {self.goal_weight_from} and {self.goal_weight_ramp}")
        # low.goal_phase_return (split_critics): a goal-free first phase ended by the worker's own driving
        # rather than by a step count. Until the mean env return of the last goal_phase_episodes training
        # episodes reaches goal_phase_return, the actor reads a zeroed goal and the goal critic's weight in
        # its objective is 0 (the worker acts as sac on the shared features); from the update that sees
        # the mean cross it, goal input and weight rise together over goal_weight_ramp steps. On CarRacing
        # the car starts driving later than sac's on more seeds, and a step gate cannot know when (README).
        self.goal_phase_return = low.get("goal_phase_return")
        self.goal_phase_episodes = int(low.get("goal_phase_episodes", 5))
        if self.goal_phase_return is not None:
            self.goal_phase_return = float(self.goal_phase_return)
            if not self.split_critics:
                raise ConfigError("agent.low.goal_phase_return needs agent.low.split_critics=true (the goal critic "
                                  "learns apart while the actor is goal-blind); set it, or goal_phase_return=null")
            if self.goal_weight_from:
                raise ConfigError("agent.low.goal_phase_return and agent.low.goal_weight_from both set when the goal "
                                  "phase starts: keep one (goal_weight_from=0 with goal_phase_return)")
            if self.goal_phase_episodes < 1:
                raise ConfigError(f"agent.low.goal_phase_episodes must be >= 1, got {self.goal_phase_episodes}")
            self.low.actor = GoalGatedActor(self.low.actor, d)  # same parameters: actor_opt is unchanged
        self.episode_return, self.recent_returns = 0.0, []  # the training episodes' env returns (the gate's)
        self.goal_phase_from: int | None = None  # env step at which the goal phase opened (None: not yet)
        # goal and env rewards each divided by their running batch spread, so neither drowns the other;
        # "goal": the goal reward only, the env reward kept raw as sac sees it (a spread that grows as
        # tile rewards become frequent shrinks every earlier target the track critic learned)
        normalize = low.get("normalize_rewards", True)
        if normalize not in (True, False, "goal"):
            raise ConfigError(f"agent.low.normalize_rewards={normalize!r} is unknown: set it to true (both rewards), "
                              "goal (the goal reward only) or false")
        self.normalize_goal_reward, self.normalize_env_reward = normalize in (True, "goal"), normalize is True
        # the goal reward's spread: std, or iqr (a std blind to a heavy tail; the normalised goal reward
        # is then clipped to +-goal_clip): on CarRacing 1% of goal distances (episode-start zoom) are
        # ~300x the median and set the std, shrinking every typical goal reward ~50x below the track's
        self.goal_spread = low.get("goal_spread", "std")
        # what the worker reads beside its features: the goal itself (absolute), or its offset from
        # the state's own EMA latent in goal_scale units (offset, HIRO's relative goal: at a window's
        # start it is the manager's action u; a goal one window's travel away differs from the state's
        # latent by ~0.02 per dim on CarRacing, which the absolute input hides beside features of ~1)
        self.goal_input = low.get("goal_input", "absolute")
        self.goal_clip = float(low.get("goal_clip", 10.0))
        # reward=reach (SoRB/DHRL): -1 per step until E(s') lies within reach_radius x the k-step latent
        # motion (RMS per dim) of the goal, which ends the goal's episode: the value then counts steps
        self.reach_radius = float(low.get("reach_radius", 0.25))
        self.goal_reward_spread, self.env_reward_spread = RunningMean(), RunningMean()
        self.high = sac_core(high, feat_dim, d)
        self.high_correction = high.get("correction", "hac")
        self.high_relabel = float(high.get("relabel_fraction", 0.5)) if self.high_correction == "hac" else 0.0
        self.goal_fns = goal_fns  # the env's goal reward (goal-conditioned envs only)
        self.task_relabel = float(high.get("task_relabel_fraction", 0.5)) if goal_fns is not None else 0.0
        self.high_reward_scale = float(high.get("reward_scale", 1.0))
        self.reach_penalty = float(high.get("reach_penalty", 1.0))
        # normalize_penalty: a miss is counted in k-step motions and priced in spreads of the window
        # reward (raw, a miss of ~0.03 is ~0.1% of a CarRacing window's track reward: goals go unpriced)
        self.normalize_penalty = bool(high.get("normalize_penalty", False))
        # miss_clip: bound of a normalised miss in k-step motions^2 (CarRacing's episode-start zoom
        # windows miss by ~100 typical travels and set the mean cost at 70-145 window-reward spreads)
        miss_clip = high.get("miss_clip")
        self.miss_clip = None if miss_clip is None else float(miss_clip)
        self.window_reward_spread = RunningMean()
        self.high_batch = int(high.get("batch_size", self.batch_size))
        self.high_update_every = int(high.get("update_every", 1))
        self.high_trains_encoder = bool(high.get("critic_trains_encoder", True))
        self.high_encoder_weight = float(high.get("encoder_weight", 1.0))
        self.low_loss_scale, self.high_loss_scale = RunningMean(), RunningMean()
        # per-step discount of the manager's return (a window of n steps discounts gamma^n): its
        # horizon in env steps then matches the worker's whatever k is
        self.high_gamma = self.high.gamma
        self.relative_goals = high.get("goal_space", "relative") == "relative"
        # reach of a relative goal: fixed, or calibrated to the measured k-step latent motion (a
        # bias-corrected running mean of the RMS per dimension of z_{t+k} - z_t, in buffers so it
        # is checkpointed with the networks)
        self.init_goal_scale = float(high.get("goal_scale", 0.25))
        self.adapt_scale = bool(high.get("adapt_scale", True))
        self.scale_motion_mult = float(high.get("scale_motion_mult", 2.0))
        # rms: sqrt of the batch's mean squared motion; median: the median window's RMS motion, robust to
        # rare huge windows (CarRacing's episode-start zoom moves the latent ~100x a typical window)
        self.motion_stat = high.get("motion_stat", "rms")
        # replay: measured on replayed windows (lags a policy that speeds up); recent: on the last
        # motion_windows training windows as collected
        self.motion_from_replay = high.get("motion_source", "replay") == "replay"
        self.motion = (RunningMean(float(high.get("scale_rate", 0.01))) if self.motion_from_replay
                       else RecentMotion(int(high.get("motion_windows", 200)), self.motion_stat))
        self.optimizers = {**self.low.optimizers("low_"), **self.high.optimizers("high_"), "model": self.model_opt}
        if self.split_critics:
            self.optimizers["low_goal_critic"] = self.goal_critic_opt

        self.n_candidates = int(planning.get("candidates", 8))
        self.plan_method = planning.get("method", "sample")
        self.cem_iterations = int(planning.get("iterations", 3))
        self.cem_elites = int(planning.get("elites", 2))
        self.cem_init_std = float(planning.get("init_std", 0.5))
        self.plan_q_weight = float(planning.get("q_weight", 1.0))
        dist_weight = planning.get("dist_weight")
        self.plan_dist_weight = float(high.get("reach_penalty", 1.0) if dist_weight is None else dist_weight)
        # graph planning (method=graph): landmarks, value->steps fit, shortest paths; rebuilt in update()
        self.graph_planning = self.plan_method == "graph" and self.n_candidates > 0
        self.graph_n = int(graph_cfg["n_landmarks"])
        self.graph_sample_size = int(graph_cfg["sample_size"])
        self.graph_rebuild_every = int(graph_cfg["rebuild_every"])
        self.graph_max_edge = float(graph_cfg["max_edge_steps"])
        self.graph_fit_pairs = int(graph_cfg["fit_pairs"])
        self.graph_fit_horizon = int(graph_cfg["fit_horizon"] or 2 * self.graph_max_edge)
        self.graph_steps = graph_cfg["steps"]
        self.graph: LandmarkGraph | None = None  # checkpointed (extra_state): rebuilt only on schedule
        self.maze_layout = MazeLayout.of(goal_fns.env) if goal_fns is not None else None  # for drawing plans
        self.drawn_plan: dict | None = None  # the route of the last evaluation episode's first window (images())
        self._record_plan = False

        # replay: low level stores every step with what defines the goal it pursued (the manager's
        # action u and the step's age in its window, which locates the window's start observation), so
        # the goal is re-derived with the current EMA encoder at sample time instead of going stale;
        # the high level stores one transition per k-step window (start obs, u, summed reward, length)
        self.replay = ReplayBuffer(buffer_size, *obs_layout(obs_space), n_act, seed=seed,
                                   extras={"goal_action": ((d,), np.float32), "goal_age": ((), np.int64)})
        self.high_replay = ReplayBuffer(max(2, buffer_size // self.k + 2), *obs_layout(obs_space), d,
                                        seed=seed + 1, extras={"steps": ((), np.int64)})

        # acting state, kept apart for training (explore=True) and evaluation episodes
        self.state = {True: self._fresh_state(), False: self._fresh_state()}
        self.pending: dict | None = None  # the open high-level window of the training episode
        self.env_stats: dict[str, list[float]] = {}  # env-time goal/ metrics, emitted by the next update()
        self.eval_stats: dict[str, list[float]] = {}  # window metrics of evaluation episodes, emitted by eval_metrics()
        self.num_updates = 0
        self.eval_windows = 0
        self.eval_episode_windows = 0
        self.to(self.device)

    @staticmethod
    def _validate(goal_dim, k, reward, low, high, model, planning) -> None:
        if reward not in REWARDS:
            raise ConfigError(f"agent.reward={reward!r} is unknown: set agent.reward to one of {', '.join(REWARDS)}")
        if int(k) < 1:
            raise ConfigError(f"agent.k must be >= 1 (env steps per high-level goal), got {k}")
        if int(goal_dim) < 1:
            raise ConfigError(f"agent.goal_dim must be >= 1, got {goal_dim}")
        if float(model.get("inverse_weight", 0.0)) < 0:
            raise ConfigError(f"agent.model.inverse_weight must be >= 0 (0 turns the inverse dynamics loss off), "
                              f"got {model.get('inverse_weight')}")
        for key, value, allowed in (("high.correction", high.get("correction", "hac"), CORRECTIONS),
                                    ("high.goal_space", high.get("goal_space", "relative"), GOAL_SPACES),
                                    ("high.motion_stat", high.get("motion_stat", "rms"), MOTION_STATS),
                                    ("high.motion_source", high.get("motion_source", "replay"), MOTION_SOURCES),
                                    ("low.goal_input", low.get("goal_input", "absolute"), GOAL_INPUTS),
                                    ("low.goal_spread", low.get("goal_spread", "std"), GOAL_SPREADS)):
            if value not in allowed:
                raise ConfigError(f"agent.{key}={value!r} is unknown: set it to one of {', '.join(allowed)}")
        if low.get("goal_input", "absolute") == "offset" and planning.get("method", "sample") == "graph":
            raise ConfigError("agent.low.goal_input=offset is not supported with agent.planning.method=graph "
                              "(its edge values read the worker on landmark goals): use goal_input=absolute")
        if int(high.get("motion_windows", 200)) < 1:
            raise ConfigError(f"agent.high.motion_windows must be >= 1 (training windows the k-step motion is "
                              f"measured over with motion_source=recent), got {high.get('motion_windows')}")
        if float(low.get("goal_clip", 10.0)) <= 0:
            raise ConfigError(f"agent.low.goal_clip must be > 0 (in goal-reward spreads), got {low.get('goal_clip')}")
        for key, value in (("low.relabel_fraction", low.get("relabel_fraction", 0.5)),
                           ("high.relabel_fraction", high.get("relabel_fraction", 0.5)),
                           ("high.task_relabel_fraction", high.get("task_relabel_fraction", 0.5))):
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"agent.{key} must be in [0, 1], got {value}")
        if int(planning.get("candidates", 8)) < 0:
            raise ConfigError(f"agent.planning.candidates must be >= 0 (0 turns planning off), "
                              f"got {planning.get('candidates')}")
        if low.get("own_encoder", False) and int(planning.get("candidates", 8)) > 0:
            raise ConfigError("agent.low.own_encoder=true needs agent.planning.candidates=0: planning rolls the "
                              "worker out on f's features, which are the goal encoder's, not the worker's own")
        method = planning.get("method", "sample")
        if method not in PLAN_METHODS:
            raise ConfigError(f"agent.planning.method={method!r} is unknown: set it to one of {', '.join(PLAN_METHODS)}")
        if method == "cem" and not 1 <= int(planning.get("elites", 2)) <= int(planning.get("candidates", 8)):
            raise ConfigError(f"agent.planning.elites must be between 1 and agent.planning.candidates "
                              f"({planning.get('candidates', 8)}), got {planning.get('elites')}")

    @staticmethod
    def _validate_graph(planning: dict, obs_space: gym.Space, reward: str) -> dict:
        """planning.graph settings with their defaults; method=graph refused where there is no task goal."""
        cfg = {**GRAPH_DEFAULTS, **dict(planning.get("graph") or {})}
        if planning.get("method", "sample") != "graph":
            return cfg
        if not is_goal_space(obs_space):
            raise ConfigError(f"agent.planning.method=graph plans toward the task goal of a goal-conditioned env "
                              f"(env=pointmaze, env=antmaze), and this env has none ({describe_space(obs_space)}): "
                              "use agent.planning.method=sample or cem")
        if cfg["steps"] not in GRAPH_STEPS:
            raise ConfigError(f"agent.planning.graph.steps={cfg['steps']!r} is unknown: set it to one of "
                              f"{', '.join(GRAPH_STEPS)}")
        if cfg["steps"] == "discount" and reward != "reach":
            raise ConfigError(f"agent.planning.graph.steps=discount reads the value of a -1-per-step worker, but "
                              f"agent.reward={reward}: set agent.reward=reach or agent.planning.graph.steps=fit")
        for key, low in (("n_landmarks", 2), ("sample_size", 2), ("rebuild_every", 1), ("fit_pairs", 2)):
            if int(cfg[key]) < low:
                raise ConfigError(f"agent.planning.graph.{key} must be >= {low}, got {cfg[key]}")
        if int(cfg["sample_size"]) < int(cfg["n_landmarks"]):
            raise ConfigError(f"agent.planning.graph.sample_size ({cfg['sample_size']}) must be >= "
                              f"agent.planning.graph.n_landmarks ({cfg['n_landmarks']}): landmarks are picked from it")
        if not float(cfg["max_edge_steps"]) > 0:
            raise ConfigError(f"agent.planning.graph.max_edge_steps must be > 0 (env steps), got {cfg['max_edge_steps']}")
        horizon = cfg["fit_horizon"]
        if horizon is not None and int(horizon) <= float(cfg["max_edge_steps"]):
            raise ConfigError(f"agent.planning.graph.fit_horizon ({horizon}) must exceed max_edge_steps "
                              f"({cfg['max_edge_steps']}): values beyond the fitted pairs read as unreachable "
                              "(null: 2 x max_edge_steps)")
        return cfg

    # ------------------------------------------------------------------ encoding helpers
    def _augment(self, obs: torch.Tensor) -> torch.Tensor:
        return random_shift(obs, self.augment_pad) if self.augment_pad else obs

    @torch.no_grad()
    def target_goals(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, g) of the EMA goal encoder: rewards, HER goals, model targets."""
        return self.goal_encoder_target(obs)

    @property
    def k_step_motion(self) -> torch.Tensor:
        """Running RMS per goal dimension of the EMA latent's motion over a full k-step window (nan
        before the first measurement)."""
        return self.motion.value

    @property
    def goal_scale(self) -> torch.Tensor | float:
        if self.adapt_scale and self.motion.ready:
            return self.scale_motion_mult * self.k_step_motion
        return self.init_goal_scale

    @torch.no_grad()
    def record_motion(self, start: torch.Tensor, end: torch.Tensor) -> None:
        """Fold one batch of replayed full-window (start, end) latents into the k-step motion estimate
        (high.motion_stat: the batch's RMS, or its median window's); motion_source=recent measures
        collected windows instead (_close_window)."""
        if len(start) and self.motion_from_replay:
            msq = goal_distance(end, start)
            self.motion.update(typical_motion(msq, self.motion_stat))

    def goal_from_action(self, g_start: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """High-level action u in [-1,1]^d -> the goal the low level pursues."""
        return (g_start + self.goal_scale * u).clamp(-1.0, 1.0) if self.relative_goals else u

    def action_from_goal(self, g_start: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """Inverse of goal_from_action (clipped): the action that would have proposed `goal` (HAC relabeling)."""
        return ((goal - g_start) / self.goal_scale).clamp(-1.0, 1.0) if self.relative_goals else goal

    # ------------------------------------------------------------------ acting
    @staticmethod
    def _fresh_state() -> dict:
        return {"goal": None, "action": None, "t": 0, "start_dist": 0.0, "start_latent": None}

    def _open_window(self, explore: bool, g_start: torch.Tensor, u: torch.Tensor, goal: torch.Tensor) -> None:
        """Adopt a new goal; its distance from the start latent is what the window's success and
        progress are measured against."""
        s = self.state[explore]
        s["action"], s["goal"], s["t"] = u[0].cpu().numpy(), goal[0].cpu().numpy(), 0
        s["start_dist"] = float(goal_distance(g_start, goal)[0])
        s["start_latent"] = g_start[0].cpu().numpy()

    def begin_episode(self, explore: bool) -> None:
        self.state[explore] = self._fresh_state()
        if explore:
            self.pending = None
        else:
            self.eval_windows = 0  # seeds the planning candidates of each evaluation window
            self.eval_episode_windows = 0  # evaluation windows closed in this episode
            self._record_plan = self.graph_planning  # draw this evaluation episode's first route

    def _new_window(self, explore: bool) -> bool:
        s = self.state[explore]
        return s["goal"] is None or s["t"] >= self.k

    def act_random(self, obs: np.ndarray) -> np.ndarray:
        """Warm-up: uniform goals every k steps (so windows, the high-level buffer and HER goals fill
        as they will later), uniform actions."""
        s = self.state[True]
        if self._new_window(True):
            u = torch.as_tensor(self.np_rng.uniform(-1.0, 1.0, (1, self.goal_dim)), dtype=torch.float32,
                                device=self.device)
            g_start = self.target_goals(self.obs_tensor(obs))[1]
            self._open_window(True, g_start, u, self.goal_from_action(g_start, u))
        s["t"] += 1
        return self.np_rng.uniform(-1.0, 1.0, self.action_dim).astype(np.float32)

    @torch.no_grad()
    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        s = self.state[explore]
        obs_t = self.obs_tensor(obs)
        h, g = self.goal_encoder(obs_t)
        h_low = h if self.worker_encoder is None else self.worker_encoder(obs_t)
        new_window = self._new_window(explore)
        z = self.target_goals(obs_t)[1] if new_window or self.goal_input == "offset" else None
        if new_window and not explore and s["goal"] is not None:  # obs ends the evaluation window before it
            stats = self.window_stats(torch.as_tensor(s["start_latent"], device=self.device),
                                      torch.as_tensor(s["goal"], device=self.device), z[0], s["start_dist"])
            if self.eval_episode_windows > 0:  # an episode's first window can move by the env's doing alone
                stats["progress_after_first"] = stats["progress"]  # (CarRacing's zoom-in: ~500x a typical window)
            self.eval_episode_windows += 1
            for key, value in stats.items():
                self.eval_stats.setdefault(key, []).append(value)
        if new_window:
            u, goal = self.choose_goal(h, g, z, explore, obs=obs)
            self._open_window(explore, z, u, goal)
        s["t"] += 1
        goal = torch.as_tensor(s["goal"], device=self.device).unsqueeze(0)
        return self.low.act(self.worker_input(h_low, goal, z), explore)[0].cpu().numpy()

    def worker_input(self, h: torch.Tensor, goal: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """The worker's actor and critic input: features h and the goal (low.goal_input=absolute), or
        the goal's offset from z, the state's EMA latent, in goal_scale units (offset), clipped to
        +-OFFSET_CLIP units (an episode-start zoom moves the latent ~10x a goal's reach)."""
        if self.goal_input == "offset":
            goal = ((goal - z) / self.goal_scale).clamp(-OFFSET_CLIP, OFFSET_CLIP)
        return torch.cat([h, goal], -1)

    @torch.no_grad()
    def plan_distances(self, h: torch.Tensor, g: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Predicted distance to each candidate goal after k steps of the (deterministic) low-level
        policy, rolled out by f in latent space from one state (h, g: batch of one)."""
        n = len(candidates)
        h, g = h.expand(n, -1), g.expand(n, -1)
        for _ in range(self.k):
            a = self.low.act(self.worker_input(h, candidates, g), explore=False)
            g, h = self.f(g, h, a)
        return goal_distance(g, candidates)

    @torch.no_grad()
    def choose_goal(self, h: torch.Tensor, g: torch.Tensor, g_target: torch.Tensor,
                    explore: bool, obs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(high-level action, goal) for the next k steps from h, g (online encoder) and g_target
        (EMA encoder: relative goals are offsets from it). With planning, candidates are scored by
        plan_scores and the best wins: `sample` re-ranks the actor's own proposals (evaluation: its
        mean first, then samples); `cem` searches around the actor's mean with the cross-entropy
        method (`iterations` rounds of `candidates` goals, refitted to the best `elites`), so the
        candidates are diverse rather than draws from one narrow policy. Evaluation candidates come
        from a fixed seed (see _planning_rng). `graph` takes the first landmark of the route to the
        task goal (graph_goal; `obs`, the current observation, carries the task goal)."""
        if self.n_candidates == 0:
            u = self.high.act(h, explore)
            return u, self.goal_from_action(g_target, u)
        if self.graph_planning:
            return self.graph_goal(h, g_target, explore, obs)
        hs = h.expand(self.n_candidates, -1)
        with self._planning_rng(explore):
            if self.plan_method == "cem":
                actions, dist, score, first_dist = self._cem(h, g, hs, g_target)
            else:
                actions = self.high.actor(hs, with_log_prob=False)[0]
                if not explore:
                    actions[0] = self.high.act(h, explore=False)[0]
                dist, score = self.plan_scores(h, g, hs, g_target, actions)
                first_dist = dist[0]
        best = int(score.argmax())
        if explore:
            self._stat("goal/plan_dist_chosen", dist[best])
            self._stat("goal/plan_dist_first", first_dist)
            self._stat("goal/plan_gain", first_dist - dist[best])
        return actions[best:best + 1], self.goal_from_action(g_target, actions[best:best + 1])

    def plan_scores(self, h: torch.Tensor, g: torch.Tensor, hs: torch.Tensor, g_target: torch.Tensor,
                    actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f's predicted miss distance, score) of candidate actions: score = q_weight x Q_high -
        dist_weight x miss. Both terms are in the manager's reward units (dist_weight defaults to
        reach_penalty, what a missed goal costs it) and are not normalised across candidates:
        z-scoring near-identical candidates turned noise into choices."""
        dist = self.plan_distances(h, g, self.goal_from_action(g_target, actions))
        score = -self.miss_cost(dist, self.plan_dist_weight)
        if self.plan_q_weight:
            score = score + self.plan_q_weight * self.high.critic(hs, actions).min(0).values
        return dist, score

    def _cem(self, h, g, hs, g_target):
        """Cross-entropy search over high-level actions around the actor's mean (always a candidate,
        so CEM never scores below the plain actor's choice). Returns the best candidate of every
        round (actions, dist, score, stacked) and the predicted miss of the actor's mean."""
        mean = self.high.act(h, explore=False)
        std = torch.full_like(mean, self.cem_init_std)
        kept_a, kept_d, kept_s, first_dist = [], [], [], None
        for _ in range(self.cem_iterations):
            actions = (mean + std * torch.randn(self.n_candidates, mean.shape[-1], device=self.device)).clamp(-1.0, 1.0)
            actions[0] = mean[0]
            dist, score = self.plan_scores(h, g, hs, g_target, actions)
            first_dist = dist[0] if first_dist is None else first_dist
            elite = score.topk(self.cem_elites).indices
            mean = actions[elite].mean(0, keepdim=True)
            std = (actions[elite].std(0, keepdim=True) if self.cem_elites > 1 else std).clamp(min=0.05)
            best = int(score.argmax())
            kept_a.append(actions[best]), kept_d.append(dist[best]), kept_s.append(score[best])
        return torch.stack(kept_a), torch.stack(kept_d), torch.stack(kept_s), first_dist

    def _planning_rng(self, explore: bool):
        """Training draws planning candidates from the global RNG stream. Evaluation draws them under
        a fixed seed (agent seed, window index in the episode) in a forked RNG: an evaluation is a
        function of the networks and the env seed only, and leaves the global (CPU and CUDA) RNG
        streams of training untouched."""
        if explore:
            return contextlib.nullcontext()
        cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        seed = self.seed * 1_000_003 + self.eval_windows
        self.eval_windows += 1

        @contextlib.contextmanager
        def seeded():
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)
                yield
        return seeded()

    # ------------------------------------------------------------------ graph planning (method=graph)
    def _under_goal(self, obs: dict, goal: np.ndarray) -> dict[str, torch.Tensor]:
        """Goal-env observations (numpy dict, batch first) as tensors, their desired goal replaced by
        `goal`: the latent of a state depends on the task goal the encoder reads beside it."""
        out = {k: torch.as_tensor(v, device=self.device) for k, v in obs.items()}
        dg = obs["desired_goal"]
        out["desired_goal"] = torch.as_tensor(np.broadcast_to(np.asarray(goal, dtype=dg.dtype), dg.shape).copy(),
                                              device=self.device)
        return out

    @torch.no_grad()
    def goal_values(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The worker's value V(s, g) = min over the twin critics of Q(s, pi(s, g), g) (deterministic
        action), from online trunk features h of s and latent goals z, row by row."""
        feat = torch.cat([h, z], -1)
        action = self.low.actor(feat, deterministic=True, with_log_prob=False)[0]
        return self.low.q(feat, action).min(0).values

    @torch.no_grad()
    def pairwise_values(self, h: torch.Tensor, z: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """(len(h), len(z)) values V(s_i, z_j), evaluated `chunk` pairs at a time."""
        n, m = len(h), len(z)
        out = torch.empty(n, m, device=self.device)
        rows = max(1, chunk // m)
        for i in range(0, n, rows):
            hi = h[i:i + rows]
            pairs_h = hi.unsqueeze(1).expand(-1, m, -1).reshape(-1, h.shape[-1])
            pairs_z = z.unsqueeze(0).expand(len(hi), -1, -1).reshape(-1, z.shape[-1])
            out[i:i + rows] = self.goal_values(pairs_h, pairs_z).view(len(hi), m)
        return out

    @torch.no_grad()
    def fit_pairs(self, rng: np.random.Generator, n: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, steps) of up to n replay pairs (s_t, s_{t+j}), j uniform in 1..horizon but never past
        the end of s_t's episode: the data StepsFromValue is fitted to. Each pair is read as the worker
        is trained: s_t with its own task goal, the goal E_ema(s_{t+j}) of the same episode."""
        rb = self.replay
        idx = rng.integers(0, rb.size, 2 * n)
        idx = idx[rb.valid[idx]][:n]  # transition slots (not an episode's final observation)
        last = np.where(rb.episode_last[idx] >= 0, rb.episode_last[idx], rb.ptr)
        span = (last - idx) % rb.capacity
        steps = np.minimum(rng.integers(1, horizon + 1, len(idx)), span)
        h = self.goal_encoder.trunk(rb.obs_at(idx, self.device))
        z = self.target_goals(rb.obs_at((idx + steps) % rb.capacity, self.device))[1]
        return self.goal_values(h, z).cpu().numpy(), steps

    @torch.no_grad()
    def rebuild_graph(self, step: int) -> dict:
        """Rebuild the landmark graph from replay (every planning.graph.rebuild_every env steps):

        1. `sample_size` random replay observations, encoded by the EMA encoder under one task goal
           (that of the first of them: the latent of a state depends on the goal read beside it, and
           in a maze with independently drawn starts and goals any state occurs with any goal);
           farthest-point sampling over these latents picks `n_landmarks`;
        2. the value -> steps conversion is fitted on `fit_pairs` replay pairs (StepsFromValue);
        3. edge i -> j weighs the steps read from V(l_i, E_ema(l_j)), dropped above `max_edge_steps`;
           Floyd-Warshall gives every shortest path.
        Draws from its own generator seeded by (seed, step), so a rebuild is a function of the
        networks, the replay and the step: it touches no training RNG stream."""
        start = time.perf_counter()
        rb = self.replay
        rng = np.random.default_rng([self.seed, int(step)])
        slots = np.sort(rng.choice(rb.size, min(self.graph_sample_size, rb.size), replace=False))
        candidates = rb.obs_at(slots)
        ref_goal = np.array(candidates["desired_goal"][0])
        latents = self.target_goals(self._under_goal(candidates, ref_goal))[1]
        picked = farthest_point_sampling(latents, self.graph_n)
        landmarks = {k: np.array(v[picked]) for k, v in candidates.items()}

        values, steps = self.fit_pairs(rng, self.graph_fit_pairs, self.graph_fit_horizon)
        steps_fit = (StepsFromValue.discounted(self.low.gamma, self.graph_fit_horizon) if self.graph_steps == "discount"
                     else StepsFromValue.fit(values, steps))
        h = self.goal_encoder.trunk(self._under_goal(landmarks, ref_goal))
        weights = steps_fit(self.pairwise_values(h, latents[torch.as_tensor(picked, device=self.device)]))
        weights[weights > self.graph_max_edge] = float("inf")
        weights.fill_diagonal_(0.0)
        dist, next_hop = shortest_paths(weights)
        self.graph = LandmarkGraph(landmarks, ref_goal, steps_fit, weights, dist, next_hop, int(step))

        n = len(picked)
        edges = self.graph.num_edges()
        finite = torch.isfinite(weights) & ~torch.eye(n, dtype=torch.bool, device=weights.device)
        metrics = {"goal/graph_rebuild_s": time.perf_counter() - start, "goal/graph_nodes": float(n),
                   "goal/graph_edges": float(edges),
                   # share of landmark pairs with a route between them
                   "goal/graph_connected": float(torch.isfinite(dist).float().mean()),
                   # does the value read as distance? rank correlation of -value and the steps apart (1: perfectly)
                   "goal/graph_fit_corr": rank_correlation(-values, steps)}
        if edges:  # (no NaN for an empty graph: logged metrics must stay finite)
            metrics["goal/graph_edge_steps"] = float(weights[finite].mean())
        return metrics

    @torch.no_grad()
    def graph_route(self, h: torch.Tensor, obs: dict) -> dict:
        """The route from the current state (online features h, observation obs) to the task goal.

        The task goal maps into the graph as the landmark whose stored achieved goal is nearest the
        desired goal in env goal space: a landmark is a state the agent visited, so its latent is one
        the worker has learned to reach (an invented observation "at the goal" would need to know the
        env's observation layout, and its velocities, joint angles and so on). Landmarks are encoded
        now, under this episode's task goal, as the worker's achieved latents will be; the steps from
        the state to each landmark are read from the value like the edges. Returns {route: landmark
        indices (first one = subgoal), steps: predicted steps to the target, latents: (N, d),
        start_steps: (N,), target}."""
        graph = self.graph
        goal = np.asarray(obs["desired_goal"])
        latents = self.target_goals(self._under_goal(graph.obs, goal))[1]
        start_steps = graph.steps_fit(self.goal_values(h.expand(len(latents), -1), latents))
        start_steps[start_steps > self.graph_max_edge] = float("inf")
        target = graph.nearest(goal)
        route, steps = plan_route(start_steps, graph.dist, graph.next_hop, target)
        return {"route": route, "steps": steps, "latents": latents, "start_steps": start_steps, "target": target}

    @torch.no_grad()
    def graph_goal(self, h: torch.Tensor, g_target: torch.Tensor, explore: bool,
                   obs: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(high-level action, goal) from the landmark graph: the first landmark of the route to the
        task goal, as far as one window reaches (the action is the manager's action that proposes it,
        clipped to [-1, 1], so replay re-derives exactly the goal pursued and the manager learns from
        the window off-policy). The manager proposes instead when there is no graph yet, no route,
        or the route is only the target landmark, already within one window (k steps): from there
        the manager, trained on the task goal, finishes the way to the goal itself."""
        plan = self.graph_route(h, obs) if self.graph is not None and obs is not None else None
        route = plan["route"] if plan is not None else []
        handover = len(route) == 1 and float(plan["start_steps"][route[0]]) <= self.k
        use = bool(route) and not handover
        if self._record_plan and not explore and plan is not None:
            self.drawn_plan = {"start": np.array(obs["achieved_goal"]), "goal": np.array(obs["desired_goal"]),
                               "route": list(route)}
            self._record_plan = False
        if explore:
            self._stat("goal/plan_used", float(use))
            if route:
                self._stat("goal/plan_length", len(route))
                self._stat("goal/plan_steps", plan["steps"])
        if use:
            u = self.action_from_goal(g_target, plan["latents"][route[0]:route[0] + 1])
        else:
            u = self.high.act(h, explore)
        return u, self.goal_from_action(g_target, u)

    def plan_image(self) -> np.ndarray | None:
        """The landmarks, their edges and the last drawn route over the maze's wall map (CHW uint8)."""
        graph, layout = self.graph, self.maze_layout
        if graph is None or layout is None:
            return None
        finite = torch.isfinite(graph.weights)
        undirected = torch.triu(finite | finite.T, diagonal=1).nonzero().cpu().numpy()
        plan = self.drawn_plan or {}
        route_xy = (np.concatenate([plan["start"][None], graph.xy[plan["route"]]]) if plan.get("route") else None)
        cell_px = max(8, min(32, 256 // max(layout.walls.shape)))  # UMaze 160 px, Medium 256, Large 252 x 189
        return draw_plan(layout.walls, lambda xy: layout.to_pixel(xy, cell_px), graph.xy, undirected, route_xy,
                         plan.get("start"), plan.get("goal"), cell_px)

    def _stat(self, key: str, value) -> None:
        self.env_stats.setdefault(key, []).append(float(value))

    # ------------------------------------------------------------------ storing
    def observe(self, obs, action, reward, next_obs, terminated, truncated) -> None:
        s = self.state[True]
        self.replay.add(obs, action, reward, next_obs, terminated, truncated, goal_action=s["action"],
                        goal_age=s["t"] - 1)
        if self.pending is None:
            self.pending = {"obs": map_obs(np.asarray, obs), "goal": s["goal"], "action": s["action"], "reward": 0.0,
                            "steps": 0, "start_dist": s["start_dist"], "start_latent": s["start_latent"]}
        self.pending["reward"] += float(reward)
        self.episode_return += float(reward)
        if terminated or truncated:
            self.recent_returns = [*self.recent_returns, self.episode_return][-self.goal_phase_episodes:]
            self.episode_return = 0.0
        self.pending["steps"] += 1
        if self.pending["steps"] >= self.k or terminated or truncated:
            self._close_window(next_obs, terminated, truncated)

    def _close_window(self, next_obs, terminated: bool, truncated: bool) -> None:
        """One high-level transition: the rewards of exactly the steps this window covered; an episode
        end closes it early (terminated: no bootstrap; truncated: bootstrap from next_obs).
        Success is relative: the end distance must fall below success_ratio x the start distance, so a
        goal proposed next to the current latent does not count as reached before the worker moves."""
        p = self.pending
        self.high_replay.add(p["obs"], p["action"], p["reward"], next_obs, terminated, truncated, steps=p["steps"])
        with torch.no_grad():
            achieved = self.target_goals(self.obs_tensor(next_obs))[1][0]
            start_latent = torch.as_tensor(p["start_latent"], device=self.device)
            motion_sq = goal_distance(achieved, start_latent)
            stats = self.window_stats(start_latent, torch.as_tensor(p["goal"], device=self.device), achieved,
                                      float(p["start_dist"]))
        if p["steps"] == self.k:  # the k-step motion of a full window, as the current policy moves
            self._stat("goal/window_motion", float(motion_sq.sqrt()))
            if not self.motion_from_replay:
                self.motion.add(motion_sq)
        for key, value in stats.items():
            self._stat(f"goal/{key}", value)
        self.pending = None
        self.state[True]["t"] = self.k  # the next act() starts a new window

    def window_stats(self, start_latent: torch.Tensor, goal: torch.Tensor, achieved: torch.Tensor,
                     start_dist: float) -> dict[str, float]:
        """How one finished window did against its goal (EMA latents of its start and end). Each metric
        comes with its chance level: the same window scored against the goal mirrored through the start
        latent (as far away, the opposite way), which a worker that ignores its goal reaches alike."""
        mirror = (2 * start_latent - goal).clamp(-1.0, 1.0)
        dist, start = float(goal_distance(achieved, goal)), float(start_dist)
        mirror_dist, mirror_start = float(goal_distance(achieved, mirror)), float(goal_distance(start_latent, mirror))
        return {"window_distance": dist, "start_distance": start,
                # any large motion makes progress negative toward both goals: aim shows as progress above the mirror's
                "progress": start - dist, "progress_mirror": mirror_start - mirror_dist,
                # share of windows ending nearer their goal than they started (> 0.5: median progress > 0); the
                # mean progress is set by rare windows that move the latent ~5x a typical one
                "closer": float(dist < start), "closer_mirror": float(mirror_dist < mirror_start),
                "relative_success": float(dist < self.success_ratio * start),
                "relative_success_mirror": float(mirror_dist < self.success_ratio * mirror_start)}

    def eval_metrics(self) -> dict[str, float]:
        """The window metrics of the evaluation windows since the last call, as eval/goal_<metric>: the
        deterministic worker against the deterministic manager's goals, on the trainer's fixed evaluation
        episodes (the goal/ metrics are training windows, with both levels' exploration noise in them).
        Each episode's last window is not counted (act never sees the observation that ends it);
        progress_after_first leaves out each episode's first one too."""
        stats, self.eval_stats = self.eval_stats, {}
        if not stats:
            return {}
        metrics = {f"eval/goal_{key}": float(np.mean(values)) for key, values in stats.items()}
        metrics["eval/goal_windows"] = float(len(stats["progress"]))
        return metrics

    def buffers(self) -> dict[str, ReplayBuffer]:
        return {"replay": self.replay, "high_replay": self.high_replay}

    # ------------------------------------------------------------------ learning
    def goal_reached(self, achieved: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """reward=reach: within reach_radius x the k-step motion per dim (before the first motion
        measurement: x the initial reach goal_scale / scale_motion_mult)."""
        motion = self.k_step_motion if self.motion.ready else self.init_goal_scale / self.scale_motion_mult
        return goal_distance(achieved, goal) < (self.reach_radius * motion) ** 2

    def goal_reward(self, achieved: torch.Tensor, goal: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """The worker's goal reward for reaching `achieved` (EMA latent of s'); reward=direction also
        needs `start`, the EMA latent of s."""
        if self.reward_type == "direction":
            return direction_reward(start, achieved, goal)
        if self.reward_type == "reach":
            return self.goal_reached(achieved, goal).float() - 1.0
        if self.reward_type == "distance":
            return distance_reward(achieved, goal)
        if self.reward_type == "cosine":
            return cosine_reward(achieved, goal)
        with torch.no_grad():
            return self.contrastive.reward(achieved, goal)

    def goal_mix(self, step: int | None = None) -> float:
        """The goal's share in [0, 1] at env step `step`: 0 before the goal phase starts (env step
        low.goal_weight_from, or with low.goal_phase_return the step the worker's returns reached it),
        then rising linearly to 1 over low.goal_weight_ramp steps (None: 1)."""
        start = self.goal_weight_from if self.goal_phase_return is None else self.goal_phase_from
        if step is None:
            return 1.0
        if start is None or step < start:
            return 0.0
        if step >= start + self.goal_weight_ramp:
            return 1.0
        return (step - start) / self.goal_weight_ramp

    def goal_weight(self, step: int | None = None) -> float:
        """The goal reward's weight at env step `step`: low.reward_scale x goal_mix(step)."""
        return self.low_reward_scale * self.goal_mix(step)

    def open_goal_phase(self, step: int) -> dict:
        """low.goal_phase_return: open the goal phase at `step` once the mean return of the last
        goal_phase_episodes training episodes reaches the threshold, then set the actor's goal-input
        share for this step (acting until the next update uses it too)."""
        recent = self.recent_returns[-self.goal_phase_episodes:]
        if (self.goal_phase_from is None and len(recent) == self.goal_phase_episodes
                and np.mean(recent) >= self.goal_phase_return):
            self.goal_phase_from = int(step)
        self.low.actor.mix.fill_(self.goal_mix(step))
        metrics = {"goal/phase_open": float(self.goal_phase_from is not None),
                   "goal/actor_goal_input": float(self.low.actor.mix)}
        if recent:
            metrics["goal/phase_recent_return"] = float(np.mean(recent))
        return metrics

    def worker_reward(self, goal_r: torch.Tensor, env_r: torch.Tensor, goal_weight: float | None = None,
                      split: bool = False):
        """goal_weight (default reward_scale) x goal reward + extrinsic_weight x env reward; with
        low.normalize_rewards each term is first divided by its running batch spread, so the weights
        mean what they say (on CarRacing the raw track reward is ~40x the goal reward's scale);
        low.goal_spread=iqr measures the goal reward's spread robustly and clips the normalised goal
        reward to +-low.goal_clip. split: the two normalised terms apart, (goal reward, weighted env
        reward), for split critics (the goal weight then applies to Q_goal in the actor).
        low.normalize_rewards=goal normalises the goal reward only."""
        if self.normalize_goal_reward and self.reward_type != "reach":  # reach's -1/0 already has a step's scale
            self.goal_reward_spread.update(robust_std(goal_r) if self.goal_spread == "iqr" else goal_r.std())
            goal_r = goal_r / (self.goal_reward_spread.value + 1e-6)
            if self.goal_spread == "iqr":
                goal_r = goal_r.clamp(-self.goal_clip, self.goal_clip)
        if self.normalize_env_reward and self.low_extrinsic:
            self.env_reward_spread.update(env_r.std())
            env_r = env_r / (self.env_reward_spread.value + 1e-6)
        if split:
            return goal_r, self.low_extrinsic * env_r
        return (self.low_reward_scale if goal_weight is None else goal_weight) * goal_r + self.low_extrinsic * env_r

    @staticmethod
    def balanced_encoder_weight(weight: float, ref_scale: RunningMean, ref_loss: torch.Tensor,
                                scale: RunningMean, loss: torch.Tensor) -> float:
        """`weight`, shrunk so `loss` weighs at most that times `ref_loss` in the shared encoder's
        gradient (running magnitudes of both, updated here with this batch's values)."""
        ref_scale.update(ref_loss)
        scale.update(loss)
        return weight * min(1.0, float(ref_scale.value / (scale.value + 1e-8)))

    def high_encoder_grad_weight(self) -> float:
        """Weight of the manager critic's gradient into the shared encoder: `high.encoder_weight`,
        shrunk so the manager's critic loss weighs at most that times the worker's (running
        magnitudes); its own Q values (~100s) otherwise dominate the encoder's training signal."""
        if not self.high_trains_encoder:
            return 0.0
        ratio = float(self.low_loss_scale.value / (self.high_loss_scale.value + 1e-8))
        return self.high_encoder_weight * min(1.0, ratio)

    def sample_future(self, idx: np.ndarray) -> np.ndarray:
        """HER "future" slots: for each transition slot, a later observation of the same episode at
        most `low.her_horizon` steps ahead (default k), i.e. a goal one window can reach, not one
        hundreds of steps away."""
        rb = self.replay
        last = np.where(rb.episode_last[idx] >= 0, rb.episode_last[idx], rb.ptr)
        span = np.minimum((last - idx) % rb.capacity, self.her_horizon)  # >= 1 for a transition slot
        offset = np.minimum((self.np_rng.random(len(idx)) * span).astype(np.int64) + 1, span)
        return (idx + offset) % rb.capacity

    def sequence_slots(self, idx: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """Slots of `horizon` consecutive transitions from each start slot, and a cumulative mask that
        drops to 0 from the first one that is not a transition of the same episode (after its end,
        at the running episode's current observation, or where a newer episode overwrote it)."""
        rb = self.replay
        slots = (idx[:, None] + np.arange(horizon)[None, :]) % rb.capacity
        same = rb.valid[slots] & (rb.episode[slots] == rb.episode[idx][:, None])
        return slots, np.cumprod(same, axis=1).astype(np.float32)

    def f_rollout_loss(self, idx: np.ndarray, h: torch.Tensor, g: torch.Tensor, h_next_t: torch.Tensor,
                       g_next_t: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Prediction loss of f rolled out on its own predictions with the real stored actions, as
        planning uses it: one step on the whole batch (h, g: online features of the transitions idx;
        *_next_t: EMA targets), `model.horizon` steps on its first `model.rollout_batch` rows, each
        step scored against the EMA encoding of the observation actually reached; steps past an
        episode end are masked out. Loss: mean squared error over goal and feature dims, averaged
        over every valid (row, step)."""
        rb = self.replay
        actions = torch.as_tensor(rb.action[idx], device=self.device)
        g_pred, h_pred = self.f(g, h, actions)
        err = (g_pred - g_next_t).pow(2).mean(-1) + (h_pred - h_next_t).pow(2).mean(-1)
        total, count = err.sum(), float(len(idx))
        info = {"goal/f_error": (g_pred - g_next_t).pow(2).mean().detach()}
        n = min(self.f_batch, len(idx))
        if self.f_horizon > 1 and n:
            slots, mask = self.sequence_slots(idx[:n], self.f_horizon)
            mask = torch.as_tensor(mask, device=self.device)
            acts = torch.as_tensor(rb.action[slots], device=self.device)
            reached = rb.obs_at((slots[:, 1:] + 1) % rb.capacity, self.device)
            ht, gt = self.target_goals(map_obs(lambda o: o.flatten(0, 1), reached))
            ht, gt = ht.unflatten(0, (n, self.f_horizon - 1)), gt.unflatten(0, (n, self.f_horizon - 1))
            gp, hp = g_pred[:n], h_pred[:n]
            for j in range(1, self.f_horizon):
                gp, hp = self.f(gp, hp, acts[:, j])
                g_err = (gp - gt[:, j - 1]).pow(2).mean(-1)
                total = total + ((g_err + (hp - ht[:, j - 1]).pow(2).mean(-1)) * mask[:, j]).sum()
                count += float(mask[:, j].sum())
            info["goal/f_error_last"] = ((g_err * mask[:, -1]).sum() / mask[:, -1].sum().clamp(min=1)).detach()
        return total / count, info

    def inverse_loss(self, g: torch.Tensor, next_obs, action: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Inverse dynamics loss (ICM): mean squared error of the action a_t predicted from the online
        goals (g_t, g_{t+1}), so its gradient shapes the goal head and trunk through both ends of the
        transition. g_{t+1} costs one more online encoder pass (the batch only has EMA encodings of
        next_obs; on pixels it gets its own random shift). inverse_r2 = 1 - mse / var(a) over the
        batch: 0 when the goals say nothing of the action, 1 when they determine it."""
        g_next = self.goal_encoder(self._augment(next_obs))[1]
        mse = F.mse_loss(self.inverse(torch.cat([g, g_next], -1)), action)
        r2 = 1.0 - mse.detach() / action.var(0, unbiased=False).mean().clamp(min=1e-8)
        return mse, {"loss/inverse": mse.detach(), "goal/inverse_r2": r2}

    def window_start_slots(self, idx: np.ndarray) -> np.ndarray:
        """Replay slot of the observation that started the goal window of each transition slot. Where
        that slot was already overwritten by a newer episode (the writer just wrapped past it; rare
        with capacity >> k) the transition's own observation stands in."""
        start = (idx - self.replay.extras["goal_age"][idx]) % self.replay.capacity
        return np.where(self.replay.episode[start] == self.replay.episode[idx], start, idx)

    @torch.no_grad()
    def stored_goals(self, idx: np.ndarray) -> torch.Tensor:
        """The goals pursued at transition slots idx, derived now from what defined them: the current
        EMA latent of the window's start observation plus the offset of the stored action u."""
        u = torch.as_tensor(self.replay.extras["goal_action"][idx], device=self.device)
        if not self.relative_goals:
            return u
        start_obs = self.replay.obs_at(self.window_start_slots(idx), self.device)
        return self.goal_from_action(self.target_goals(start_obs)[1], u)

    def sample_low(self) -> dict:
        """A low-level batch with HER "future" goals: a `low.relabel_fraction` share of the goals is
        the EMA encoding of a later observation of the same episode, the rest the pursued goals
        re-derived by stored_goals (only the rows that need each are encoded)."""
        b = self.replay.sample(self.batch_size, self.device)
        future = self.sample_future(b["idx"])
        b["future_idx"] = future
        b["relabeled"] = torch.as_tensor(self.np_rng.random(self.batch_size) < self.low_relabel, device=self.device)
        b["goal"] = torch.zeros(self.batch_size, self.goal_dim, device=self.device)
        kept = np.flatnonzero(~b["relabeled"].cpu().numpy())
        if len(kept):
            b["goal"][kept] = self.stored_goals(b["idx"][kept])
        # encode only the future observations a loss needs (all of them for the contrastive critic)
        rows = (np.arange(self.batch_size) if self.contrastive is not None
                else np.flatnonzero(b["relabeled"].cpu().numpy()))
        if len(rows):
            future_goal = self.target_goals(self.replay.obs_at(future[rows], self.device))[1]
            b["future_goal"] = torch.zeros_like(b["goal"]).index_copy_(0, torch.as_tensor(rows, device=self.device),
                                                                        future_goal)
            b["goal"] = torch.where(b["relabeled"].unsqueeze(-1), b["future_goal"], b["goal"])
        return b

    def sample_high(self) -> dict:
        """A high-level batch ready for the critic: HAC's hindsight action (a `high.relabel_fraction`
        share of windows get the action that would have proposed the goal actually reached) and
        subgoal testing as a penalty (a proposal missed by distance D costs reach_penalty * D; 0 when
        relabeled). Achieved goals and next-state features come from the EMA encoder. On goal envs a
        `high.task_relabel_fraction` share first gets HER on the task goal (buffers/her.py, over windows)."""
        hb = self.high_replay.sample(self.high_batch, self.device)
        if self.task_relabel:
            relabel_future(hb, self.high_replay, self.goal_fns, self.task_relabel)
        hb["next_feat"], achieved = self.target_goals(hb["next_obs"])
        start = self.target_goals(hb["obs"])[1] if self.relative_goals or self.adapt_scale else None
        if self.adapt_scale:
            full = hb["steps"] == self.k
            self.record_motion(start[full], achieved[full])
        if not self.relative_goals:
            start = None
        relabel = torch.as_tensor(self.np_rng.random(len(achieved)) < self.high_relabel, device=self.device)
        hb["stored_action"] = hb["action"]
        hb["action"] = torch.where(relabel.unsqueeze(-1), self.action_from_goal(start, achieved), hb["action"])
        hb["missed"] = goal_distance(achieved, self.goal_from_action(start, hb["action"]))
        task_reward = self.high_reward_scale * hb["reward"]
        if self.normalize_penalty:
            self.window_reward_spread.update(task_reward.std())
        hb["reward"] = task_reward - self.miss_cost(hb["missed"], self.reach_penalty)
        hb["discount"] = self.high_gamma ** hb["steps"].float() * (1.0 - hb["terminated"])
        hb["relabeled"] = relabel
        return hb

    def miss_cost(self, missed: torch.Tensor, weight: float) -> torch.Tensor:
        """What missing a goal by `missed` (mean squared per dim) costs the manager: weight x missed;
        with high.normalize_penalty, weight x (missed / k-step motion^2) x the running spread (std)
        of the window reward, so weight=1 prices a miss of one typical window's travel at one
        standard deviation of the manager's reward, whatever the encoder's and the env's scales;
        high.miss_clip bounds the count of motions, so a goal missed altogether costs a few spreads
        (as goal_clip bounds the worker's goal reward), not the tail of the rarest windows."""
        if not self.normalize_penalty:
            return weight * missed
        motion = self.k_step_motion if self.motion.ready else self.init_goal_scale / self.scale_motion_mult
        spread = self.window_reward_spread.value if self.window_reward_spread.ready else 1.0
        misses = missed / (motion ** 2 + 1e-8)
        if self.miss_clip is not None:
            misses = misses.clamp(max=self.miss_clip)
        return weight * spread * misses

    def update(self, step: int) -> dict:
        metrics: dict = {}
        for key, values in self.env_stats.items():
            metrics[key] = float(np.mean(values))
        self.env_stats = {}
        if self.graph_planning and (self.graph is None or step - self.graph.built_at >= self.graph_rebuild_every):
            metrics.update(self.rebuild_graph(step))

        # ---- low level + goal encoder + f + decoder, one batch
        b = self.sample_low()
        obs_in = self._augment(b["obs"])
        h, g = self.goal_encoder(obs_in)
        h_next_t, g_next_t = self.target_goals(b["next_obs"])
        goal = b["goal"]
        z_t = self.target_goals(b["obs"])[1] if self.goal_input == "offset" or self.reward_type == "direction" else None
        if self.goal_phase_return is not None:
            metrics.update(self.open_goal_phase(step))
        goal_weight = self.goal_weight(step)
        goal_r = self.goal_reward(g_next_t, goal, z_t)
        if self.split_critics:
            goal_r, reward = self.worker_reward(goal_r, b["reward"], split=True)
        else:
            reward = self.worker_reward(goal_r, b["reward"], goal_weight)
        ends = b["terminated"]  # reward=reach: reaching the goal also ends its episode (no bootstrap)
        if self.reward_type == "reach":
            ends = torch.maximum(ends, self.goal_reached(g_next_t, goal).float())
        if self.worker_encoder is None:
            h_low, h_low_next = h, h_next_t
        else:  # the worker's own encoder: online features, next-state features without gradient (DrQ, as sac)
            h_low = self.worker_encoder(obs_in)
            with torch.no_grad():
                h_low_next = self.worker_encoder(self._augment(b["next_obs"]))
        low_in = self.worker_input(h_low, goal, z_t)
        low_next_in = self.worker_input(h_low_next, goal, g_next_t)
        low_loss, low_info = self.low.critic_loss(low_in, b["action"], reward, low_next_in,
                                                  self.low.gamma * (1.0 - ends))
        encoder_ref_loss = low_loss  # what the manager's share of the encoder gradient is measured against
        if self.split_critics:
            # a copy of the features whose gradient into the encoder can be scaled (goal_encoder_weight)
            h_goal = h_low * 1.0 if self.goal_encoder_weight is not None and h_low.requires_grad else h_low
            goal_loss, goal_info = self.goal_critic_loss(self.worker_input(h_goal, goal, z_t), b["action"], goal_r,
                                                         low_next_in, self.goal_gamma * (1.0 - ends))
            if self.goal_encoder_weight is not None:
                goal_enc_weight = self.balanced_encoder_weight(self.goal_encoder_weight, self.env_loss_scale,
                                                               low_loss, self.goal_loss_scale, goal_loss)
                if h_goal is not h_low:
                    h_goal.register_hook(lambda grad: grad * goal_enc_weight)
                metrics["goal/low_goal_encoder_weight"] = goal_enc_weight
            else:
                encoder_ref_loss = low_loss + goal_loss
            low_loss = low_loss + goal_loss
            metrics.update({"loss/low_goal_critic": goal_loss.detach(), "train/low_goal_q_mean": goal_info})
        metrics["goal/reward_weight"] = goal_weight
        f_loss, f_info = self.f_rollout_loss(b["idx"], h, g, h_next_t, g_next_t)
        metrics.update(f_info)
        nr = min(self.recon_batch, len(g))
        recon_target = obs_in[:nr].float() / 255.0 - 0.5 if self.is_pixel else vector_input(obs_in)[:nr]
        recon_loss = F.mse_loss(self.decoder(g[:nr]), recon_target)
        total = low_loss + self.f_weight * f_loss + self.recon_weight * recon_loss
        if self.contrastive is not None:
            nce_loss = self.contrastive.loss(g_next_t, b["future_goal"])
            total = total + nce_loss
            metrics["loss/contrastive"] = nce_loss.detach()
        if self.inverse is not None:
            inverse_loss, inverse_info = self.inverse_loss(g, b["next_obs"], b["action"])
            total = total + self.inverse_weight * inverse_loss
            metrics.update(inverse_info)

        # ---- high level (shares the encoder; its critic may train it too)
        do_high = self.num_updates % self.high_update_every == 0 and len(self.high_replay) > 0
        if do_high:
            hb = self.sample_high()
            h_hi = self.goal_encoder.trunk(self._augment(hb["obs"]))
            if not self.high_trains_encoder:
                h_hi = h_hi.detach()
            high_loss, high_info = self.high.critic_loss(h_hi, hb["action"], hb["reward"], hb["next_feat"],
                                                         hb["discount"])
            self.low_loss_scale.update(encoder_ref_loss)
            self.high_loss_scale.update(high_loss)
            enc_weight = self.high_encoder_grad_weight()
            if self.high_trains_encoder:  # the critic itself learns at full rate; only the encoder's share shrinks
                h_hi.register_hook(lambda grad: grad * enc_weight)
            total = total + high_loss
            metrics["goal/high_encoder_weight"] = enc_weight
            metrics.update({"loss/high_critic": high_loss.detach(), "train/high_q_mean": high_info["q_mean"],
                            "goal/high_miss_distance": hb["missed"].mean(), "goal/scale": float(self.goal_scale),
                            "goal/high_miss_cost": self.miss_cost(hb["missed"], self.reach_penalty).mean()})
            if self.motion.ready:
                metrics["goal/k_step_motion"] = float(self.k_step_motion)

        critic_opts = (self.low.critic_opt, *((self.goal_critic_opt,) if self.split_critics else ()))
        for opt in (*critic_opts, self.high.critic_opt, self.model_opt):
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in critic_opts:
            opt.step()
        if do_high:
            self.high.critic_opt.step()
        self.model_opt.step()

        if self.num_updates % self.actor_update_every == 0:
            if self.split_critics:
                metrics.update(_prefixed(self.update_split_actor(low_in.detach(), goal_weight), "low"))
            else:
                metrics.update(_prefixed(self.low.update_actor_and_alpha(low_in.detach()), "low"))
            if do_high:
                metrics.update(_prefixed(self.high.update_actor_and_alpha(h_hi.detach()), "high"))
        self.low.update_target()
        if self.split_critics:
            soft_update(self.goal_critic_target, self.goal_critic, self.low.tau)
        if do_high:
            self.high.update_target()
        soft_update(self.goal_encoder_target, self.goal_encoder, self.encoder_tau)
        self.num_updates += 1

        metrics.update({
            "loss/low_critic": low_loss.detach(), "train/low_q_mean": low_info["q_mean"],
            "loss/goal_f": f_loss.detach(), "loss/recon": recon_loss.detach(),
            "goal/low_reward": reward.mean().detach(), "goal/relabeled_fraction": b["relabeled"].float().mean(),
            "goal/replay_distance": goal_distance(g_next_t, b["goal"]).mean(),
            **self.worker_sensitivity(low_in.detach()),
        })
        return metrics

    @torch.no_grad()
    def worker_sensitivity(self, low_in: torch.Tensor) -> dict:
        """Mean |change| of the worker's deterministic action when the goal part of its input is swapped
        between rows of a batch (goal/worker_goal_sensitivity), beside the same for the state features
        (goal/worker_state_sensitivity): a worker that ignores its goals scores ~0 on the first, one
        that follows noise in them scores as high as one that follows them. Rows are rolled by one, so
        no random draw is taken."""
        n_feat = low_in.shape[1] - self.goal_dim
        feat, goal = low_in[:, :n_feat], low_in[:, n_feat:]
        def act(x):
            return self.low.actor(x, deterministic=True, with_log_prob=False)[0]

        a = act(low_in)
        return {"goal/worker_goal_sensitivity": (act(torch.cat([feat, goal.roll(1, 0)], 1)) - a).abs().mean(),
                "goal/worker_state_sensitivity": (act(torch.cat([feat.roll(1, 0), goal], 1)) - a).abs().mean()}

    def goal_critic_loss(self, low_in, action, goal_r, low_next_in, discount) -> tuple[torch.Tensor, torch.Tensor]:
        """split_critics: Bellman error of the goal critic on the (normalised) goal reward alone. The
        next action comes from the worker's actor; the entropy bonus lives in the env critic only."""
        with torch.no_grad():
            next_action, _ = self.low.actor(low_next_in)
            target = goal_r + discount * self.goal_critic_target(low_next_in, next_action).min(0).values
        q = self.goal_critic(low_in, action)
        return F.mse_loss(q[0], target) + F.mse_loss(q[1], target), q.mean().detach()

    def update_split_actor(self, low_in: torch.Tensor, goal_weight: float) -> dict:
        """split_critics: the worker's actor maximises Q_env + w * Q_goal * |Q_env| / |Q_goal| (running
        mean magnitudes), so w is the goal's share of the objective whatever the two returns' scales."""
        action, logp = self.low.actor(low_in)
        for critic in (self.low.critic, self.goal_critic):
            critic.requires_grad_(False)
        q_env = self.low.q(low_in, action).min(0).values
        q_goal = self.goal_critic(low_in, action).min(0).values
        for critic in (self.low.critic, self.goal_critic):
            critic.requires_grad_(True)
        self.env_q_scale.update(q_env.abs().mean())
        self.goal_q_scale.update(q_goal.abs().mean())
        ratio = float(self.env_q_scale.value / (self.goal_q_scale.value + 1e-6))
        info = self.low.step_actor_and_alpha((self.low.alpha * logp - q_env - goal_weight * ratio * q_goal).mean(), logp)
        info["train/goal_q_ratio"] = ratio
        return info

    # ------------------------------------------------------------------ observability
    @torch.no_grad()
    def images(self) -> dict[str, np.ndarray]:
        """Last stored frame beside its reconstruction through E and the decoder (pixel envs); with
        graph planning on a maze, the landmarks and the last evaluation episode's first route."""
        if self.graph_planning:
            img = self.plan_image()
            return {} if img is None else {"goal/landmark_plan": img}
        if not self.is_pixel or self.replay.size == 0:
            return {}
        obs = torch.as_tensor(self.replay.obs[(self.replay.ptr - 1) % self.replay.capacity], device=self.device)
        recon = ((self.decoder(self.goal_encoder(obs.unsqueeze(0))[1])[0] + 0.5).clamp(0, 1) * 255).to(torch.uint8)
        ch = 3 if obs.shape[0] % 3 == 0 else 1  # last RGB frame, or last grayscale frame, of a stack
        pair = torch.cat([obs[-ch:].to(torch.uint8), recon[-ch:]], dim=-1)
        return {"goal/reconstruction": pair.cpu().numpy()}

    # ------------------------------------------------------------------ checkpointing
    def extra_state(self) -> dict:
        def tensors(d):  # numpy arrays (also in a dict observation) -> tensors (weights_only loading refuses numpy)
            return {k: tensors(v) if isinstance(v, dict) else torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                    for k, v in d.items()}

        pending = None if self.pending is None else tensors(self.pending)
        return {"num_updates": self.num_updates, "state": tensors(self.state[True]), "pending": pending,
                "env_stats": {k: list(v) for k, v in self.env_stats.items()},
                "graph": None if self.graph is None else self.graph.state(),
                "goal_phase": {"episode_return": self.episode_return, "recent_returns": list(self.recent_returns),
                               "from": self.goal_phase_from}}

    def load_extra_state(self, state: dict) -> None:
        self.num_updates = state["num_updates"]
        def arrays(d):
            return {k: arrays(v) if isinstance(v, dict) else v.numpy() if isinstance(v, torch.Tensor) else v
                    for k, v in d.items()}

        self.state[True] = arrays(state["state"])
        self.pending = None if state["pending"] is None else arrays(state["pending"])
        self.env_stats = {k: list(v) for k, v in state["env_stats"].items()}
        self.graph = LandmarkGraph.from_state(state.get("graph"), self.device)
        phase = state.get("goal_phase", {"episode_return": 0.0, "recent_returns": [], "from": None})  # older runs
        self.episode_return, self.recent_returns = phase["episode_return"], list(phase["recent_returns"])
        self.goal_phase_from = phase["from"]
