"""Latent-space MBPO (seed latent_mbrl.md): learn a probabilistic encoder and an ensemble model of
the dynamics in its latent space, then train SAC on short model rollouts branched from real data.

The parts, in the order the data flows:

- `ProbabilisticEncoder`  E_phi(s) -> N(mu, sigma^2): the config's encoder (MLP for vectors, CNN for
  pixels) plus mean / log-variance heads. Training uses a reparameterised sample, acting and SAC use
  the mean. A slowly updated (EMA) copy gives the targets of the transition model, so the latent
  the model must predict does not move with every gradient step.
- `LatentEnsemble`  f_theta(z, a) -> (dz, r): MBPO/PETS-style ensemble of Gaussian networks run as
  one batched matmul; predicts the change of z and the reward (R_psi as an extra output, as MBPO
  does), with learned soft bounds on the log-variance and normalised inputs.
- a termination classifier (only when `termination=learned`) and an optional decoder D_omega(z).
- `ModelBuffer`  preallocated storage of imagined latent transitions.
- `LatentMBPO`  the agent: every `model_train_every` env steps it retrains encoder, ensemble,
  reward, termination and decoder jointly (one loss, one backward: transition NLL + reward NLL +
  reconstruction + KL), re-picks the elites on held-out real data, and every update it branches
  rollouts from real latents with the current policy and runs `updates_per_step` SAC updates on a
  real/model mix (`SACCore` from sac.py, on latents; SAC does not train the encoder).
"""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentrl.agents.base import Agent
from latentrl.agents.networks import EnsembleMLP, PixelDecoder, mlp, soft_update
from latentrl.agents.sac import SACCore
from latentrl.buffers import ReplayBuffer
from latentrl.config import ConfigError

TERMINATION_MODES = ("learned", "never")


