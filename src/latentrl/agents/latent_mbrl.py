"""Latent model-based RL (seed latent_mbrl.md): an encoder E(s) -> z, a latent transition model
f(z, a) -> z', a reward model R(z, a), a termination model and an optional decoder D(z), trained
jointly; the model then trains the policy.

Why this shape (ALM, MR.Q, TD-MPC2, TD7 agree on it, and the MBPO-style agent it replaces failed it):

- **The critic learns from real transitions only**, in the coordinates of a slow target encoder
  E_bar (an EMA of E). Updating the world model changes E, not E_bar, so the critic's and actor's
  inputs move only as fast as E_bar does (`encoder_tau` per update), never by a retrain's jump, and
  real s and s' are always encoded by the same network.
- **The encoder learns by multi-step latent self-prediction**: from z_0 = E(s_t), f is unrolled for
  `horizon` steps on the *real* actions and each z_j is matched to E_bar(s_{t+j}); the reward and
  termination heads are fitted along the same unroll. Steps past an episode's end are masked.
  Latents are AvgL1-normalised (mean |z_i| = 1: TD7/MR.Q), so they can neither collapse nor blow up.
- **How the model trains the policy is one switch** (`policy_learning`):
  `svg`  the actor's gradient flows through `horizon`-step imagined latent rollouts (predicted
         rewards minus the entropy term, plus the discounted soft Q at the end), as ALM / SAC-SVG(H);
  `mbpo` a `model_share` of every critic batch is one-step model transitions branched from the
         batch's own real latents with the current policy, made and consumed in the same update (so
         model data is never in stale coordinates, the MBPO-style buffer's failure);
  `none` the model only shapes the representation, as MR.Q.

The critic/actor/temperature are `SACCore` from sac.py (LayerNorm critic by default). The model is
an ensemble of `ensemble_size` members run as one batched call; imagination uses the mean of the
`num_elites` members with the lowest running one-step error (measured on each batch before training
on it), and mbpo branches through a random elite per sample.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentrl.agents.base import Agent
from latentrl.agents.networks import EnsembleMLP, PixelDecoder, mlp, random_shift, soft_update
from latentrl.agents.sac import SACCore
from latentrl.buffers import ReplayBuffer
from latentrl.config import ConfigError

POLICY_LEARNING = ("svg", "mbpo", "none")
TERMINATION_MODES = ("learned", "never")


def avg_l1_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each latent so its mean absolute entry is 1 (TD7's AvgL1Norm)."""
    return x / x.abs().mean(-1, keepdim=True).clamp_min(eps)


