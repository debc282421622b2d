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


def batch_share(num: int, batch_size: int, rank: int = 0, world: int = 1) -> range:
    """The sample indices process ``rank`` of ``world`` draws in :func:`generate`: a contiguous run of
    whole batches (the first ``num_batches % world`` processes take one batch more)."""
    batches = -(-num // batch_size)
    per, extra = divmod(batches, world)
    first = rank * per + min(rank, extra)
    last = first + per + (rank < extra)
    return range(min(first * batch_size, num), min(last * batch_size, num))


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The generator of batch ``index``'s fresh sampler noise when batch 0's is the main one: seeded from
    ``(seed, index)`` so any process can draw any batch without replaying the batches before it."""
    import numpy as np

    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


@torch.no_grad()
def generate(denoiser: Denoiser, shape: Sequence[int], num: int, *, sampler: str = "heun",
             num_steps: int | None = None, timesteps: Sequence[float] | None = None, spacing: str | None = None,
             cond: Conditioning | None = None, guidance_scale: float | None = None, seed: int = 0,
             batch_size: int = 256, device: str | torch.device = "cpu", progress: bool = False,
             shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Draw ``num`` samples of per-sample ``shape`` (float32, on ``device``).

    A ``torch.Generator`` seeded with ``seed`` draws the initial noise of all ``num`` samples at once, then
    the fresh noise the sampler needs for batch 0; batch ``i ≥ 1`` draws its fresh noise from
    :func:`batch_generator` ``(seed, i)``. So a result is reproducible for a fixed batch size (for the
    deterministic samplers, for any batch size), and batch 0 alone — a single-batch call — draws exactly
    what diffusers' pipelines draw from one generator. ``cond`` holds all ``num`` samples' conditioning.
    ``shard=(rank, world)`` returns only process ``rank``'s share (:func:`batch_share`): the shares of all
    ranks, concatenated in rank order, equal the single-process result.
    """
    fn = get_sampler(sampler)
    ts = sampling_grid(denoiser, sampler=sampler, num_steps=num_steps, timesteps=timesteps, spacing=spacing)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = denoiser.schedule.prior_sample((num, *shape), generator=gen)
    mine = batch_share(num, batch_size, *shard)
    out = []
    for start in range(mine.start, mine.stop, batch_size):
        index = start // batch_size
        x = noise[start:start + batch_size].to(device)
        c = cond[start:start + batch_size].to(device) if cond is not None else None
        out.append(fn(denoiser, x, ts, c, guidance_scale=guidance_scale,
                      generator=gen if index == 0 else batch_generator(seed, index), progress=progress).cpu())
    return torch.cat(out) if out else noise[:0].float()


__all__ = ["SAMPLERS", "Sampler", "get_sampler", "register_sampler", "sampling_grid", "generate", "batch_share",
           "batch_generator"]
