"""Improved consistency training (iCT, Song & Dhariwal 2023).

Consistency training needs no teacher network: the pair of points on one trajectory is the same data
and the same noise at two adjacent noise levels, ``x_{n+1} = x0 + σ_{n+1}·z`` and ``x̂_n = x0 + σ_n·z``
(written in the schedule's native scaling). iCT's changes to consistency training, all defaults here:

* the target network is the student itself under stop-gradient (``θ⁻ = sg(θ)``, no EMA, §3.2);
* pseudo-Huber distance ``sqrt(‖x − y‖² + c²) − c``, ``c = 0.00054·sqrt(dim)`` (§3.3);
* weighting ``λ(σ_n) = 1/(σ_{n+1} − σ_n)`` (§3.4);
* pairs drawn from a discretised lognormal, ``P_mean = −1.1``, ``P_std = 2.0`` (§3.5);
* the discretisation curriculum ``N(k) = min(s0·2^⌊k/K′⌋, s1) + 1``, ``K′ = ⌊K/(log2⌊s1/s0⌋ + 1)⌋``,
  doubling from ``s0 = 10`` to ``s1 = 1280`` over the ``K`` training steps (§3.5, eq. 11).

Only the teacher's *architecture and schedule* are used: ``init: scratch`` (the paper) trains a freshly
initialised copy; ``init: teacher`` starts from the teacher's weights (faster on small budgets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..config import option
from ..denoiser import Denoiser
from ..errors import ConfigError
from ..schedules import karras_sigmas
from .consistency import (
    ConsistencyDenoiser, check_sample_sigmas, consistency_distillation_loss, explicit_sample_timesteps,
    lognormal_level_probs,
)
from .method import DistillConfig, Method, register_method


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """``N(k)`` of Song & Dhariwal 2023, eq. 11 (the number of noise levels at training step ``k``)."""
    k_prime = math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(step / max(k_prime, 1)), s1) + 1


@dataclass
class ICTArgs:
    sigma_min: float | None = option(None, min=0.0, help="None: the larger of 0.002 and σ at the schedule's t_min")
    sigma_max: float = option(80.0, min=0.0)
    rho: float = option(7.0, min=1.0)
    s0: int = option(10, min=1, help="initial discretisation steps")
    s1: int = option(1280, min=1, help="final discretisation steps")
    p_mean: float = -1.1
    p_std: float = option(2.0, min=0.0)
    distance: Literal["l2", "pseudo_huber"] = "pseudo_huber"
    weighting: Literal["uniform", "icm"] = "icm"
    init: Literal["scratch", "teacher"] = "scratch"
    sigma_data: float = option(0.5, min=0.0)
    sample_sigmas: dict[str, list[float]] = option(
        {}, help="explicit σ levels of the n-step sampler after its first (σ_max) one, keyed by n, as "
                 "consistency.sample_sigmas; step counts not given use the final grid's levels evenly spaced in index")


@dataclass
class ICTConfig(DistillConfig):
    method: str = "ict"
    ict: ICTArgs = field(default_factory=ICTArgs)


@register_method
class ImprovedConsistencyTraining(Method):
    name = "ict"
    config_class = ICTConfig
    student_sampler = "sde"

    def __init__(self, cfg: ICTConfig, teacher):
        super().__init__(cfg, teacher)
        self.args = a = cfg.ict
        schedule = teacher.denoiser.schedule
        self.sigma_min = max(a.sigma_min or 0.002, float(schedule.sigma(schedule.t_min)))
        self.sigma_max = min(a.sigma_max, float(schedule.sigma(schedule.t_max)))
        check_sample_sigmas(a.sample_sigmas, self.sigma_min, self.sigma_max, "ict")
        net = teacher.network
        if a.init == "teacher":
            self.student = self.new_student()
        elif cfg.student.lora_rank:
            raise ConfigError("ict.init=scratch trains a fresh network, so LoRA students need ict.init=teacher")
        else:
            with torch.random.fork_rng():  # a seeded fresh init that leaves the global RNG alone
                torch.manual_seed(cfg.train.seed)
                self.student = type(net).from_config(net.config)
        self.student.to(next(net.parameters()).device).train().requires_grad_(True)
        self.total_steps = cfg.train.max_steps

    def trainable_roles(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def student_denoiser(self, network: nn.Module) -> Denoiser:
        return ConsistencyDenoiser(self.like_teacher(network), self.sigma_min, boundary="cm",
                                   sigma_data=self.args.sigma_data)

    def sigmas(self, num_scales: int) -> torch.Tensor:
        """``num_scales`` Karras levels, least noisy first."""
        return karras_sigmas(num_scales, self.sigma_min, self.sigma_max, self.args.rho).flip(0)

    def student_timesteps(self, num_steps: int) -> list[float]:
        """σ_max, then ``ict.sample_sigmas[num_steps]`` where given, else levels of the final grid evenly
        spaced in index from the noisiest down."""
        schedule = self.teacher.denoiser.schedule
        given = explicit_sample_timesteps(self.args.sample_sigmas, num_steps, schedule,
                                          float(schedule.t_from_sigma(torch.tensor(self.sigma_max, dtype=torch.float64))))
        if given is not None:
            return given
        levels = self.sigmas(ict_num_scales(self.total_steps, self.total_steps, self.args.s0, self.args.s1))
        idx = torch.linspace(len(levels) - 1, 0, num_steps + 1).round().long()[:-1]
        return schedule.t_from_sigma(levels[idx]).tolist()

    def loss(self, phase, batch, step, generator) -> dict[str, torch.Tensor]:
        x0, cond = batch
        a = self.args
        sigmas = self.sigmas(ict_num_scales(step, self.total_steps, a.s0, a.s1))
        schedule = self.teacher.denoiser.schedule
        student = self.student_denoiser(self.student)
        terms = consistency_distillation_loss(None, student, student, x0, cond, schedule.t_from_sigma(sigmas),
                                              schedule=schedule, distance=a.distance, weighting=a.weighting,
                                              level_probs=lognormal_level_probs(sigmas, a.p_mean, a.p_std),
                                              generator=generator)
        return {**terms, "num_scales": torch.tensor(float(len(sigmas)))}
