"""Diffusion-GAN heads: a small classifier on a denoiser's bottleneck features at noised inputs.

DMD2 (Yin et al. 2024b, §4.3) adds a GAN whose discriminator is a light head on the fake-score
critic's bottleneck, applied to real images and student samples noised to a random time; the critic's
trunk trains with it. Where the features come from is a switch (``gan.features``): ``"critic"`` (the
DMD2 paper and code, default) or ``"teacher"`` (the frozen teacher, as NVlabs/FastGen does; only the
head learns). Losses are the non-saturating ones of the official code: discriminator
``softplus(D(fake)) + softplus(−D(real))``, generator ``softplus(−D(fake))``. Optional penalties on real
inputs: ``"r1"`` — ``½·E‖∇ₓD(x)‖²`` (Mescheder et al. 2018) — or ``"approx_r1"`` — ``E(D(x) − D(x + σ·ε))²``,
the finite-difference form of Lin et al. 2025 (APT), which needs no double backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import option
from ..denoiser import Conditioning, Denoiser


@dataclass
class GANArgs:
    enabled: bool = False
    features: Literal["critic", "teacher"] = "critic"
    generator_weight: float = option(3e-3, min=0.0, help="weight of the generator's GAN term (DMD2 ImageNet: 3e-3)")
    discriminator_weight: float = option(1e-2, min=0.0, help="weight of the head's loss in the critic phase")
    max_time_fraction: float = option(1.0, min=0.0, max=1.0, help="noise the GAN inputs up to this fraction")
    penalty: Literal["none", "r1", "approx_r1"] = "none"
    penalty_weight: float = option(1.0, min=0.0)
    approx_r1_sigma: float = option(0.01, min=0.0, help="perturbation of approx_r1")


class DiscriminatorHead(nn.Module):
    """Bottleneck features → one realism logit per sample. Feature maps ``(B, C, h, w)`` (tokens
    ``(B, N, C)`` are folded to a square map) go through two 3×3 convolutions and a global average;
    feature vectors ``(B, C)`` (MLP trunks) through a two-layer MLP."""

    def __init__(self, channels: int, hidden: int = 128, spatial: bool = True):
        super().__init__()
        self.config = {"channels": channels, "hidden": hidden, "spatial": spatial}
        if spatial:
            self.body = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1),
                                      nn.GroupNorm(min(32, hidden // 4), hidden), nn.SiLU(),
                                      nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU())
        else:
            self.body = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        if not self.config["spatial"]:
            return self.out(self.body(features)).squeeze(1)
        if features.ndim == 3:  # transformer tokens: a square grid
            b, n, c = features.shape
            side = int(round(n**0.5))
            features = features.transpose(1, 2).reshape(b, c, side, n // side)
        return self.out(self.body(features).mean(dim=(2, 3))).squeeze(1)

    @classmethod
    def for_source(cls, source: Denoiser, shape: tuple[int, ...], cond: Conditioning, device) -> "DiscriminatorHead":
        """A head sized for ``source``'s bottleneck, from one probe pass."""
        with torch.no_grad():
            feats = source.features(torch.zeros((1, *shape), device=device), source.schedule.t_max, cond)
        if feats.ndim == 2:
            return cls(feats.shape[1], spatial=False)
        return cls(feats.shape[1] if feats.ndim == 4 else feats.shape[-1])


def gan_noise(schedule, x: torch.Tensor, max_time_fraction: float, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A time uniform in ``[0, max_time_fraction]`` of the schedule and a noise draw for each of ``x``."""
    u = torch.rand(len(x), generator=generator, dtype=torch.float64) * max_time_fraction
    t = schedule.time_at_fraction(u).to(x.device)
    return t, torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def realism_logits(source: Denoiser, head: DiscriminatorHead, x: torch.Tensor, cond: Conditioning,
                   t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Noise ``x`` to ``t`` with ``eps``, read ``source``'s bottleneck, and score it with ``head``."""
    return head(source.features(source.schedule.add_noise(x, eps, t), t, cond))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return (F.softplus(fake_logits) + F.softplus(-real_logits)).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def r1_penalty(logits_of, x_real: torch.Tensor) -> torch.Tensor:
    """``½·E‖∇ₓD(x)‖²`` on real inputs; ``logits_of`` maps inputs to logits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = x_real.detach().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
        (grad,) = torch.autograd.grad(logits_of(x).sum(), x, create_graph=True)
    return 0.5 * grad.pow(2).flatten(1).sum(1).mean()


def approx_r1_penalty(logits_of, x_real: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``E(D(x) − D(x + σ·ε))²`` (APT's approximated R1)."""
    eps = torch.randn(x_real.shape, generator=generator, dtype=x_real.dtype).to(x_real.device)
    return (logits_of(x_real) - logits_of(x_real + sigma * eps)).pow(2).mean()
