"""Soft actor-critic (Haarnoja et al. 2018): twin Q with clipped double-Q targets, Polyak target
critics, automatic entropy tuning toward -|A|.

From pixels it follows DrQ: the encoder is trained through the critic loss only, the actor reads
detached features, and observations get random-shift augmentation.

`SACCore` is the part the latent agents reuse: actor, twin critic, temperature and their update
steps over *features* (encoded observations, latents, or observation+goal vectors). `SAC` wraps
it with an encoder and a replay buffer into a full agent.

On a goal-conditioned env (dict observations) `SAC` is SAC + HER: the encoder reads the observation
and the desired goal, and `her.relabel_fraction` of every batch is relabelled with goals achieved
later in the same episode (buffers/her.py)."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentrl.agents.base import Agent
from latentrl.agents.networks import SquashedGaussianActor, TwinCritic, random_shift, soft_update
from latentrl.buffers import ReplayBuffer
from latentrl.buffers.her import relabel_future
from latentrl.config import ConfigError
from latentrl.envs.goal import GoalFunctions, obs_layout


class SACCore(nn.Module):
    """Actor, twin critic, target critic and temperature over a feature vector."""

    def __init__(self, feat_dim: int, action_dim: int, hidden_dims=(256, 256), lr: float = 3e-4,
                 gamma: float = 0.99, tau: float = 0.005, init_temperature: float = 1.0,
                 target_entropy: float | None = None, alpha_lr: float | None = None,
                 extra_critic_params=(), critic_layernorm: bool = False, sa_features=None, sa_dim: int = 0,
                 critic_feat_dim: int | None = None):
        """sa_features: optional callable (feat, action) -> (B, sa_dim) features the critics read beside
        feat (TD7/MR.Q's state-action embedding); it belongs to the caller and is not trained here.
        critic_feat_dim: the critics read only the first critic_feat_dim columns of feat (a goal-
        conditioned actor beside a critic of a return no goal changes); None: all of them."""
        super().__init__()
        self.actor = SquashedGaussianActor(feat_dim, action_dim, hidden_dims)
        self.critic_feat_dim = critic_feat_dim
        self.critic = TwinCritic((critic_feat_dim or feat_dim) + sa_dim, action_dim, hidden_dims,
                                 layernorm=critic_layernorm)
        self.sa_features = sa_features
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(float(np.log(init_temperature))))
        self.gamma, self.tau = gamma, tau
        self.target_entropy = -float(action_dim) if target_entropy is None else float(target_entropy)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        # an encoder trained by the critic loss shares the critic's optimizer (DrQ)
        self.critic_opt = torch.optim.Adam([*self.critic.parameters(), *extra_critic_params], lr=lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=alpha_lr or lr)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp().detach()

    def optimizers(self, prefix: str = "") -> dict[str, torch.optim.Optimizer]:
        return {f"{prefix}actor": self.actor_opt, f"{prefix}critic": self.critic_opt, f"{prefix}alpha": self.alpha_opt}

    def q(self, feat: torch.Tensor, action: torch.Tensor, target: bool = False) -> torch.Tensor:
        """Twin Q values (2, B) of the online (or target) critic, with the state-action features if any."""
        if self.critic_feat_dim is not None:
            feat = feat[..., :self.critic_feat_dim]
        if self.sa_features is not None:
            feat = torch.cat([feat, self.sa_features(feat, action)], -1)
        return (self.critic_target if target else self.critic)(feat, action)

    def critic_loss(self, feat, action, reward, next_feat, discount) -> tuple[torch.Tensor, dict]:
        """Soft Bellman error; `discount` is gamma^n * (1 - terminated) per sample."""
        with torch.no_grad():
            next_action, next_logp = self.actor(next_feat)
            target_q = self.q(next_feat, next_action, target=True).min(0).values - self.alpha * next_logp
            target = reward + discount * target_q
        q = self.q(feat, action)
        loss = F.mse_loss(q[0], target) + F.mse_loss(q[1], target)
        return loss, {"q_mean": q.mean().detach(), "target_q": target.mean()}

    def update_critic(self, feat, action, reward, next_feat, discount) -> dict:
        loss, info = self.critic_loss(feat, action, reward, next_feat, discount)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_opt.step()
        return {"loss/critic": loss.detach(), "train/q_mean": info["q_mean"]}

    def update_actor_and_alpha(self, feat: torch.Tensor) -> dict:
        """feat must be detached from any encoder: only the critic trains encoders."""
        action, logp = self.actor(feat)
        self.critic.requires_grad_(False)  # gradients flow through Q to the action only: no wasted critic grads
        q = self.q(feat, action).min(0).values
        self.critic.requires_grad_(True)
        return self.step_actor_and_alpha((self.alpha * logp - q).mean(), logp)

    def step_actor_and_alpha(self, actor_loss: torch.Tensor, logp: torch.Tensor) -> dict:
        """One actor step on a given loss (SAC's, or a model-based one) and one temperature step
        toward the target entropy from the log-probabilities of the actions it scored."""
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()
        return {"loss/actor": actor_loss.detach(), "loss/alpha": alpha_loss.detach(),
                "train/alpha": self.alpha, "train/entropy": -logp.detach().mean()}

    def update_target(self) -> None:
        soft_update(self.critic_target, self.critic, self.tau)

    @torch.no_grad()
    def act(self, feat: torch.Tensor, explore: bool) -> torch.Tensor:
        return self.actor(feat, deterministic=not explore, with_log_prob=False)[0]


class SAC(Agent):
    """SAC on encoded observations (identity/MLP for vectors, CNN + DrQ for pixels; + HER on goal envs)."""

    goal_conditioned = True
    vector_envs = True

    def __init__(self, encoder: nn.Module, obs_space: gym.spaces.Box, action_space: gym.spaces.Box,
                 device: str = "cpu", seed: int = 0, hidden_dims=(256, 256), lr: float = 3e-4,
                 gamma: float = 0.99, tau: float = 0.005, batch_size: int = 256, buffer_size: int = 1_000_000,
                 init_temperature: float = 1.0, target_entropy: float | None = None,
                 actor_update_every: int = 1, target_update_every: int = 1, augment_pad: int = 4,
                 critic_layernorm: bool = False, her=None, goal_fns: GoalFunctions | None = None,
                 num_envs: int = 1, compile: bool = False):
        super().__init__(action_space, device, seed)
        action_dim = self.action_dim
        self.encoder = encoder
        self.sac = SACCore(encoder.out_dim, action_dim, tuple(hidden_dims), lr, gamma, tau, init_temperature,
                           target_entropy, extra_critic_params=list(encoder.parameters()),
                           critic_layernorm=critic_layernorm)
        self.optimizers = self.sac.optimizers()
        self.batch_size = batch_size
        self.actor_update_every, self.target_update_every = actor_update_every, target_update_every
        self.augment_pad = augment_pad if getattr(encoder, "is_pixel", False) else 0
        self.replay = ReplayBuffer(buffer_size, *obs_layout(obs_space), action_dim, seed=seed, streams=num_envs)
        self.goal_fns = goal_fns
        fraction = float((her or {}).get("relabel_fraction", 0.8))
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"agent.her.relabel_fraction must be in [0, 1], got {fraction}")
        self.her_fraction = fraction if goal_fns is not None else 0.0  # HER needs the env's goal reward
        self.num_updates = 0
        self.to(self.device)
        if compile:
            self.compile_networks(self.encoder, self.sac.actor, self.sac.critic, self.sac.critic_target)

    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        with torch.no_grad():
            feat = self.encoder(self.obs_tensor(obs))
            return self.sac.act(feat, explore)[0].cpu().numpy()

    def act_batch(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        with torch.no_grad():
            return self.sac.act(self.encoder(self.batch_tensor(obs)), explore).cpu().numpy()

    def observe(self, obs, action, reward, next_obs, terminated, truncated, env_index: int = 0) -> None:
        self.replay.add(obs, action, reward, next_obs, terminated, truncated, stream=env_index)

    def buffers(self) -> dict[str, ReplayBuffer]:
        return {"replay": self.replay}

    def _augment(self, obs: torch.Tensor) -> torch.Tensor:
        return random_shift(obs, self.augment_pad) if self.augment_pad else obs

    def update(self, step: int) -> dict:
        b = self.replay.sample(self.batch_size, self.device)
        if self.her_fraction:
            relabel_future(b, self.replay, self.goal_fns, self.her_fraction)
        feat = self.encoder(self._augment(b["obs"]))
        with torch.no_grad():
            next_feat = self.encoder(self._augment(b["next_obs"]))
        discount = self.sac.gamma * (1.0 - b["terminated"])
        metrics = self.sac.update_critic(feat, b["action"], b["reward"], next_feat, discount)
        if self.goal_fns is not None:  # share of goal-reaching rewards the critic sees (sparse rewards: HER's point)
            metrics["train/batch_reward"] = b["reward"].mean()
        if self.num_updates % self.actor_update_every == 0:
            metrics.update(self.sac.update_actor_and_alpha(feat.detach()))
        if self.num_updates % self.target_update_every == 0:
            self.sac.update_target()
        self.num_updates += 1
        return metrics

    def extra_state(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_extra_state(self, state: dict) -> None:
        self.num_updates = state["num_updates"]
