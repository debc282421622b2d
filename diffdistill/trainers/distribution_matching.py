"""Pure generator losses of the score-distillation family; each sees only x0 predictions at ``x_t``.

Notation: ``x = G(z)`` a student sample, ``x_t = a·x + s·ε``, ``x̂_real = D_teacher(x_t, t)`` (guided),
``x̂_fake = D_critic(x_t, t)``. All three losses are written so that autograd gives the paper's gradient;
every reduction is a mean over batch and pixels, so gradient clipping means the same for all of them.

- **DMD** (Yin et al. 2024, eq. 7 and the official normalisation): the per-sample direction
  ``g = (x̂_fake − x̂_real) / mean_CHW|x − x̂_real|`` (teacher and critic without gradient), applied as
  ``½·mean(x − sg(x − g))²`` so that ``∂L/∂x = g / numel``.
- **VSD / SwiftBrush** (Wang et al. 2023, eq. 9; Nguyen & Tran 2024): ``g = w(t)·(ε̂_real − ε̂_fake)``
  = ``w(t)·(a/s)·(x̂_fake − x̂_real)``, no normalisation, same surrogate. ``w(t) = s²`` (ProlificDreamer's
  ``σ_t²``) or 1.
- **SiD** (Zhou et al. 2024, eq. 23; official ``SID_EDMLoss.generator_loss``):
  ``L = mean (x̂_real − x̂_fake)·((x̂_real − x) − α·(x̂_real − x̂_fake)) / sg(mean_CHW|x − x̂_real|)``,
  with gradients through both score networks' outputs (their weights frozen in this phase); α = 1.2.
"""

from __future__ import annotations

import torch


def per_sample_mean_abs(x: torch.Tensor) -> torch.Tensor:
    """``mean_CHW |x|`` shaped ``(B, 1, …)`` for broadcasting, clipped away from 0 like the official codes."""
    wide = x.abs().to(torch.promote_types(x.dtype, torch.float32))  # half precision sums poorly
    return wide.mean(dim=tuple(range(1, x.ndim)), keepdim=True).clamp(min=1e-5).to(x.dtype)


def surrogate_loss(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``½·mean(x − sg(x − g))²``: its gradient in ``x`` is ``g / numel`` (the SDS trick)."""
    direction = torch.nan_to_num(direction.detach())
    return 0.5 * ((x - (x - direction).detach()) ** 2).mean()


def dmd_direction(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's normalised distribution-matching direction (descending it moves ``x`` toward the data)."""
    return (x0_fake - x0_real) / per_sample_mean_abs(x - x0_real)


def dmd_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    return surrogate_loss(x, dmd_direction(x.detach(), x0_real.detach(), x0_fake.detach()))


def vsd_direction(x0_real: torch.Tensor, x0_fake: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                  weighting: str = "sigma_squared") -> torch.Tensor:
    """``w(t)·(ε̂_real − ε̂_fake)`` from x0 predictions; ``a``, ``s`` broadcastable per sample."""
    w = s**2 if weighting == "sigma_squared" else torch.ones_like(s)
    return (w * a / s).to(x0_real.dtype) * (x0_fake - x0_real)


def vsd_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
             weighting: str = "sigma_squared") -> torch.Tensor:
    return surrogate_loss(x, vsd_direction(x0_real.detach(), x0_fake.detach(), a, s, weighting))


def sid_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, alpha: float = 1.2) -> torch.Tensor:
    """SiD's generator loss; ``x0_real`` and ``x0_fake`` must keep their graph to ``x``."""
    gap = x0_real - x0_fake
    loss = gap * ((x0_real - x) - alpha * gap) / per_sample_mean_abs(x - x0_real).detach()
    return loss.mean()
