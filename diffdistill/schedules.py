"""Noise schedules and prediction parameterisations: the only copy of this maths in diffdistill.

Every schedule is written in one form (methods.md §1)::

    x_t = a(t) · x0 + s(t) · eps,      eps ~ N(0, I)

with ``t`` in the schedule's *native* units:

* :class:`VPSchedule` — discrete variance-preserving (DDPM / Stable Diffusion): integer timesteps
  ``0 … T−1`` (fractional values interpolate log σ linearly, as k-diffusion does), ``a = sqrt(ᾱ)``,
  ``s = sqrt(1 − ᾱ)``; ``ᾱ`` comes from a diffusers scheduler config, so every ``beta_schedule`` diffusers
  knows (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, trained betas, zero-terminal-SNR) is exact.
  ``t = −1`` denotes clean data (``ᾱ = 1``, diffusers' DDIM ``set_alpha_to_one``).
* :class:`EDMSchedule` — Karras et al. 2022: ``t = σ``, ``a = 1``, ``s = σ``.
* :class:`FlowSchedule` — rectified flow: ``t ∈ [0, 1]``, ``a = 1 − t``, ``s = t``.

The EDM view is shared by all of them: ``σ(t) = s/a`` and ``x_edm = x_t / a`` (methods.md §1).

Predictions (``kind`` names; diffusers' names are accepted too):

* ``"x0"`` (diffusers ``"sample"``) — the clean image;
* ``"eps"`` (``"epsilon"``) — the noise;
* ``"v"`` (``"v_prediction"``) — ``v = a·eps − s·x0`` (Salimans & Ho 2022, §4);
* ``"flow"`` (``"flow_prediction"``) — the velocity ``u = eps − x0``; for rectified flow this is
  ``dx_t/dt``, and the formula inverts for any (a, s) with ``a + s > 0``.

All conversions run in float64 and return the dtype of their input prediction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

PREDICTION_ALIASES = {
    "x0": "x0", "sample": "x0",
    "eps": "eps", "epsilon": "eps",
    "v": "v", "v_prediction": "v",
    "flow": "flow", "flow_prediction": "flow",
}
PREDICTION_KINDS = ("x0", "eps", "v", "flow")


def canonical_prediction(kind: str) -> str:
    """Map a prediction name (ours or diffusers') to one of ``PREDICTION_KINDS``."""
    try:
        return PREDICTION_ALIASES[kind]
    except KeyError:
        raise ValueError(
            f"unknown prediction type {kind!r}; use one of {sorted(PREDICTION_ALIASES)}"
        ) from None


def broadcast_to(coef: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient ``(B,)`` (or a scalar) so it broadcasts against ``x``."""
    coef = torch.as_tensor(coef, device=x.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))


def split_prediction(
    pred: torch.Tensor, kind: str, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x0, eps)`` in float64 from a prediction of type ``kind`` at ``x_t = a·x0 + s·eps``.

    Formulas (methods.md §1): eps → x0 ``(x_t − s·eps)/a``; v → ``x0 = (a·x_t − s·v)/(a² + s²)``,
    ``eps = (s·x_t + a·v)/(a² + s²)``; flow ``u = eps − x0`` → ``x0 = (x_t − s·u)/(a + s)``,
    ``eps = (x_t + a·u)/(a + s)``.
    """
    kind = canonical_prediction(kind)
    p, x = pred.double(), x_t.double()
    a, s = broadcast_to(a, x).double(), broadcast_to(s, x).double()
    if kind == "x0":
        return p, (x - a * p) / s
    if kind == "eps":
        return (x - s * p) / a, p
    if kind == "v":
        norm = a * a + s * s
        return (a * x - s * p) / norm, (s * x + a * p) / norm
    norm = a + s
    return (x - s * p) / norm, (x + a * p) / norm


def join_prediction(
    x0: torch.Tensor, eps: torch.Tensor, kind: str, a: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """Express the pair ``(x0, eps)`` as a prediction of type ``kind`` (float64)."""
    kind = canonical_prediction(kind)
    x0, eps = x0.double(), eps.double()
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    if kind == "v":
        return broadcast_to(a, x0).double() * eps - broadcast_to(s, x0).double() * x0
    return eps - x0


def convert_prediction(
    pred: torch.Tensor, src: str, dst: str, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """Convert a prediction from kind ``src`` to kind ``dst`` at ``x_t``; float64 maths, input dtype out."""
    if canonical_prediction(src) == canonical_prediction(dst):
        return pred
    x0, eps = split_prediction(pred, src, x_t, a, s)
    return join_prediction(x0, eps, dst, a, s).to(pred.dtype)


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = 0.5) -> dict[str, torch.Tensor]:
    """EDM network preconditioning (Karras et al. 2022, Table 1): c_skip, c_out, c_in, c_noise."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    sd2 = sigma_data**2
    return {
        "c_skip": sd2 / (sigma**2 + sd2),
        "c_out": sigma * sigma_data / torch.sqrt(sigma**2 + sd2),
        "c_in": 1.0 / torch.sqrt(sigma**2 + sd2),
        "c_noise": torch.log(sigma) / 4,
    }


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: ``n`` noise levels from ``sigma_max`` down to ``sigma_min`` (float64)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class NoiseSchedule(ABC):
    """``x_t = a(t)·x0 + s(t)·eps`` over a native time axis; see the module docstring."""

    family: str
    #: native time of clean data (a = 1, s = 0); every sampling grid ends here
    t_clean: float
    #: the noisiest native time a sampler starts from
    t_max: float
    #: the least noisy native time a network is evaluated at
    t_min: float

    @abstractmethod
    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a(t), s(t))`` as float64 tensors shaped like ``t``."""

    @abstractmethod
    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`sigma`: the native time with EDM noise level ``σ = s/a``."""

    @abstractmethod
    def grid(self, num_steps: int, spacing: str | None = None, **kwargs: Any) -> torch.Tensor:
        """``num_steps + 1`` native times from noisy to ``t_clean`` (float64)."""

    @abstractmethod
    def sample_t(
        self, n: int, *, generator: torch.Generator | None = None, distribution: str | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Draw ``n`` training times (float64) from a named distribution."""

    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the initial noise at ``t_max`` (what sampling starts from)."""

    @abstractmethod
    def time_at_fraction(self, u: torch.Tensor) -> torch.Tensor:
        """The native time a fraction ``u ∈ [0, 1]`` of the way from the least to the most noisy level,
        always within ``[t_min, t_max]`` (``u`` is clamped to ``[0, 1]``).

        This is how the distribution-matching methods state their time ranges schedule-free (DMD's
        ``min_step_percent = 0.02``, ``max_step_percent = 0.98``): VP ``round(u·(T − 1))`` (DMD's integer
        timesteps), EDM the Karras interpolation ``(σ_min^{1/ρ} + u·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ`` (DMD2's
        ImageNet grid, SiD's ``rnd_t``), flow ``u`` through the shift.
        """

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """A JSON-safe dict that :func:`schedule_from_config` turns back into this schedule."""

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """EDM noise level ``σ(t) = s(t)/a(t)``."""
        a, s = self.alpha_sigma(t)
        return s / a

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_t = a·x0 + s·eps`` (float64 coefficients, ``x0``'s dtype out)."""
        a, s = self.alpha_sigma(t)
        out = broadcast_to(a, x0) * x0.double() + broadcast_to(s, x0) * eps.double()
        return out.to(x0.dtype)

    def prior_sample(
        self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Initial noise ``prior_std · eps`` for sampling from ``t_max``."""
        eps = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return eps * self.prior_std()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and self.to_config() == other.to_config()

    def __repr__(self) -> str:
        cfg = {k: v for k, v in self.to_config().items() if not isinstance(v, list)}
        return f"{type(self).__name__}({cfg})"


def _as_f64(t: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule over ``T`` integer timesteps (DDPM, Ho et al. 2020).

    Built from ``alphas_cumprod`` (ᾱ). ``alpha_sigma`` at fractional ``t`` interpolates ``log σ``
    linearly between neighbouring integers (exact at integers); ``t < 0`` means clean data.
    """

    family = "vp"
    t_clean = -1.0

    def __init__(self, alphas_cumprod: torch.Tensor | np.ndarray, scheduler_config: dict | None = None):
        abar = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        if abar.ndim != 1 or len(abar) < 2:
            raise ValueError("alphas_cumprod must be a 1-D sequence of at least two values")
        self.alphas_cumprod = abar
        self.num_train_timesteps = len(abar)
        self.t_min, self.t_max = 0.0, float(len(abar) - 1)
        self.scheduler_config = dict(scheduler_config or {})
        with np.errstate(divide="ignore"):
            self._log_sigmas = torch.log(torch.sqrt((1 - abar) / abar))

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> "VPSchedule":
        """Build from a diffusers scheduler config dict (``scheduler_config.json``).

        ᾱ is computed by diffusers' own ``DDPMScheduler`` from the same config, so that the
        schedule is bit-for-bit the one the teacher was trained with.
        """
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr", "steps_offset")
        scheduler = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
        resolved = {k: scheduler.config[k] for k in keys if scheduler.config.get(k) is not None}
        return cls(scheduler.alphas_cumprod.double(), scheduler_config=resolved)

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        t = _as_f64(t)
        log_sigma = self._interp_log_sigma(t.clamp(0, self.t_max).to(self._log_sigmas.device))
        sigma = torch.exp(log_sigma).to(t.device)
        a = torch.where(torch.isinf(sigma), torch.zeros_like(sigma), torch.rsqrt(1 + sigma**2))
        s = torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma * a)
        clean = t < 0
        return torch.where(clean, 1.0, a), torch.where(clean, 0.0, s)

    def _interp_log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Linear in log σ between integer timesteps; an interval ending at ᾱ = 0 (zero terminal SNR,
        σ = ∞) is linear in ᾱ instead, so that only ``t = T − 1`` itself has ``a = 0``."""
        lo = t.floor().long().clamp(0, self.num_train_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo.double()
        a, b = self._log_sigmas[lo], self._log_sigmas[hi]
        abar = self.alphas_cumprod[lo] + w * (self.alphas_cumprod[hi] - self.alphas_cumprod[lo])
        by_abar = 0.5 * torch.log((1 - abar) / abar)
        return torch.where(w == 0, a, torch.where(torch.isinf(b), by_abar, a + w * (b - a)))

    def t_from_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = _as_f64(sigma)
        table = self._log_sigmas.to(sigma.device)
        finite = table[torch.isfinite(table)]
        log_sigma = torch.log(sigma).clamp(finite[0], finite[-1])
        idx = torch.searchsorted(finite, log_sigma).clamp(1, len(finite) - 1)
        lo, hi = finite[idx - 1], finite[idx]
        t = (idx - 1).double() + ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return torch.where(sigma <= 0, self.t_clean, torch.where(torch.isinf(sigma), self.t_max, t))

    def _karras_timesteps(self, n: int, rho: float) -> np.ndarray:
        """Karras σ levels from σ(T−1) to σ(0) as fractional timesteps; with zero terminal SNR (σ(T−1) = ∞)
        the grid starts at ``T − 1`` and puts the other ``n − 1`` levels between σ(T−2) and σ(0)."""
        top = self.t_max if torch.isfinite(self.sigma(self.t_max)) else self.t_max - 1
        levels = n if top == self.t_max else n - 1
        ts = self.t_from_sigma(karras_sigmas(levels, float(self.sigma(0.0)), float(self.sigma(top)), rho)).numpy()
        return ts if top == self.t_max else np.concatenate([[self.t_max], ts[:levels]])

    def grid(self, num_steps: int, spacing: str | None = None, *, rho: float = 7.0,
             steps_offset: int | None = None) -> torch.Tensor:
        """Timesteps as diffusers spaces them, then ``t_clean``.

        ``"uniform"``/``"linspace"``: ``round(linspace(T−1, 0, n))``; ``"leading"``: ``(T//n)·k + offset``
        (diffusers' DDIM default); ``"trailing"``: ``round(arange(T, 0, −T/n)) − 1`` (Lin et al. 2024);
        ``"karras"``: Karras σ levels between σ(0) and σ(T−1), mapped back to fractional timesteps.
        """
        T, n = self.num_train_timesteps, num_steps
        spacing = spacing or "trailing"
        if n < 1 or n > T:
            raise ValueError(f"num_steps must be in [1, {T}], got {n}")
        if spacing in ("uniform", "linspace"):
            ts = np.linspace(0, T - 1, n).round()[::-1]
        elif spacing == "leading":
            offset = self.scheduler_config.get("steps_offset", 0) if steps_offset is None else steps_offset
            ts = (np.arange(0, n) * (T // n)).round()[::-1] + offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / n)) - 1
        elif spacing == "karras":
            ts = self._karras_timesteps(n, rho)
        else:
            raise ValueError(f"unknown VP grid spacing {spacing!r}; use uniform, leading, trailing or karras")
        return torch.cat([torch.as_tensor(ts.copy(), dtype=torch.float64), torch.tensor([self.t_clean], dtype=torch.float64)])

    def sample_t(self, n: int, *, generator: torch.Generator | None = None, distribution: str | None = None,
                 t_lo: float = 0.0, t_hi: float | None = None) -> torch.Tensor:
        """``"uniform"`` integers in ``[t_lo, t_hi]`` (default the whole range)."""
        if (distribution or "uniform") != "uniform":
            raise ValueError(f"VP schedules sample training times 'uniform', not {distribution!r}")
        hi = self.t_max if t_hi is None else t_hi
        return torch.randint(int(t_lo), int(hi) + 1, (n,), generator=generator).double()

    def prior_std(self) -> float:
        return 1.0  # a² + s² = 1 for unit-variance data, as diffusers' init_noise_sigma

    def time_at_fraction(self, u: torch.Tensor) -> torch.Tensor:
        return torch.round(_as_f64(u).clamp(0, 1) * self.t_max)

    def to_config(self) -> dict[str, Any]:
        if self.scheduler_config:
            return {"family": self.family, "scheduler_config": dict(self.scheduler_config)}
        return {"family": self.family, "alphas_cumprod": self.alphas_cumprod.tolist()}


class EDMSchedule(NoiseSchedule):
    """Karras et al. 2022 (EDM): native time is ``σ``; ``a = 1``, ``s = σ``."""

    family = "edm"
    t_clean = 0.0

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)
        self.sigma_data, self.rho = float(sigma_data), float(rho)

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        t = _as_f64(t)
        return torch.ones_like(t), t.clone()

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return _as_f64(sigma).clone()

    def grid(self, num_steps: int, spacing: str | None = None, *, rho: float | None = None) -> torch.Tensor:
        """``"karras"`` (eq. 5, the default) or ``"uniform"`` (linear in σ), then σ = 0."""
        spacing = spacing or "karras"
        if spacing == "karras":
            sig = karras_sigmas(num_steps, self.t_min, self.t_max, rho or self.rho)
        elif spacing == "uniform":
            sig = torch.linspace(self.t_max, self.t_min, num_steps, dtype=torch.float64)
        else:
            raise ValueError(f"unknown EDM grid spacing {spacing!r}; use karras or uniform")
        return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])

    def sample_t(self, n: int, *, generator: torch.Generator | None = None, distribution: str | None = None,
                 p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
        """``"lognormal"``: ``ln σ ~ N(p_mean, p_std²)`` (EDM training, the default); ``"uniform"`` in σ."""
        distribution = distribution or "lognormal"
        if distribution == "lognormal":
            return torch.exp(p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64))
        if distribution == "uniform":
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            return self.t_min + u * (self.t_max - self.t_min)
        raise ValueError(f"unknown EDM time distribution {distribution!r}; use lognormal or uniform")

    def prior_std(self) -> float:
        return self.t_max

    def time_at_fraction(self, u: torch.Tensor) -> torch.Tensor:
        lo, hi = self.t_min ** (1 / self.rho), self.t_max ** (1 / self.rho)
        return ((lo + _as_f64(u).clamp(0, 1) * (hi - lo)) ** self.rho).clamp(self.t_min, self.t_max)  # rounding

    def to_config(self) -> dict[str, Any]:
        return {"family": self.family, "sigma_min": self.t_min, "sigma_max": self.t_max,
                "sigma_data": self.sigma_data, "rho": self.rho}


class FlowSchedule(NoiseSchedule):
    """Rectified flow (Liu et al. 2023; SD3): ``x_t = (1 − t)·x0 + t·eps``, ``t ∈ [0, 1]``."""

    family = "flow"
    t_clean = 0.0
    t_min = 0.0
    t_max = 1.0

    def __init__(self, shift: float = 1.0):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = float(shift)

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        t = _as_f64(t)
        return 1 - t, t.clone()

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = _as_f64(sigma)
        return torch.where(torch.isinf(sigma), 1.0, sigma / (1 + sigma))

    def shift_time(self, t: torch.Tensor) -> torch.Tensor:
        """SD3's resolution shift ``t' = k·t / (1 + (k − 1)·t)`` (Esser et al. 2024, eq. 23)."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def grid(self, num_steps: int, spacing: str | None = None) -> torch.Tensor:
        """``"uniform"`` (``"trailing"`` is the same in continuous time) ``linspace(1, 0, n + 1)``,
        passed through :meth:`shift_time`."""
        spacing = spacing or "uniform"
        if spacing not in ("uniform", "trailing"):
            raise ValueError(f"unknown flow grid spacing {spacing!r}; use uniform or trailing")
        return self.shift_time(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64))

    def sample_t(self, n: int, *, generator: torch.Generator | None = None, distribution: str | None = None,
                 mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        """``"uniform"`` on (0, 1) or ``"logit_normal"`` (SD3, Esser et al. 2024 §3.1); then shifted."""
        distribution = distribution or "logit_normal"
        if distribution == "uniform":
            t = torch.rand(n, generator=generator, dtype=torch.float64)
        elif distribution == "logit_normal":
            t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64))
        else:
            raise ValueError(f"unknown flow time distribution {distribution!r}; use uniform or logit_normal")
        return self.shift_time(t)

    def prior_std(self) -> float:
        return 1.0

    def time_at_fraction(self, u: torch.Tensor) -> torch.Tensor:
        return self.shift_time(_as_f64(u).clamp(0, 1))

    def to_config(self) -> dict[str, Any]:
        return {"family": self.family, "shift": self.shift}


def schedule_from_config(config: dict[str, Any]) -> NoiseSchedule:
    """Inverse of :meth:`NoiseSchedule.to_config`."""
    cfg = dict(config)
    family = cfg.pop("family", None)
    if family == "vp":
        if "scheduler_config" in cfg:
            return VPSchedule.from_scheduler_config(cfg["scheduler_config"])
        return VPSchedule(cfg["alphas_cumprod"])
    if family == "edm":
        return EDMSchedule(**cfg)
    if family == "flow":
        return FlowSchedule(**cfg)
    raise ValueError(f"unknown schedule family {family!r}; use vp, edm or flow")


def log_snr(schedule: NoiseSchedule, t: torch.Tensor | float) -> torch.Tensor:
    """``λ(t) = log(a/s) = −log σ(t)`` (DPM-Solver's half log-SNR)."""
    return -torch.log(schedule.sigma(t))


__all__ = [
    "PREDICTION_KINDS", "canonical_prediction", "broadcast_to", "split_prediction", "join_prediction",
    "convert_prediction", "edm_preconditioning", "karras_sigmas", "NoiseSchedule", "VPSchedule",
    "EDMSchedule", "FlowSchedule", "schedule_from_config", "log_snr",
]