# ---------------------------------------------------------------------------------------------- networks
class ProbabilisticEncoder(nn.Module):
    """The feature encoder of the `encoder` config group with Gaussian heads on top."""

    def __init__(self, features: nn.Module, latent_dim: int, log_std_bounds=(-5.0, 1.0)):
        super().__init__()
        self.features = features
        self.head = nn.Linear(features.out_dim, 2 * latent_dim)
        self.log_std_min, self.log_std_max = log_std_bounds

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mean, log_std), each (B, latent_dim); log_std softly squashed into its bounds."""
        mean, log_std = self.head(self.features(obs)).chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(log_std) + 1)
        return mean, log_std


class LatentEnsemble(nn.Module):
    """`n` Gaussian networks (z, a) -> (dz, r) evaluated as one batched computation.

    Inputs are normalised with statistics refreshed at every retrain (kept as buffers so they are
    checkpointed). The log-variance is softly bounded by learned limits (PETS appendix A.1)."""

    def __init__(self, n: int, latent_dim: int, action_dim: int, hidden_dims):
        super().__init__()
        self.n, self.latent_dim = n, latent_dim
        self.out_dim = latent_dim + 1  # dz and the reward
        self.net = EnsembleMLP(n, latent_dim + action_dim, hidden_dims, 2 * self.out_dim, activation=nn.SiLU)
        self.max_logvar = nn.Parameter(torch.full((1, 1, self.out_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((1, 1, self.out_dim), -10.0))
        self.register_buffer("in_mean", torch.zeros(latent_dim + action_dim))
        self.register_buffer("in_std", torch.ones(latent_dim + action_dim))

    def set_normaliser(self, x: torch.Tensor) -> None:
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(x.std(0).clamp_min(1e-6))

    def forward(self, z: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, d), action (B, A) -> mean, logvar each (n, B, d + 1): [dz..., reward]."""
        x = (torch.cat([z, action], dim=-1) - self.in_mean) / self.in_std
        mean, logvar = self.net(x).chunk(2, dim=-1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    def bound_penalty(self) -> torch.Tensor:
        """Keeps the learned log-variance bounds tight (they would otherwise drift apart)."""
        return self.max_logvar.sum() - self.min_logvar.sum()


class ModelBuffer:
    """Preallocated circular storage of imagined latent transitions (z, a, r, z', terminated).

    Sampling reads only the newest `window` entries, so the buffer holds `model_retain_retrains`
    retrains' worth of rollouts at the *current* rollout length (MBPO resizes its buffer instead)."""

    def __init__(self, capacity: int, latent_dim: int, action_dim: int, seed: int = 0):
        if capacity < 1:
            raise ConfigError(f"model buffer capacity must be >= 1, got {capacity}: raise agent.rollouts_per_step")
        self.capacity = int(capacity)
        self.z = np.zeros((capacity, latent_dim), dtype=np.float32)
        self.action = np.zeros((capacity, action_dim), dtype=np.float32)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.next_z = np.zeros((capacity, latent_dim), dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.rng = np.random.default_rng(seed)
        self.ptr, self.size = 0, 0

    def bytes_per_transition(self) -> int:
        return self.z[0].nbytes * 2 + self.action[0].nbytes + 4 + 4

    def __len__(self) -> int:
        return self.size

    def add(self, z: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, next_z: torch.Tensor,
            terminated: torch.Tensor) -> None:
        n = len(z)
        if n > self.capacity:
            raise ValueError(f"adding {n} transitions to a model buffer of capacity {self.capacity}")
        idx = (self.ptr + np.arange(n)) % self.capacity
        for arr, val in ((self.z, z), (self.action, action), (self.reward, reward), (self.next_z, next_z),
                         (self.terminated, terminated)):
            arr[idx] = val.detach().cpu().numpy()
        self.ptr = int((self.ptr + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, window: int, device) -> dict[str, torch.Tensor]:
        """n transitions uniformly from the newest min(window, size) entries."""
        window = max(1, min(window, self.size))
        idx = (self.ptr - 1 - self.rng.integers(0, window, n)) % self.capacity
        t = lambda a: torch.as_tensor(a[idx], device=device)  # noqa: E731
        return {"z": t(self.z), "action": t(self.action), "reward": t(self.reward), "next_z": t(self.next_z),
                "terminated": t(self.terminated)}

    _ARRAYS = ("z", "action", "reward", "next_z", "terminated")

    def state_dict(self) -> dict:
        # stored in ring order up to `size` (all of the ring once it has wrapped)
        state = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)[: self.size])) for k in self._ARRAYS}
        state.update(ptr=self.ptr, size=self.size, capacity=self.capacity, rng=self.rng.bit_generator.state)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"checkpointed model buffer has capacity {state['capacity']}, config gives "
                             f"{self.capacity}")
        for k in self._ARRAYS:
            getattr(self, k)[: state["size"]] = state[k].numpy()
        self.ptr, self.size = state["ptr"], state["size"]
        self.rng.bit_generator.state = state["rng"]


# ---------------------------------------------------------------------------------------------- the agent
def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