class LatentEncoder(nn.Module):
    """The `encoder` group's feature network (MLP for vectors, CNN for pixels), a linear head to the
    latent size, and AvgL1Norm."""

    def __init__(self, features: nn.Module, latent_dim: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(features.out_dim, latent_dim)
        self.out_dim = latent_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return avg_l1_norm(self.head(self.features(obs)))


class LatentModel(nn.Module):
    """f, R and the termination logit of `n` members from (z, a), one batched call.

    f predicts a residual: z' = AvgL1Norm(z + dz), so an untrained model starts near "nothing moves"."""

    def __init__(self, n: int, latent_dim: int, action_dim: int, hidden_dims, termination: bool):
        super().__init__()
        self.n, self.latent_dim, self.termination = n, latent_dim, termination
        out = latent_dim + 1 + int(termination)
        self.net = EnsembleMLP(n, latent_dim + action_dim, hidden_dims, out, activation=nn.ELU, layernorm=True)

    def embed(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The last hidden layer (n, B, h): a state-action embedding from which z', r and the
        termination are read out linearly (the critic may read it too: TD7/MR.Q's zsa)."""
        if z.dim() == 3 and action.dim() == 2:  # members' own latents, one shared (real) action per sample
            action = action.expand(z.shape[0], -1, -1)
        x = torch.cat([z, action], -1)
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.n, -1, -1)
        return self.net.net[:-1](x)

    def forward(self, z: torch.Tensor, action: torch.Tensor):
        """z (B, d) or (n, B, d), action likewise -> z' (n, B, d), reward (n, B), termination logit (n, B) or None."""
        out = self.net.net[-1](self.embed(z, action))
        d = self.latent_dim
        z_next = avg_l1_norm(z + out[..., :d])
        term_logit = out[..., d + 1] if self.termination else None
        return z_next, out[..., d], term_logit


class LatentMBRL(Agent):
    vector_envs = True

    def __init__(self, encoder: nn.Module, obs_space: gym.spaces.Box, action_space: gym.spaces.Box,
                 device: str = "cpu", seed: int = 0,
                 # world model
                 latent_dim: int = 64, horizon: int = 3, ensemble_size: int = 1, num_elites: int = 1,
                 model_hidden_dims=(256, 256), model_lr: float = 3e-4, encoder_tau: float = 0.005,
                 dynamics_weight: float = 1.0, reward_weight: float = 0.5, termination: str = "learned",
                 termination_weight: float = 0.1, decoder: bool = False, decoder_weight: float = 1.0,
                 grad_clip: float = 10.0,
                 # how the model trains the policy
                 policy_learning: str = "none", model_share: float = 0.25, critic_sa_features: bool = True,
                 # actor-critic on latents
                 hidden_dims=(256, 256), lr: float = 3e-4, gamma: float = 0.99, tau: float = 0.005, n_step: int = 1,
                 critic_layernorm: bool = True, batch_size: int = 256, buffer_size: int = 1_000_000,
                 init_temperature: float = 1.0, target_entropy: float | None = None, augment_pad: int = 4,
                 diagnostics_every: int = 250, num_envs: int = 1, compile: bool = False):
        super().__init__(action_space, device, seed)
        self._validate(policy_learning, horizon, model_share, n_step, ensemble_size, num_elites, termination,
                       latent_dim, encoder_tau)
        self.policy_learning, self.horizon, self.model_share, self.n_step = policy_learning, horizon, model_share, n_step
        self.gamma, self.encoder_tau, self.grad_clip = gamma, encoder_tau, grad_clip
        self.weights = {"dynamics": dynamics_weight, "reward": reward_weight, "termination": termination_weight,
                        "decoder": decoder_weight}
        self.batch_size, self.diagnostics_every = batch_size, diagnostics_every
        self.is_pixel = bool(getattr(encoder, "is_pixel", False))
        self.augment_pad = augment_pad if self.is_pixel else 0

        self.encoder = LatentEncoder(encoder, latent_dim)
        self.encoder_target = copy.deepcopy(self.encoder).requires_grad_(False)
        self.model = LatentModel(ensemble_size, latent_dim, self.action_dim, tuple(model_hidden_dims),
                                 termination == "learned")
        self.decoder = None
        if decoder:
            self.decoder = (PixelDecoder(latent_dim, obs_space.shape) if self.is_pixel
                            else mlp(latent_dim, (256,), int(np.prod(obs_space.shape))))
        self.num_elites = num_elites
        self.register_buffer("elites", torch.arange(num_elites))
        self.register_buffer("member_error", torch.zeros(ensemble_size))  # running one-step error per member
        world = [*self.encoder.parameters(), *self.model.parameters(),
                 *(self.decoder.parameters() if self.decoder is not None else [])]
        self.model_opt = torch.optim.Adam(world, lr=model_lr)
        # a slow copy of the model gives the critic's state-action features, as E_bar gives its latents
        self.model_target = copy.deepcopy(self.model).requires_grad_(False)
        self.sac = SACCore(latent_dim, self.action_dim, tuple(hidden_dims), lr, gamma, tau, init_temperature,
                           target_entropy, critic_layernorm=critic_layernorm,
                           sa_features=self.sa_features if critic_sa_features else None,
                           sa_dim=model_hidden_dims[-1] if critic_sa_features else 0)
        self.optimizers = {"model": self.model_opt, **self.sac.optimizers()}
        self.replay = ReplayBuffer(buffer_size, obs_space.shape, obs_space.dtype, self.action_dim, seed=seed,
                                   streams=num_envs)
        self.num_updates = 0
        self._last_obs: torch.Tensor | None = None  # a batch's first observation, for images()
        self.to(self.device)
        if compile:  # the networks the update calls through forward (the target model is read through embed)
            self.compile_networks(*(m for m in (self.encoder, self.encoder_target, self.model, self.decoder,
                                                self.sac.actor, self.sac.critic, self.sac.critic_target)
                                    if m is not None))

    @staticmethod
    def _validate(policy_learning, horizon, model_share, n_step, ensemble_size, num_elites, termination,
                  latent_dim, encoder_tau) -> None:
        def bad(key, value, fix):
            raise ConfigError(f"agent.{key}={value!r} is invalid: {fix}")

        if policy_learning not in POLICY_LEARNING:
            bad("policy_learning", policy_learning, f"use one of {', '.join(POLICY_LEARNING)}")
        if not isinstance(horizon, int) or horizon < 1:
            bad("horizon", horizon, "the model unroll length must be an integer >= 1 (3-5 is typical)")
        if not 0.0 <= float(model_share) <= 1.0:
            bad("model_share", model_share, "the share of model transitions in a critic batch must be in [0, 1]")
        if not isinstance(n_step, int) or not 1 <= n_step <= horizon:
            bad("n_step", n_step, f"n-step returns need 1 <= n_step <= agent.horizon ({horizon})")
        if ensemble_size < 1 or not 1 <= num_elites <= ensemble_size:
            bad("num_elites", num_elites, f"need 1 <= num_elites <= agent.ensemble_size ({ensemble_size})")
        if termination not in TERMINATION_MODES:
            bad("termination", termination, f"use one of {', '.join(TERMINATION_MODES)}")
        if latent_dim < 1:
            bad("latent_dim", latent_dim, "use a positive latent size")
        if not 0.0 < encoder_tau <= 1.0:
            bad("encoder_tau", encoder_tau, "the target encoder's EMA rate must be in (0, 1]")

    # ------------------------------------------------------------------ acting and storing
    @torch.no_grad()
    def latent(self, obs: torch.Tensor) -> torch.Tensor:
        """The coordinates the critic and actor work in: the target encoder's latent."""
        return self.encoder_target(obs)

    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        with torch.no_grad():
            return self.sac.act(self.latent(self.obs_tensor(obs)), explore)[0].cpu().numpy()

    def act_batch(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        with torch.no_grad():
            return self.sac.act(self.latent(self.batch_tensor(obs)), explore).cpu().numpy()

    def observe(self, obs, action, reward, next_obs, terminated, truncated, env_index: int = 0) -> None:
        self.replay.add(obs, action, reward, next_obs, terminated, truncated, stream=env_index)

    def buffers(self) -> dict[str, ReplayBuffer]:
        return {"replay": self.replay}

    def sa_features(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The target model's state-action embedding (mean over elites) for the critic: it moves only
        with the target encoder, and stays differentiable in the action for the actor's gradient."""
        return self.model_target.embed(z, action)[self.elites].mean(0)

    # ------------------------------------------------------------------ imagination
    def imagine(self, z: torch.Tensor, action: torch.Tensor, sample_member: bool = False):
        """One model step from latents: the elites' mean (svg), or one random elite per sample (mbpo).
        -> z' (B, d), reward (B,), continuation probability (B,)."""
        z_next, reward, term_logit = self.model(z, action)
        elites = self.elites
        if sample_member:
            pick = elites[torch.randint(len(elites), (z.shape[0],), device=z.device)]
            rows = torch.arange(z.shape[0], device=z.device)
            z_next, reward = z_next[pick, rows], reward[pick, rows]
            cont = 1 - torch.sigmoid(term_logit[pick, rows]) if term_logit is not None else torch.ones_like(reward)
        else:
            z_next, reward = avg_l1_norm(z_next[elites].mean(0)), reward[elites].mean(0)
            cont = (1 - torch.sigmoid(term_logit[elites]).mean(0)) if term_logit is not None else torch.ones_like(reward)
        return z_next, reward, cont

    # ------------------------------------------------------------------ learning
    def update(self, step: int) -> dict:
        b = self.replay.sample_sequences(self.batch_size, self.horizon, self.device)
        n, h1 = b["obs"].shape[:2]
        with torch.no_grad():  # every latent the critic, the actor and the model's targets see
            z_bar = self.encoder_target(b["obs"].flatten(0, 1)).view(n, h1, -1)
        metrics = self.update_model(b, z_bar)
        metrics.update(self.update_critic(b, z_bar))
        if self.policy_learning == "svg":
            metrics.update(self.update_actor_svg(z_bar[:, 0]))
        else:
            metrics.update(self.sac.update_actor_and_alpha(z_bar[:, 0]))
        self.sac.update_target()
        soft_update(self.encoder_target, self.encoder, self.encoder_tau)
        soft_update(self.model_target, self.model, self.encoder_tau)
        if self.diagnostics_every and self.num_updates % self.diagnostics_every == 0:
            metrics.update(self.diagnostics(b, z_bar))
        self.num_updates += 1
        return metrics

    def update_model(self, b: dict, z_bar: torch.Tensor) -> dict:
        """Unroll f from E(s_t) on the real actions for `horizon` steps against E_bar(s_{t+j}), with
        reward, termination and (optional) reconstruction losses; one backward through all of it."""
        obs0, mask, actions = b["obs"][:, 0], b["mask"], b["action"]
        obs_in = random_shift(obs0, self.augment_pad) if self.augment_pad else obs0
        z = self.encoder(obs_in)
        valid = mask.sum().clamp_min(1.0)
        dyn = rew = term = 0.0
        first_err = last_err = None
        imagined_return = torch.zeros(mask.shape[0], device=z.device)
        pred = z
        for j in range(self.horizon):
            z_next, r_hat, t_logit = self.model(pred, actions[:, j])
            err = ((z_next - z_bar[:, j + 1]) ** 2).mean(-1)  # (members, B)
            m = mask[:, j]
            dyn = dyn + (err * m).sum() / valid
            rew = rew + (((r_hat - b["reward"][:, j]) ** 2) * m).sum() / valid
            if t_logit is not None:
                labels = b["terminated"][:, j].expand_as(t_logit)
                term = term + (F.binary_cross_entropy_with_logits(t_logit, labels, reduction="none") * m).sum() / valid
            with torch.no_grad():
                member_err = (err * m).sum(-1) / m.sum().clamp_min(1.0)
                first_err = member_err if first_err is None else first_err
                last_err = member_err
                imagined_return += self.gamma ** j * r_hat.detach().mean(0) * m
            pred = z_next
        loss = self.weights["dynamics"] * dyn + self.weights["reward"] * rew + self.weights["termination"] * term
        recon = torch.zeros((), device=z.device)
        if self.decoder is not None:
            target = obs0.float() / 255.0 - 0.5 if self.is_pixel else obs0.flatten(1).float()
            recon = F.mse_loss(self.decoder(z).view_as(target), target)
            loss = loss + self.weights["decoder"] * recon
            self._last_obs = obs0[:1].detach()
        self.model_opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model_opt.param_groups[0]["params"], self.grad_clip)
        self.model_opt.step()

        with torch.no_grad():  # elites: lowest running one-step error, measured before training on the batch
            self.member_error.lerp_(first_err, 0.01 if self.num_updates else 1.0)
            self.elites.copy_(torch.argsort(self.member_error)[: self.num_elites])
            step_change = (((z_bar[:, 1] - z_bar[:, 0]) ** 2).mean(-1) * mask[:, 0]).sum() / mask[:, 0].sum().clamp_min(1)
            step_change = step_change.clamp_min(1e-8)
            discounts = self.gamma ** torch.arange(self.horizon, device=z.device)
            real_return = (b["reward"] * discounts).sum(1)
        return {"loss/model": loss.detach(), "loss/dynamics": dyn.detach(), "loss/reward": rew.detach(),
                "loss/termination": torch.as_tensor(term, device=z.device).detach(), "loss/decoder": recon.detach(),
                "model/grad_norm": grad_norm.detach(),
                # model error in units of how far one real env step moves the latent (1 = as far as a step)
                "model/latent_err_1step_rel": first_err.mean() / step_change,
                f"model/latent_err_{self.horizon}step_rel": last_err.mean() / step_change,
                "model/latent_step_change": step_change,
                # H-step return of the real actions: the model's rewards vs the real ones, same start states
                "model/imagined_return": imagined_return.mean(), "model/real_return": real_return.mean(),
                "model/return_abs_err": (imagined_return - real_return).abs().mean()}

    def update_critic(self, b: dict, z_bar: torch.Tensor) -> dict:
        """Soft Bellman update on real (n-step) transitions in target-encoder coordinates; with
        policy_learning=mbpo the last `model_share` of the batch is one-step model transitions."""
        n, mask = self.n_step, b["mask"][:, : self.n_step]
        rows = torch.arange(mask.shape[0], device=mask.device)
        k = mask.sum(1).long()  # valid steps within n (>= 1: the start is a real transition)
        reward = (b["reward"][:, :n] * self.gamma ** torch.arange(n, device=mask.device)).sum(1)
        ended = b["terminated"][:, :n].sum(1).clamp_max(1.0)
        discount = self.gamma ** k.float() * (1.0 - ended)
        z, action, z_next = z_bar[:, 0], b["action"][:, 0], z_bar[rows, k]
        metrics = {}
        n_model = int(round(self.model_share * len(rows))) if self.policy_learning == "mbpo" else 0
        if n_model:
            with torch.no_grad():
                z_m = z[-n_model:]
                a_m = self.sac.act(z_m, explore=True)
                z_m_next, r_m, cont = self.imagine(z_m, a_m, sample_member=True)
            cut = len(rows) - n_model
            z, action = torch.cat([z[:cut], z_m]), torch.cat([action[:cut], a_m])
            reward, z_next = torch.cat([reward[:cut], r_m]), torch.cat([z_next[:cut], z_m_next])
            discount = torch.cat([discount[:cut], self.gamma * cont])
            metrics["model/share"] = n_model / len(rows)
        metrics.update(self.sac.update_critic(z, action, reward, z_next, discount))
        return metrics

    def update_actor_svg(self, z0: torch.Tensor) -> dict:
        """Actor loss = -(sum_j gamma^j c_j (r_hat_j - alpha log pi_j) + gamma^H c_H (min Q - alpha log pi_H)),
        differentiated through the model's latent rollout; only the actor's optimizer steps, and the
        model and critic are frozen for this backward so they receive no gradient at all."""
        self.model.requires_grad_(False)
        self.sac.critic.requires_grad_(False)
        alpha, z = self.sac.alpha, z0
        value = torch.zeros(z0.shape[0], device=z0.device)
        weight = torch.ones_like(value)  # gamma^j times the probability the imagined episode is still running
        logp0 = None
        for _ in range(self.horizon):
            action, logp = self.sac.actor(z)
            logp0 = logp if logp0 is None else logp0
            z, reward, cont = self.imagine(z, action)
            value = value + weight * (reward - alpha * logp)
            weight = weight * self.gamma * cont
        action, logp = self.sac.actor(z)
        value = value + weight * (self.sac.q(z, action).min(0).values - alpha * logp)
        self.model.requires_grad_(True)
        self.sac.critic.requires_grad_(True)
        metrics = self.sac.step_actor_and_alpha(-value.mean(), logp0)
        metrics["train/imagined_value"] = value.detach().mean()
        return metrics

    @torch.no_grad()
    def diagnostics(self, b: dict, z_bar: torch.Tensor) -> dict:
        """Encoder drift of one update (the target encoder just moved) in units of one env step's
        latent change, and the termination model's calibration on this batch."""
        mask = b["mask"][:, 0]
        valid = mask.sum().clamp_min(1)
        z_now = self.encoder_target(b["obs"][:, 0])
        step_change = ((((z_bar[:, 1] - z_bar[:, 0]) ** 2).mean(-1) * mask).sum() / valid).clamp_min(1e-8)
        drift = ((((z_now - z_bar[:, 0]) ** 2).mean(-1) * mask).sum() / valid)
        out = {"model/encoder_drift_rel": drift / step_change}
        if self.model.termination:
            p = torch.sigmoid(self.model(z_bar[:, 0], b["action"][:, 0])[2][self.elites].mean(0))
            out["model/termination_pred_rate"] = (p * mask).sum() / valid
            out["model/termination_true_rate"] = (b["terminated"][:, 0] * mask).sum() / valid
        return out

    # ------------------------------------------------------------------ images and checkpoints
    @torch.no_grad()
    def images(self) -> dict[str, np.ndarray]:
        if self.decoder is None or not self.is_pixel or self._last_obs is None:
            return {}
        recon = (self.decoder(self.encoder(self._last_obs))[0] + 0.5).clamp(0, 1)
        real = self._last_obs[0].float() / 255.0
        pair = torch.cat([real[-recon.shape[0]:][:3], recon[:3]], dim=-1)  # last frame(s) | reconstruction
        return {"model/reconstruction": pair.cpu().numpy()}

    def extra_state(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_extra_state(self, state: dict) -> None:
        self.num_updates = state["num_updates"]
