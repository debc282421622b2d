"""Consistency distillation (Song et al. 2023, Algorithm 2).

The student is a consistency function ``f_θ(x_t, t)``: one network evaluation maps any point of a
teacher ODE trajectory to its start. Over a discretisation ``t_1 < … < t_N`` of the noise levels
(Karras σ levels, eq. 5 of Karras et al. 2022, or evenly spaced timesteps as LCM's skipping-step
solver), each step draws ``n``, noises data to ``t_{n+1}``, runs one teacher solver step
``t_{n+1} → t_n`` (Heun by default, DDIM or Euler) to ``x̂_n``, and minimises
``λ(t_n)·d(f_θ(x_{n+1}, t_{n+1}), f_θ⁻(x̂_n, t_n))`` with ``θ⁻`` an EMA of ``θ`` (decay μ, 0.95 in the
paper) and ``d`` the squared L2 or the pseudo-Huber distance.

Boundary condition (switch ``boundary``): ``"cm"`` (the paper, Appendix C) views the student's x0 estimate
``D`` through EDM preconditioning, ``F = (D − c_skip^EDM·x)/c_out^EDM``, and returns
``c_skip(σ)·x + c_out(σ)·F`` with ``c_skip = σ_d²/((σ − σ_min)² + σ_d²)``,
``c_out = (σ − σ_min)·σ_d/sqrt(σ² + σ_d²)``, in EDM variables ``x = x_t/a``, ``σ = s/a``; so
``f(x, σ_min) = x`` exactly. ``"lcm"`` is the latent-consistency / diffusers form
``c_skip·x_t + c_out·D`` with ``c_skip = σ_d²/((10t)² + σ_d²)``, ``c_out = 10t/sqrt((10t)² + σ_d²)`` on the
native timestep ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..config import option
from ..denoiser import Conditioning, Denoiser
from ..errors import ConfigError
from ..samplers.base import ddim_step, per_sample
from ..samplers.ode import ode_step
from ..schedules import NoiseSchedule, edm_preconditioning, karras_sigmas
from .ema import ema_update
from .method import DistillConfig, Method, register_method
from .lora import frozen_sharing_copy


class ConsistencyDenoiser(Denoiser):
    """``f(x_t, t)`` built on a denoiser ``inner`` that predicts x0; see the module docstring."""

    def __init__(self, inner: Denoiser, sigma_min: float, *, boundary: str = "cm", sigma_data: float = 0.5,
                 timestep_scaling: float = 10.0):
        super().__init__(None, inner.schedule, "x0")
        self.inner, self.sigma_min, self.boundary = inner, float(sigma_min), boundary
        self.sigma_data, self.timestep_scaling = float(sigma_data), float(timestep_scaling)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        d = self.inner(x_t, t, cond, guidance_scale=1.0).double()
        a, s = (per_sample(c, x_t) for c in self.schedule.alpha_sigma(t))
        sd = self.sigma_data
        if self.boundary == "lcm":
            k = per_sample(t, x_t) * self.timestep_scaling
            return (sd**2 / (k**2 + sd**2) * x_t.double() + k / torch.sqrt(k**2 + sd**2) * d).to(x_t.dtype)
        sigma, x = s / a, x_t.double() / a
        edm = edm_preconditioning(sigma, sd)
        f = (d - edm["c_skip"] * x) / edm["c_out"]
        c_skip = sd**2 / ((sigma - self.sigma_min) ** 2 + sd**2)
        c_out = (sigma - self.sigma_min) * sd / torch.sqrt(sigma**2 + sd**2)
        return (c_skip * x + c_out * f).to(x_t.dtype)


def consistency_grid(schedule: NoiseSchedule, num_scales: int, kind: str, sigma_min: float, sigma_max: float,
                     rho: float = 7.0) -> torch.Tensor:
    """``num_scales`` native times, least noisy first: Karras σ levels between ``sigma_min`` and
    ``sigma_max`` (CD paper), or times evenly spaced between the two (LCM's skipping-step grid)."""
    if kind == "karras":
        return schedule.t_from_sigma(karras_sigmas(num_scales, sigma_min, sigma_max, rho).flip(0))
    lo, hi = schedule.t_from_sigma(sigma_min), schedule.t_from_sigma(sigma_max)
    return torch.linspace(float(lo), float(hi), num_scales, dtype=torch.float64)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sqrt(‖x − y‖² + c²) − c`` per sample, ``c = 0.00054·sqrt(dim)`` (Song & Dhariwal 2023, §3.3)."""
    c = 0.00054 * x[0].numel() ** 0.5
    return torch.sqrt(((x - y) ** 2).flatten(1).sum(1) + c**2) - c


def squared_l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample."""
    return ((x - y) ** 2).flatten(1).mean(1)


DISTANCES = {"l2": squared_l2, "pseudo_huber": pseudo_huber}


def teacher_solver_step(teacher: Denoiser, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Conditioning,
                        solver: str, guidance_scale=None, substeps: int = 1) -> torch.Tensor:
    """The deterministic teacher solve t → r (per-sample times): ``substeps`` DDIM, Euler or Heun steps
    (in EDM variables) at σ levels evenly spaced in log σ between the two; 1 is the CD paper's single step."""
    if substeps > 1:
        s_hi, s_lo = teacher.schedule.sigma(t).double(), teacher.schedule.sigma(r).double()
        for i in range(1, substeps + 1):
            nxt = r if i == substeps else teacher.schedule.t_from_sigma(s_hi * (s_lo / s_hi) ** (i / substeps))
            x, t = teacher_solver_step(teacher, x, t, nxt.to(t), cond, solver, guidance_scale), nxt.to(t)
        return x
    if solver == "ddim":
        return ddim_step(teacher, x, teacher(x, t, cond, guidance_scale=guidance_scale), t, r)
    return ode_step(teacher, x, t, r, cond, guidance_scale=guidance_scale, frame="edm", heun=solver == "heun")


def lognormal_level_probs(grid_sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's discrete lognormal over pairs ``(σ_n, σ_{n+1})`` (Song & Dhariwal 2023, §3.5):
    ``p(n) ∝ erf((ln σ_{n+1} − P_mean)/(√2·P_std)) − erf((ln σ_n − P_mean)/(√2·P_std))``."""
    cdf = torch.erf((torch.log(grid_sigmas) - p_mean) / (2**0.5 * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def consistency_distillation_loss(teacher: Denoiser | None, student: Denoiser, target: Denoiser, x0: torch.Tensor,
                                  cond: Conditioning, grid: torch.Tensor, *, schedule: NoiseSchedule | None = None,
                                  solver: str = "heun", distance: str = "l2", weighting: str = "uniform",
                                  level_probs: torch.Tensor | None = None, guidance_scale: torch.Tensor | None = None,
                                  generator: torch.Generator | None = None, solver_substeps: int = 1
                                  ) -> dict[str, torch.Tensor]:
    """One micro-batch of CD: ``λ(t_n)·d(f_θ(x_{n+1}, t_{n+1}), f_θ⁻(x̂_n, t_n))`` averaged over the batch.

    ``x̂_n`` is one ``solver`` step of ``teacher`` (or ``solver_substeps`` steps; consistency distillation)
    or, with ``teacher=None``, the same data and noise at ``t_n`` (consistency training). ``n`` is uniform,
    or drawn from ``level_probs``.
    ``weighting``: ``"uniform"`` (λ = 1, the CD paper) or ``"icm"`` (``λ = 1/(σ_{n+1} − σ_n)``, iCT).
    ``guidance_scale`` (per sample, standard convention) guides the teacher step and is handed to the
    student and target networks, which LCM students embed (:class:`GuidanceEmbeddedStudent`).
    """
    schedule = schedule or teacher.schedule
    if level_probs is None:
        n = torch.randint(len(grid) - 1, (len(x0),), generator=generator)
    else:
        n = torch.multinomial(level_probs, len(x0), replacement=True, generator=generator)
    t_hi, t_lo = grid[n + 1], grid[n]
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_hi = schedule.add_noise(x0, eps, t_hi)
    with torch.no_grad():
        if teacher is None:
            x_lo = schedule.add_noise(x0, eps, t_lo)
        else:
            x_lo = teacher_solver_step(teacher, x_hi, t_hi, t_lo, cond, solver, guidance_scale, solver_substeps)
        goal = target(x_lo, t_lo, cond, guidance_scale=guidance_scale)
    dist = DISTANCES[distance](student(x_hi, t_hi, cond, guidance_scale=guidance_scale), goal)
    lam = 1 / (schedule.sigma(t_hi) - schedule.sigma(t_lo)) if weighting == "icm" else torch.ones(len(x0))
    return {"loss": (lam.to(dist) * dist).mean(), "distance": dist.mean().detach()}


def check_sample_sigmas(sample_sigmas: dict[str, list[float]], sigma_min: float, sigma_max: float,
                        key_prefix: str = "consistency") -> None:
    """Each entry of ``<method>.sample_sigmas``: ``n - 1`` levels for ``n`` steps, strictly decreasing
    and strictly between ``sigma_min`` and the noisiest grid level ``sigma_max``."""
    for key, levels in sample_sigmas.items():
        if not key.isdigit() or int(key) < 2 or len(levels) != int(key) - 1:
            raise ConfigError(f"{key_prefix}.sample_sigmas['{key}'] has {len(levels)} levels; key it by a step count "
                              f"n >= 2 and give the n - 1 levels after the first (sigma_max {sigma_max:.4g}) one")
        chain = [sigma_max, *levels, sigma_min]
        if any(hi <= lo for hi, lo in zip(chain, chain[1:])):
            raise ConfigError(f"{key_prefix}.sample_sigmas['{key}'] = {levels} must decrease strictly between "
                              f"sigma_max {sigma_max:.4g} and sigma_min {sigma_min:.4g}")


def explicit_sample_timesteps(sample_sigmas: dict[str, list[float]], num_steps: int, schedule: NoiseSchedule,
                              first_t: float) -> list[float] | None:
    """The ``num_steps``-step sampler's native times from ``<method>.sample_sigmas``: ``first_t`` (σ_max),
    then the given levels; None where that step count is not given."""
    levels = sample_sigmas.get(str(num_steps))
    if levels is None:
        return None
    return [float(first_t)] + schedule.t_from_sigma(torch.tensor(levels, dtype=torch.float64)).tolist()


@dataclass
class ConsistencyArgs:
    num_scales: int = option(18, min=2, help="N, the discretisation of the noise levels (18 in the paper)")
    discretisation: Literal["karras", "uniform"] = "karras"
    sigma_min: float | None = option(None, min=0.0, help="None: σ at the schedule's t_min")
    sigma_max: float | None = option(None, min=0.0, help="None: σ at the schedule's t_max")
    rho: float = option(7.0, min=1.0)
    solver: Literal["heun", "euler", "ddim"] = "heun"
    solver_substeps: int = option(1, min=1, help="teacher solver steps per grid interval, evenly spaced in log σ "
                                                 "(1: the CD paper's single step; more: a finer teacher ODE, same grid)")
    distance: Literal["l2", "pseudo_huber"] = "l2"
    weighting: Literal["uniform", "icm"] = "uniform"
    target_ema: float = option(0.95, min=0.0, max=1.0, help="μ, the target network's EMA decay (0: stop-grad θ)")
    boundary: Literal["cm", "lcm"] = "cm"
    sigma_data: float = option(0.5, min=0.0)
    sample_sigmas: dict[str, list[float]] = option(
        {}, help="explicit σ levels of the n-step sampler after its first (σ_max) one, keyed by n, e.g. "
                 "{'4': [5.0, 1.5, 0.4]}; step counts not given use grid levels evenly spaced in index")


@dataclass
class ConsistencyConfig(DistillConfig):
    method: str = "consistency"
    consistency: ConsistencyArgs = field(default_factory=ConsistencyArgs)


@register_method
class ConsistencyDistillation(Method):
    name = "consistency"
    config_class = ConsistencyConfig
    student_sampler = "sde"  # multistep consistency sampling: denoise, re-noise (Song et al. 2023, Alg. 1)

    def __init__(self, cfg: ConsistencyConfig, teacher):
        super().__init__(cfg, teacher)
        self.args = args = self.method_args(cfg)
        schedule = teacher.denoiser.schedule
        self.sigma_min = args.sigma_min if args.sigma_min is not None else float(schedule.sigma(schedule.t_min))
        sigma_max = args.sigma_max if args.sigma_max is not None else float(schedule.sigma(schedule.t_max))
        if not 0 < self.sigma_min < sigma_max < float("inf"):
            raise ValueError(f"consistency needs 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {sigma_max}; "
                             "set consistency.sigma_min / sigma_max")
        self.grid = consistency_grid(schedule, args.num_scales, args.discretisation, self.sigma_min, sigma_max, args.rho)
        check_sample_sigmas(args.sample_sigmas, self.sigma_min, float(schedule.sigma(self.grid[-1])), cfg.method)
        self.student = self.new_student()
        self.target = frozen_sharing_copy(self.student).eval().requires_grad_(False)

    @staticmethod
    def method_args(cfg) -> ConsistencyArgs:
        return cfg.consistency

    def trainable_roles(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def buffer_roles(self) -> dict[str, nn.Module]:
        return {"target": self.target}

    def student_denoiser(self, network: nn.Module) -> Denoiser:
        return ConsistencyDenoiser(self.like_teacher(network), self.sigma_min, boundary=self.args.boundary, sigma_data=self.args.sigma_data)

    def student_timesteps(self, num_steps: int) -> list[float]:
        """The noisiest grid level, then ``consistency.sample_sigmas[num_steps]`` where given (the CM paper
        picks each model's multistep time points by searching on FID; ``bench/tune_sample_sigmas.py``
        does that search), else ``num_steps`` grid levels evenly spaced in index from the noisiest down."""
        given = explicit_sample_timesteps(self.args.sample_sigmas, num_steps, self.teacher.denoiser.schedule,
                                          float(self.grid[-1]))
        if given is not None:
            return given
        idx = torch.linspace(len(self.grid) - 1, 0, num_steps + 1).round().long()[:-1]
        return self.grid[idx].tolist()

    def loss(self, phase, batch, step, generator, guidance_scale: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
        x0, cond = batch
        a = self.args
        return consistency_distillation_loss(self.teacher.denoiser, self.student_denoiser(self.student),
                                             self.student_denoiser(self.target), x0, cond, self.grid,
                                             solver=a.solver, distance=a.distance, weighting=a.weighting,
                                             guidance_scale=guidance_scale, generator=generator,
                                             solver_substeps=a.solver_substeps)

    def after_step(self, step: int) -> bool:
        ema_update(self.target, self.student, self.args.target_ema)
        return False
