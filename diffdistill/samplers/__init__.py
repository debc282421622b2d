"""Samplers: pure functions on the denoiser interface with one shared signature (see :mod:`.base`).

Registered names: ``ddim`` (= ``ode``), ``euler``, ``heun``, ``dpmpp_2m`` (teacher ODE samplers) and
``sde`` (the students' denoise-and-re-noise sampler). :func:`generate` is the batched, seeded driver.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..denoiser import Conditioning, Denoiser
from . import fewstep, ode  # noqa: F401  (register the samplers)
from .base import SAMPLERS, Sampler, get_sampler, register_sampler

DEFAULT_SPACING = {"euler": "karras", "heun": "karras"}


def sampling_grid(denoiser: Denoiser, *, sampler: str, num_steps: int | None = None,
                  timesteps: Sequence[float] | None = None, spacing: str | None = None) -> torch.Tensor:
    """The native-time grid for a run: an explicit ``timesteps`` list (then the clean time), or
    ``num_steps`` on the schedule's grid (``spacing`` defaults to Karras for Euler/Heun, else the
    schedule's own default)."""
    sched = denoiser.schedule
    if timesteps is not None:
        ts = torch.as_tensor(list(timesteps), dtype=torch.float64)
        return torch.cat([ts, torch.tensor([sched.t_clean], dtype=torch.float64)])
    if num_steps is None:
        raise ValueError("give num_steps or an explicit timesteps list")
    if spacing is None and sched.family == "flow":
        return sched.grid(num_steps)
    return sched.grid(num_steps, spacing or DEFAULT_SPACING.get(sampler))


@torch.no_grad()
def generate(denoiser: Denoiser, shape: Sequence[int], num: int, *, sampler: str = "heun",
             num_steps: int | None = None, timesteps: Sequence[float] | None = None, spacing: str | None = None,
             cond: Conditioning | None = None, guidance_scale: float | None = None, seed: int = 0,
             batch_size: int = 256, device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """Draw ``num`` samples of per-sample ``shape`` (float32, on ``device``).

    One ``torch.Generator`` seeded with ``seed`` draws the initial noise for every batch in order and
    any fresh noise the sampler needs, so a run is reproducible for a fixed batch size (and, for the
    deterministic samplers, for any batch size). ``cond`` is indexed per batch.
    """
    fn = get_sampler(sampler)
    ts = sampling_grid(denoiser, sampler=sampler, num_steps=num_steps, timesteps=timesteps, spacing=spacing)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = denoiser.schedule.prior_sample((num, *shape), generator=gen)
    out = []
    for start in range(0, num, batch_size):
        x = noise[start:start + batch_size].to(device)
        c = cond[start:start + batch_size].to(device) if cond is not None else None
        out.append(fn(denoiser, x, ts, c, guidance_scale=guidance_scale, generator=gen, progress=progress).cpu())
    return torch.cat(out)


__all__ = ["SAMPLERS", "Sampler", "get_sampler", "register_sampler", "sampling_grid", "generate"]
