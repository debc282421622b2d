"""The shared sampler signature, the registry, and the per-step maths samplers share.

Every sampler is a pure function (k-diffusion style)::

    sampler(denoiser, x, ts, cond=None, *, guidance_scale=None, generator=None, progress=False) -> x

``x`` is the state at native time ``ts[0]``; ``ts`` holds ``N + 1`` native times ending (usually) at
the schedule's clean time; the result is the state at ``ts[-1]``. Samplers see only the
:class:`~diffdistill.denoiser.Denoiser` interface; ``generator`` seeds any fresh noise they draw.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import torch
from tqdm.auto import tqdm

from ..denoiser import Conditioning, Denoiser
from ..errors import ConfigError
from ..schedules import broadcast_to


class Sampler(Protocol):
    def __call__(self, denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor, cond: Conditioning | None = None,
                 *, guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 progress: bool = False) -> torch.Tensor: ...


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(*names: str) -> Callable[[Sampler], Sampler]:
    """Register a sampler function under one or more names."""
    def deco(fn: Sampler) -> Sampler:
        for name in names:
            SAMPLERS[name] = fn
        return fn
    return deco


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def steps(ts: torch.Tensor, progress: bool, desc: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(i, t_i, t_{i+1})`` over consecutive pairs of the grid, with an optional progress bar."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    for i in tqdm(range(len(ts) - 1), desc=desc, disable=not progress, leave=False):
        yield i, ts[i], ts[i + 1]


def per_sample(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 coefficient (scalar or per-sample ``(B,)``) shaped to broadcast against ``x``."""
    return broadcast_to(coef, x).double()


def ddim_step(denoiser: Denoiser, x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, r: torch.Tensor
              ) -> torch.Tensor:
    """Deterministic DDIM hop t → r given ``x0 = D(x, t)`` (Song et al. 2021, eq. 12 with η = 0):
    ``eps = (x − a_t·x0)/s_t``, ``x_r = a_r·x0 + s_r·eps`` (float64 coefficients)."""
    a_t, s_t, a_r, s_r = (per_sample(c, x) for c in (*denoiser.schedule.alpha_sigma(t), *denoiser.schedule.alpha_sigma(r)))
    eps = (x.double() - a_t * x0.double()) / s_t
    return (a_r * x0.double() + s_r * eps).to(x.dtype)


def renoise(denoiser: Denoiser, x0: torch.Tensor, r: torch.Tensor, generator: torch.Generator | None
            ) -> torch.Tensor:
    """``x_r = a_r·x0 + s_r·eps`` with fresh ``eps`` (the LCM / DMD2 multi-step student step)."""
    gen_device = generator.device if generator is not None else x0.device
    eps = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    return denoiser.schedule.add_noise(x0, eps, r)
