"""Network pieces shared by all agents: MLPs, ensembles of MLPs run as one batched matmul,
the squashed-Gaussian actor, and DrQ's random-shift augmentation."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(in_dim: int, hidden_dims, out_dim: int, activation=nn.ReLU) -> nn.Sequential:
    layers, d = [], in_dim
    for h in hidden_dims:
        layers += [nn.Linear(d, h), activation()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """`n` independent linear layers applied as one batched matmul: input (n, B, in) -> (n, B, out)."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(n, 1, out_dim))
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """`n` MLPs with separate weights evaluated together (twin critics, model ensembles).

    layernorm=True normalises every hidden layer before its activation (no affine part, so members
    share nothing): the critic recipe of TD-MPC2, MR.Q and DroQ, which keeps Q stable at high update ratios."""

    def __init__(self, n: int, in_dim: int, hidden_dims, out_dim: int, activation=nn.ReLU, layernorm: bool = False):
        super().__init__()
        layers, d = [], in_dim
        for h in hidden_dims:
            norm = [nn.LayerNorm(h, elementwise_affine=False)] if layernorm else []
            layers += [EnsembleLinear(n, d, h), *norm, activation()]
            d = h
        layers.append(EnsembleLinear(n, d, out_dim))
        self.net = nn.Sequential(*layers)
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in) shared by all members, or (n, B, in) per member."""
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.n, -1, -1)
        return self.net(x)


class TwinCritic(nn.Module):
    """Q1, Q2 (s, a) -> (2, B); clipped double-Q takes their minimum."""

    def __init__(self, feat_dim: int, action_dim: int, hidden_dims=(256, 256), layernorm: bool = False):
        super().__init__()
        self.q = EnsembleMLP(2, feat_dim + action_dim, hidden_dims, 1, layernorm=layernorm)

    def forward(self, feat: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.q(torch.cat([feat, action], dim=-1)).squeeze(-1)


class SquashedGaussianActor(nn.Module):
    """tanh(Normal(mu, sigma)) policy with the change-of-variables log-probability (SAC appendix C)."""

    def __init__(self, feat_dim: int, action_dim: int, hidden_dims=(256, 256), log_std_min: float = -5.0,
                 log_std_max: float = 2.0):
        super().__init__()
        self.net = mlp(feat_dim, hidden_dims, 2 * action_dim)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, feat: torch.Tensor, deterministic: bool = False, with_log_prob: bool = True):
        mu, log_std = self.net(feat).chunk(2, dim=-1)
        if deterministic:
            return torch.tanh(mu), None
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(log_std) + 1)
        std = log_std.exp()
        x = mu + std * torch.randn_like(mu)
        action = torch.tanh(x)
        if not with_log_prob:
            return action, None
        # log N(x; mu, std) - log(1 - tanh(x)^2), the latter written stably as 2(log 2 - x - softplus(-2x))
        log_prob = (-0.5 * ((x - mu) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - x - F.softplus(-2 * x))).sum(-1)
        return action, log_prob


class PixelDecoder(nn.Module):
    """latent -> image in the CNN encoder's input scale (pixels / 255 - 0.5): a linear map to a 1/8-size feature map, three stride-2
    transposed convolutions, and a resize for sides that are not multiples of 8."""

    def __init__(self, latent_dim: int, obs_shape: tuple, channels=(128, 64, 32)):
        super().__init__()
        c, h, w = obs_shape
        self.obs_hw = (h, w)
        self.start = (channels[0], math.ceil(h / 8), math.ceil(w / 8))
        self.fc = nn.Linear(latent_dim, int(np.prod(self.start)))
        layers, ch = [], channels[0]
        for out in (*channels[1:], c):
            layers += [nn.ReLU(), nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1)]
            ch = out
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.deconvs(self.fc(z).view(-1, *self.start))
        if x.shape[-2:] != self.obs_hw:
            x = F.interpolate(x, size=self.obs_hw, mode="bilinear", align_corners=False)
        return x


# ---------------------------------------------------------------------------------------------- model buffer


def random_shift(obs: torch.Tensor, pad: int) -> torch.Tensor:
    """DrQ augmentation: replicate-pad by `pad` pixels and crop back at a random offset per image
    (one grid_sample, as in drqv2). Works on uint8 or float input; returns float."""
    n, c, h, w = obs.shape
    x = F.pad(obs.float(), (pad, pad, pad, pad), mode="replicate")
    eps_h, eps_w = 1.0 / (h + 2 * pad), 1.0 / (w + 2 * pad)
    ar_h = torch.linspace(-1.0 + eps_h, 1.0 - eps_h, h + 2 * pad, device=obs.device)[:h]
    ar_w = torch.linspace(-1.0 + eps_w, 1.0 - eps_w, w + 2 * pad, device=obs.device)[:w]
    base = torch.stack(torch.meshgrid(ar_h, ar_w, indexing="ij")[::-1], dim=-1)  # (h, w, 2) as (x, y)
    shift = torch.randint(0, 2 * pad + 1, (n, 1, 1, 2), device=obs.device).float()
    shift[..., 0] *= 2.0 / (w + 2 * pad)  # pixels -> grid units, per axis; python scalars: a torch.tensor([...],
    shift[..., 1] *= 2.0 / (h + 2 * pad)  # device=cuda) here would be a host->device copy that syncs every update
    return F.grid_sample(x, base.unsqueeze(0) + shift, padding_mode="zeros", align_corners=False)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging target <- (1 - tau) target + tau source, in place."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, tau)
