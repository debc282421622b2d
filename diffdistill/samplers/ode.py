"""Teacher ODE samplers on the probability-flow ODE: DDIM, Euler, Heun, DPM-Solver++(2M).

Euler and Heun integrate the ODE in EDM form, ``dx/dσ = (x − D(x; σ))/σ`` with ``x = x_t/a`` and
``σ = s/a`` (Karras et al. 2022, Alg. 1 without churn); flow schedules (and grids starting at infinite
σ) use rectified-flow variables instead, see :func:`ode_frame`. Euler in either frame *is* DDIM (η = 0)
— the two give the same image on the same grid, which the tests check; they differ only in their
default grids (DDIM: the schedule's own spacing, Euler/Heun: Karras).
"""

from __future__ import annotations

import torch

from ..denoiser import Conditioning, Denoiser
from .base import ddim_step, per_sample, register_sampler, steps


@register_sampler("ddim", "ode")
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor, cond: Conditioning | None = None, *,
                guidance_scale: float | None = None, generator: torch.Generator | None = None,
                progress: bool = False) -> torch.Tensor:
    """DDIM (η = 0): ``x_r = a_r·x0 + s_r·(x_t − a_t·x0)/s_t`` at every step (Song et al. 2021, eq. 12).

    Also the students' deterministic few-step sampler (``"ode"``) over their timestep list.
    """
    for _, t, r in steps(ts, progress, "ddim"):
        x0 = denoiser(x, t, cond, guidance_scale=guidance_scale)
        x = ddim_step(denoiser, x, x0, t, r)
    return x


def ode_frame(denoiser: Denoiser, ts: torch.Tensor) -> str:
    """The variables Euler/Heun integrate in: ``"edm"`` (``y = x/a``, ``τ = σ = s/a``, Karras et al.
    2022) — or ``"flow"`` (``y = x/(a+s)``, ``τ = s/(a+s)``, rectified-flow time) for flow schedules and
    for grids that start at ``a = 0`` (zero terminal SNR), where σ is infinite."""
    a_start = denoiser.schedule.alpha_sigma(ts[0])[0]
    return "flow" if denoiser.schedule.family == "flow" or a_start == 0 else "edm"


def _scale_and_time(denoiser: Denoiser, t: torch.Tensor, frame: str, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, τ)`` with ``y = x/m`` and ``τ = s/m`` for native time ``t`` (scalar or per sample)."""
    a, s = (per_sample(c, x) for c in denoiser.schedule.alpha_sigma(t))
    m = a if frame == "edm" else a + s
    return m, s / m


def _derivative(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond, guidance_scale, frame: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, dy/dτ)``: the PF-ODE ``dy/dτ = eps`` (EDM frame, i.e. ``(y − D)/σ``) or ``eps − x0`` (flow)."""
    a, s = (per_sample(c, x) for c in denoiser.schedule.alpha_sigma(t))
    x0 = denoiser(x, t, cond, guidance_scale=guidance_scale).double()
    eps = (x.double() - a * x0) / s
    m = a if frame == "edm" else a + s
    return x.double() / m, (eps if frame == "edm" else eps - x0)


def ode_step(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Conditioning | None = None,
             *, guidance_scale: float | None = None, frame: str = "edm", heun: bool = True) -> torch.Tensor:
    """One Euler (``heun=False``) or Heun step t → r of the probability-flow ODE in ``frame`` variables
    (Karras et al. 2022, Alg. 1, lines 5–8); ``t`` and ``r`` may be scalars or per-sample ``(B,)``.
    Heun's correction is skipped where ``r`` is clean data (τ_r = 0)."""
    y, d = _derivative(denoiser, x, t, cond, guidance_scale, frame)
    (_, tau_t), (m_r, tau_r) = _scale_and_time(denoiser, t, frame, x), _scale_and_time(denoiser, r, frame, x)
    y_next = y + (tau_r - tau_t) * d
    if heun and bool((tau_r > 0).any()):
        # samples whose r is clean data get a non-finite d_next, which torch.where discards
        _, d_next = _derivative(denoiser, (m_r * y_next).to(x.dtype), r, cond, guidance_scale, frame)
        y_next = torch.where(tau_r > 0, y + (tau_r - tau_t) * (d + d_next) / 2, y_next)
    return (m_r * y_next).to(x.dtype)


@register_sampler("euler")
def sample_euler(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor, cond: Conditioning | None = None, *,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 progress: bool = False) -> torch.Tensor:
    """Euler steps of the probability-flow ODE in the :func:`ode_frame` variables (Karras et al. 2022,
    Alg. 1 first order): ``y_r = y + (τ_r − τ_t)·dy/dτ``."""
    frame = ode_frame(denoiser, ts)
    for _, t, r in steps(ts, progress, "euler"):
        x = ode_step(denoiser, x, t, r, cond, guidance_scale=guidance_scale, frame=frame, heun=False)
    return x


@register_sampler("heun")
def sample_heun(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor, cond: Conditioning | None = None, *,
                guidance_scale: float | None = None, generator: torch.Generator | None = None,
                progress: bool = False) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1 with S_churn = 0): an Euler step, then the
    trapezoid correction with the derivative at its end — skipped on a final step to clean data."""
    frame = ode_frame(denoiser, ts)
    for _, t, r in steps(ts, progress, "heun"):
        x = ode_step(denoiser, x, t, r, cond, guidance_scale=guidance_scale, frame=frame, heun=True)
    return x


@register_sampler("dpmpp_2m")
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor, cond: Conditioning | None = None, *,
                    guidance_scale: float | None = None, generator: torch.Generator | None = None,
                    progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in data prediction, with ``λ = log(a/s)``::

        x_r = (s_r/s_t)·x_t − a_r·(e^{−h} − 1)·D,     h = λ_r − λ_t
        D = (1 + 1/(2ρ))·x0_t − 1/(2ρ)·x0_prev,        ρ = h_prev / h

    First order (``D = x0_t``) on the first step and on a final step to clean data.
    """
    sched = denoiser.schedule
    x0_prev, h_prev = None, None
    for _, t, r in steps(ts, progress, "dpmpp_2m"):
        (a_t, s_t), (a_r, s_r) = sched.alpha_sigma(t), sched.alpha_sigma(r)
        x0 = denoiser(x, t, cond, guidance_scale=guidance_scale).double()
        lam_t, lam_r = torch.log(a_t / s_t), torch.log(a_r / s_r)
        h = lam_r - lam_t
        if x0_prev is None or s_r == 0:
            d = x0
        else:
            rho = h_prev / h
            d = (1 + 1 / (2 * rho)) * x0 - x0_prev / (2 * rho)
        x = ((s_r / s_t) * x.double() - a_r * torch.expm1(-h) * d).to(x.dtype)
        x0_prev, h_prev = x0, h
    return x
