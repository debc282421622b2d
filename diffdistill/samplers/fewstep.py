"""Few-step student samplers over an explicit timestep list.

``"ode"`` is the deterministic DDIM hop (:func:`~diffdistill.samplers.ode.sample_ddim`).
``"sde"`` predicts x0 and re-noises it to the next timestep with fresh noise — the multi-step sampler
of consistency models (Song et al. 2023, Alg. 1), LCM and DMD2 (methods.md §2)::

    x0 = G(x_{t_i}, t_i);    x_{t_{i+1}} = a_{t_{i+1}}·x0 + s_{t_{i+1}}·eps_fresh
"""

from __future__ import annotations

import torch

from ..denoiser import Conditioning, Denoiser
from .base import register_sampler, renoise, steps


@register_sampler("sde")
def sample_renoise(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor, cond: Conditioning | None = None, *,
                   guidance_scale: float | None = None, generator: torch.Generator | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Denoise, then re-noise to the next time with fresh noise drawn from ``generator``."""
    for _, t, r in steps(ts, progress, "sde"):
        x = denoiser(x, t, cond, guidance_scale=guidance_scale)
        if denoiser.schedule.alpha_sigma(r)[1] > 0:
            x = renoise(denoiser, x, r, generator)
    return x