class LatentMBPO(Agent):
    """MBPO (Janner et al. 2019) in the latent space of a jointly trained probabilistic encoder."""

    def __init__(self, encoder: nn.Module, obs_space: gym.spaces.Box, action_space: gym.spaces.Box,
                 device: str = "cpu", seed: int = 0, latent_dim: int = 32, encoder_tau: float = 0.01,
                 kl_weight: float = 1e-3, decoder: bool = True, decoder_weight: float = 1.0,
                 reward_weight: float = 1.0, termination: str = "learned", ensemble_size: int = 7,
                 num_elites: int = 5, model_hidden_dims=(200, 200, 200), model_lr: float = 1e-3,
                 model_weight_decay: float = 5e-5, model_batch_size: int = 256, model_train_every: int = 250,
                 model_train_steps: int = 250, model_init_train_steps: int = 1000, holdout_every: int = 10,
                 holdout_size: int = 2000, bootstrap: bool = True, multistep_horizon: int = 5,
                 rollout_schedule=(20000, 100000, 1, 1), rollouts_per_step: int = 400,
                 rollout_noise: bool = True, model_retain_retrains: int = 4, real_ratio: float = 0.05,
                 updates_per_step: int = 10,
                 hidden_dims=(256, 256), lr: float = 3e-4, gamma: float = 0.99, tau: float = 0.005,
                 batch_size: int = 256, buffer_size: int = 1_000_000, init_temperature: float = 1.0,
                 target_entropy: float | None = None, actor_update_every: int = 1):
        super().__init__(action_space, device, seed)
        rollout_schedule = [int(v) for v in rollout_schedule]
        _check(len(rollout_schedule) == 4 and 1 <= rollout_schedule[2] <= rollout_schedule[3]
               and rollout_schedule[0] <= rollout_schedule[1],
               f"agent.rollout_schedule must be [start_step, end_step, min_len, max_len] with start <= end and "
               f"1 <= min_len <= max_len, got {rollout_schedule}")
        _check(1 <= num_elites <= ensemble_size,
               f"agent.num_elites must be in [1, agent.ensemble_size={ensemble_size}], got {num_elites}")
        _check(0.0 <= real_ratio <= 1.0, f"agent.real_ratio must be in [0, 1], got {real_ratio}")
        _check(termination in TERMINATION_MODES,
               f"agent.termination must be one of {TERMINATION_MODES}, got '{termination}'")
        for name, v in (("latent_dim", latent_dim), ("model_train_every", model_train_every),
                        ("model_batch_size", model_batch_size), ("updates_per_step", updates_per_step),
                        ("rollouts_per_step", rollouts_per_step), ("model_retain_retrains", model_retain_retrains),
                        ("holdout_every", holdout_every), ("multistep_horizon", multistep_horizon),
                        ("batch_size", batch_size)):
            _check(int(v) >= 1, f"agent.{name} must be >= 1, got {v}")
        _check(holdout_every >= 2, f"agent.holdout_every must be >= 2 (every N-th real transition is held out), "
                                   f"got {holdout_every}")
        _check(0.0 < encoder_tau <= 1.0, f"agent.encoder_tau must be in (0, 1], got {encoder_tau}")

        self.latent_dim, self.termination = latent_dim, termination
        self.is_pixel = bool(getattr(encoder, "is_pixel", False))
        self.encoder_tau, self.kl_weight = encoder_tau, kl_weight
        self.decoder_weight, self.reward_weight = decoder_weight, reward_weight
        self.num_elites, self.bootstrap = num_elites, bootstrap
        self.model_batch_size, self.model_train_every = model_batch_size, model_train_every
        self.model_train_steps, self.model_init_train_steps = model_train_steps, model_init_train_steps
        self.holdout_every, self.holdout_size, self.multistep_horizon = holdout_every, holdout_size, multistep_horizon
        self.rollout_schedule, self.rollouts_per_step = rollout_schedule, rollouts_per_step
        self.rollout_noise = rollout_noise
        self.model_retain_retrains, self.real_ratio = model_retain_retrains, real_ratio
        self.updates_per_step, self.batch_size = updates_per_step, batch_size
        self.actor_update_every = actor_update_every

        # -- world model: encoder (+ EMA target), ensemble with reward output, termination, decoder
        self.encoder = ProbabilisticEncoder(encoder, latent_dim)
        self.encoder_target = copy.deepcopy(self.encoder).requires_grad_(False)
        self.ensemble = LatentEnsemble(ensemble_size, latent_dim, self.action_dim, tuple(model_hidden_dims))
        self.register_buffer("elites", torch.arange(num_elites))
        self.term_model = mlp(latent_dim + self.action_dim, (256, 256), 1) if termination == "learned" else None
        self.decoder = None
        if decoder:
            self.decoder = (PixelDecoder(latent_dim, tuple(obs_space.shape)) if self.is_pixel
                            else mlp(latent_dim, (256, 256), int(np.prod(obs_space.shape))))
            # vector reconstructions are compared in units of each dimension's spread
            self.register_buffer("obs_mean", torch.zeros(int(np.prod(obs_space.shape))))
            self.register_buffer("obs_std", torch.ones(int(np.prod(obs_space.shape))))
        world = [*self.encoder.parameters(), *(self.term_model.parameters() if self.term_model else []),
                 *(self.decoder.parameters() if self.decoder else [])]
        self.model_opt = torch.optim.Adam([
            {"params": world},
            {"params": list(self.ensemble.parameters()), "weight_decay": model_weight_decay},
        ], lr=model_lr)

        # -- policy on latents
        self.sac = SACCore(latent_dim, self.action_dim, tuple(hidden_dims), lr, gamma, tau, init_temperature,
                           target_entropy)
        self.optimizers = {"model": self.model_opt, **self.sac.optimizers()}

        # -- data
        self.replay = ReplayBuffer(buffer_size, obs_space.shape, obs_space.dtype, self.action_dim, seed=seed)
        self.retrain_capacity = rollouts_per_step * model_train_every  # rollout starts per retrain
        self.model_buffer = ModelBuffer(self.retrain_capacity * model_retain_retrains * rollout_schedule[3],
                                        latent_dim, self.action_dim, seed=seed + 1)

        # -- counters (checkpointed in extra_state)
        self.env_steps = 0  # transitions observed
        self.last_retrain_step = -1  # env step of the last model retrain (-1: never)
        self.num_retrains = 0
        self.num_updates = 0  # SAC updates
        self.to(self.device)

    # ------------------------------------------------------------------ acting and storing
    def _obs(self, obs) -> torch.Tensor:
        """Observations as the encoder wants them: pixels stay uint8 (the CNN scales them)."""
        obs = torch.as_tensor(obs, device=self.device)
        return obs if self.is_pixel else obs.float()

    @torch.no_grad()
    def encode_mean(self, obs, target: bool = False) -> torch.Tensor:
        """The latent used for acting, rollout starts, SAC on real data (no sampling noise)."""
        return (self.encoder_target if target else self.encoder)(self._obs(obs))[0]

    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        z = self.encode_mean(np.asarray(obs)[None])
        return self.sac.act(z, explore)[0].cpu().numpy()

    def observe(self, obs, action, reward, next_obs, terminated, truncated) -> None:
        self.replay.add(obs, action, reward, next_obs, terminated, truncated)
        self.env_steps += 1

    def buffers(self) -> dict:
        return {"replay": self.replay, "model": self.model_buffer}

    # ------------------------------------------------------------------ the update cycle
    def rollout_length(self, env_step: int | None = None) -> int:
        """MBPO's linear schedule [start, end, min_len, max_len], keyed on env steps."""
        start, end, lo, hi = self.rollout_schedule
        step = self.env_steps if env_step is None else env_step
        frac = 1.0 if end == start else min(max((step - start) / (end - start), 0.0), 1.0)
        return int(lo + frac * (hi - lo))

    def update(self, step: int) -> dict:
        """One env step's worth of learning: retrain the model when due, branch rollouts, then
        `updates_per_step` SAC updates."""
        metrics: dict = {}
        if self.last_retrain_step < 0 or self.env_steps - self.last_retrain_step >= self.model_train_every:
            metrics.update(self.train_model())
        metrics.update(self.rollout(self.rollouts_per_step))
        metrics.update(self.update_policy())
        return metrics

    # ------------------------------------------------------------------ model learning
    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        """Real transition slots for training and held out (every `holdout_every`-th slot, a fixed
        split so the elites are judged on data no member trained on)."""
        slots = np.flatnonzero(self.replay.valid[: self.replay.size])
        held = slots % self.holdout_every == 0
        if held.all() or not held.any():  # too little data for a split: judge on training data
            return slots, slots
        return slots[~held], slots[held]

    def _normalised_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Reconstruction targets: pixels in [-0.5, 0.5], vectors standardised per dimension."""
        if self.is_pixel:
            return obs.float() / 255.0 - 0.5
        return (obs.flatten(1).float() - self.obs_mean) / self.obs_std

    @torch.no_grad()
    def _refresh_statistics(self, train_idx: np.ndarray) -> None:
        """Input normaliser of the ensemble (current encoder means) and reconstruction scale."""
        idx = train_idx[self.np_rng.integers(0, len(train_idx), min(len(train_idx), 5000))]
        b = self.replay.gather(idx, self.device)
        z = self.encode_mean(b["obs"])
        self.ensemble.set_normaliser(torch.cat([z, b["action"]], dim=-1))
        if self.decoder is not None and not self.is_pixel:
            obs = b["obs"].flatten(1).float()
            self.obs_mean.copy_(obs.mean(0))
            self.obs_std.copy_(obs.std(0).clamp_min(1e-3) if len(obs) > 1 else torch.ones_like(self.obs_mean))

    def model_loss(self, b: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The joint loss of encoder, ensemble, reward, termination and decoder on a real batch.
        Returns (loss, metrics, per-member NLL)."""
        mean, log_std = self.encoder(self._obs(b["obs"]))
        z = mean + log_std.exp() * torch.randn_like(mean)
        with torch.no_grad():
            z_next = self.encoder_target(self._obs(b["next_obs"]))[0]
        pred, logvar = self.ensemble(z, b["action"])  # (n, B, d + 1): [dz, reward]
        # the model predicts z' = z + dz from the *sampled* z, so the encoder gets the transition gradient
        d, n = self.latent_dim, self.ensemble.n
        pred_next = torch.cat([z.unsqueeze(0) + pred[..., :d], pred[..., d:]], dim=-1)
        target = torch.cat([z_next, b["reward"].unsqueeze(-1)], dim=-1).unsqueeze(0).expand(n, -1, -1)
        nll = (pred_next - target) ** 2 * torch.exp(-logvar) + logvar  # (n, B, d + 1)
        trans_nll, rew_nll = nll[..., :d].mean(-1), nll[..., d]  # (n, B)
        per_sample = trans_nll + self.reward_weight * rew_nll
        if self.bootstrap:  # online bootstrap: Poisson(1) weights give each member its own resample
            w = torch.poisson(torch.ones_like(per_sample))
            per_member = (per_sample * w).sum(1) / w.sum(1).clamp_min(1.0)
        else:
            per_member = per_sample.mean(1)
        kl = 0.5 * (mean.pow(2) + (2 * log_std).exp() - 1 - 2 * log_std).sum(-1).mean()
        loss = per_member.sum() + 0.01 * self.ensemble.bound_penalty() + self.kl_weight * kl
        metrics = {"loss/transition": trans_nll.mean().detach(), "loss/reward": rew_nll.mean().detach(),
                   "loss/kl": kl.detach(), "model/encoder_std": log_std.exp().mean().detach()}
        if self.term_model is not None:
            logit = self.term_model(torch.cat([z, b["action"]], dim=-1)).squeeze(-1)
            term_loss = F.binary_cross_entropy_with_logits(logit, b["terminated"])
            loss = loss + term_loss
            metrics["loss/termination"] = term_loss.detach()
        if self.decoder is not None:
            recon = F.mse_loss(self.decoder(z), self._normalised_obs(b["obs"]))
            loss = loss + self.decoder_weight * recon
            metrics["loss/decoder"] = recon.detach()
        metrics["loss/encoder"] = loss.detach()
        return loss, metrics, per_member.detach()

    def train_model(self) -> dict:
        """Retrain the world model on all real data so far, then re-pick the elites."""
        train_idx, held_idx = self._split()
        self._refresh_statistics(train_idx)
        steps = self.model_init_train_steps if self.num_retrains == 0 else self.model_train_steps
        sums: dict = {}
        member_loss = torch.zeros(self.ensemble.n, device=self.device)
        for _ in range(steps):
            b = self.replay.gather(train_idx[self.np_rng.integers(0, len(train_idx), self.model_batch_size)],
                                   self.device)
            loss, info, per_member = self.model_loss(b)
            self.model_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.model_opt.step()
            soft_update(self.encoder_target, self.encoder, self.encoder_tau)
            member_loss += per_member
            for k, v in info.items():
                sums[k] = sums.get(k, 0.0) + v
        self.last_retrain_step, self.num_retrains = self.env_steps, self.num_retrains + 1
        metrics = {k: v / max(steps, 1) for k, v in sums.items()}
        member_loss /= max(steps, 1)
        metrics.update(self.evaluate_model(held_idx))
        for m in range(self.ensemble.n):
            metrics[f"model/train_loss_m{m}"] = member_loss[m]
        metrics["model/retrains"] = float(self.num_retrains)
        return metrics

    @torch.no_grad()
    def evaluate_model(self, held_idx: np.ndarray) -> dict:
        """Held-out MSE per member (mean prediction; picks the elites, as MBPO), reward error, and
        one-step / open-loop multi-step latent errors of the elite mean, relative to the spread of
        the target latents (so they stay comparable while the latent scale drifts)."""
        idx = held_idx[self.np_rng.integers(0, len(held_idx), min(len(held_idx), self.holdout_size))]
        b = self.replay.gather(idx, self.device)
        z = self.encode_mean(b["obs"])
        z_next = self.encode_mean(b["next_obs"], target=True)
        pred, _ = self.ensemble(z, b["action"])
        d = self.latent_dim
        trans_mse = ((z.unsqueeze(0) + pred[..., :d] - z_next) ** 2).mean((1, 2))
        rew_mse = ((pred[..., d] - b["reward"]) ** 2).mean(1)
        holdout = trans_mse + rew_mse
        self.elites.copy_(torch.sort(torch.argsort(holdout)[: self.num_elites]).values)
        metrics = {f"model/holdout_loss_m{m}": holdout[m] for m in range(self.ensemble.n)}
        elite_set = set(self.elites.tolist())
        metrics.update({f"model/elite_mask_m{m}": float(m in elite_set) for m in range(self.ensemble.n)})
        metrics["model/reward_mse"] = rew_mse[self.elites].mean()
        metrics["model/holdout_loss_elites"] = holdout[self.elites].mean()
        metrics.update(self._open_loop_errors(held_idx))
        return metrics

    @torch.no_grad()
    def _open_loop_errors(self, idx: np.ndarray) -> dict:
        """Predict H steps ahead from real latents with the real actions and no re-encoding."""
        H, rb = self.multistep_horizon, self.replay
        idx = idx[self.np_rng.integers(0, len(idx), min(len(idx), self.holdout_size))]
        # keep starts whose next H transitions lie in one episode and do not terminate before the end
        ok = np.ones(len(idx), dtype=bool)
        for k in range(H):
            s = (idx + k) % rb.capacity
            ok &= rb.valid[s] & (rb.episode[s] == rb.episode[idx]) & ((k == H - 1) | ~rb.terminated[s])
        ok &= (idx + H) % rb.capacity != rb.ptr  # the slot after the H-th transition holds its next obs
        idx = idx[ok]
        if len(idx) == 0:
            return {}
        z = self.encode_mean(rb.obs[idx])
        metrics = {}
        for k in range(H):
            s = (idx + k) % rb.capacity
            pred, _ = self.ensemble(z, torch.as_tensor(rb.action[s], device=self.device))
            z = z + pred[self.elites, :, : self.latent_dim].mean(0)
            if k in (0, H - 1):
                target = self.encode_mean(rb.obs[(s + 1) % rb.capacity], target=True)
                err = ((z - target) ** 2).mean() / target.var(0).mean().clamp_min(1e-8)
                metrics["model/latent_err_1step" if k == 0 else f"model/latent_err_{H}step"] = err
        return metrics

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def rollout(self, n: int) -> dict:
        """Branch `n` rollouts from latents of real states (current encoder mean) with the current
        policy; each step picks one elite per rollout and samples its Gaussian (or takes its mean
        with rollout_noise=false). A predicted termination ends that rollout."""
        length = self.rollout_length()
        z = self.encode_mean(self.replay.obs[self.replay.sample_idx(n)])
        added = 0
        for _ in range(length):
            action = self.sac.act(z, explore=True)
            mean, logvar = self.ensemble(z, action)
            member = self.elites[torch.randint(0, self.num_elites, (len(z),), device=self.device)]
            rows = torch.arange(len(z), device=self.device)
            sample = mean[member, rows]
            if self.rollout_noise:
                sample = sample + (0.5 * logvar[member, rows]).exp() * torch.randn_like(sample)
            next_z, reward = z + sample[:, : self.latent_dim], sample[:, self.latent_dim]
            if self.term_model is not None:
                done = torch.sigmoid(self.term_model(torch.cat([z, action], -1)).squeeze(-1)) > 0.5
            else:
                done = torch.zeros(len(z), dtype=torch.bool, device=self.device)
            self.model_buffer.add(z, action, reward, next_z, done.float())
            added += len(z)
            z = next_z[~done]
            if len(z) == 0:
                break
        return {"model/rollout_length": float(length), "model/rollout_transitions": float(added),
                "model/buffer_size": float(len(self.model_buffer))}

    def model_window(self) -> int:
        """How many newest model transitions count: `model_retain_retrains` retrains' worth."""
        return self.retrain_capacity * self.model_retain_retrains * self.rollout_length()

    # ------------------------------------------------------------------ policy learning
    def sample_batches(self, updates: int) -> dict[str, torch.Tensor]:
        """`updates` SAC batches at once, each `real_ratio` real transitions (encoded with the
        current encoder mean, detached) followed by model transitions; -> tensors (updates, batch, ...)."""
        n_real = int(round(self.batch_size * self.real_ratio)) if len(self.model_buffer) else self.batch_size
        n_model = self.batch_size - n_real
        parts = []
        if n_real:
            r = self.replay.sample(updates * n_real, self.device)
            parts.append({"z": self.encode_mean(r["obs"]), "action": r["action"], "reward": r["reward"],
                          "next_z": self.encode_mean(r["next_obs"]), "terminated": r["terminated"]})
        if n_model:
            parts.append(self.model_buffer.sample(updates * n_model, self.model_window(), self.device))
        return {k: torch.cat([p[k].view(updates, -1, *p[k].shape[1:]) for p in parts], dim=1) for k in parts[0]}

    def update_policy(self) -> dict:
        batches = self.sample_batches(self.updates_per_step)
        sums: dict = {}
        for g in range(self.updates_per_step):
            b = {k: v[g] for k, v in batches.items()}
            info = self.sac.update_critic(b["z"], b["action"], b["reward"], b["next_z"],
                                          self.sac.gamma * (1.0 - b["terminated"]))
            if self.num_updates % self.actor_update_every == 0:
                info.update(self.sac.update_actor_and_alpha(b["z"]))
            self.sac.update_target()
            self.num_updates += 1
            for k, v in info.items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / self.updates_per_step for k, v in sums.items()}

    # ------------------------------------------------------------------ logging and checkpoints
    @torch.no_grad()
    def images(self) -> dict:
        """Newest real frame next to its reconstruction (pixel envs with a decoder). Uses no RNG."""
        if self.decoder is None or not self.is_pixel or self.replay.size == 0:
            return {}
        obs = self.replay.obs[(self.replay.ptr - 1) % self.replay.capacity if not self.replay.episode_open
                              else self.replay.ptr][None]
        recon = self.decoder(self.encode_mean(obs))[0].clamp(-0.5, 0.5) + 0.5
        real = torch.as_tensor(obs[0], device=self.device).float() / 255.0
        c = min(3, real.shape[0])
        return {"model/reconstruction": torch.cat([real[-c:], recon[-c:]], dim=-1).cpu().numpy()}

    def extra_state(self) -> dict:
        return {"env_steps": self.env_steps, "last_retrain_step": self.last_retrain_step,
                "num_retrains": self.num_retrains, "num_updates": self.num_updates}

    def load_extra_state(self, state: dict) -> None:
        self.env_steps, self.last_retrain_step = state["env_steps"], state["last_retrain_step"]
        self.num_retrains, self.num_updates = state["num_retrains"], state["num_updates"]
