"""Progressive distillation (Salimans & Ho 2022, Algorithm 2).

The student starts as a copy of the teacher and learns to do in one deterministic DDIM step what its
teacher does in two. Round ``k`` distils a ``2N``-step teacher into an ``N``-step student over the grid
``linspace(t_max, t_clean, N + 1)`` (for a 1000-step VP schedule and N = 4 that is 999, 749, 499, 249);
after ``steps_per_round`` steps the student becomes the next round's teacher and N halves, from
``initial_steps / 2`` down to ``final_steps``.

For a student step t → r with the teacher's midpoint t′, two teacher DDIM steps z_t → z_t′ → z_r give the
target (methods.md §4)::

    x̃ = (z_r − (s_r/s_t)·z_t) / (a_r − (s_r/s_t)·a_t)

the x0 for which one DDIM step from z_t lands exactly on z_r. The loss is ``w(t)·‖x̃ − x̂0_student(z_t)‖²``
with the paper's "truncated SNR" weight ``max(a_t²/s_t², 1)`` (or "SNR+1", ``(a_t² + s_t²)/s_t²``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..config import option
from ..denoiser import Denoiser
from ..samplers.base import ddim_step
from ..schedules import NoiseSchedule, broadcast_to
from .method import DistillConfig, Method, register_method
from .lora import frozen_sharing_copy


def progressive_grid(schedule: NoiseSchedule, num_steps: int) -> torch.Tensor:
    """``num_steps + 1`` evenly spaced native times from ``t_max`` to the clean time; the ``2N`` grid nests
    the ``N`` grid (every other point)."""
    return torch.linspace(schedule.t_max, schedule.t_clean, num_steps + 1, dtype=torch.float64)


def progressive_target(schedule: NoiseSchedule, z_t: torch.Tensor, z_r: torch.Tensor, t: torch.Tensor,
                       r: torch.Tensor) -> torch.Tensor:
    """``x̃ = (z_r − (s_r/s_t)·z_t) / (a_r − (s_r/s_t)·a_t)`` in float64 (Salimans & Ho 2022, Alg. 2)."""
    (a_t, s_t), (a_r, s_r) = schedule.alpha_sigma(t), schedule.alpha_sigma(r)
    ratio = broadcast_to(s_r / s_t, z_t)
    return (z_r.double() - ratio * z_t.double()) / (broadcast_to(a_r, z_t) - ratio * broadcast_to(a_t, z_t))


def loss_weight(schedule: NoiseSchedule, t: torch.Tensor, kind: str) -> torch.Tensor:
    """Salimans & Ho 2022 §4: "truncated_snr" ``max(a²/s², 1)`` or "snr_plus_one" ``(a² + s²)/s²``."""
    a, s = schedule.alpha_sigma(t)
    snr = a**2 / s**2
    return torch.clamp(snr, min=1.0) if kind == "truncated_snr" else snr + 1


def progressive_loss(teacher: Denoiser, student: Denoiser, x0: torch.Tensor, cond, num_student_steps: int,
                     weighting: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One micro-batch of Alg. 2: a student step index per sample, ``z_t`` from data, two teacher DDIM
    steps to the target, the weighted x0 regression of the student at ``z_t``."""
    schedule = teacher.schedule
    grid = progressive_grid(schedule, 2 * num_student_steps)
    i = torch.randint(num_student_steps, (len(x0),), generator=generator)
    t, mid, r = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    z_t = schedule.add_noise(x0, eps, t)
    with torch.no_grad():
        z_mid = ddim_step(teacher, z_t, teacher(z_t, t, cond), t, mid)
        z_r = ddim_step(teacher, z_mid, teacher(z_mid, mid, cond), mid, r)
        target = progressive_target(schedule, z_t, z_r, t, r).to(x0.dtype)
    mse = ((student(z_t, t, cond) - target) ** 2).flatten(1).mean(1)
    weight = loss_weight(schedule, t, weighting).to(mse)
    return {"loss": (weight * mse).mean(), "mse_x0": mse.mean().detach()}


@dataclass
class ProgressiveArgs:
    initial_steps: int = option(64, min=2, help="teacher sampling steps in the first round (a power of two)")
    final_steps: int = option(1, min=1, help="student steps after the last round")
    steps_per_round: int = option(500, min=1)
    weighting: Literal["truncated_snr", "snr_plus_one"] = "truncated_snr"

    def validate(self) -> None:
        rounds = math.log2(self.initial_steps / self.final_steps)
        if self.final_steps >= self.initial_steps or rounds != int(rounds):
            raise ValueError("initial_steps / final_steps must be a power of two greater than 1")


@dataclass
class ProgressiveConfig(DistillConfig):
    method: str = "progressive"
    progressive: ProgressiveArgs = field(default_factory=ProgressiveArgs)


@register_method
class ProgressiveDistillation(Method):
    name = "progressive"
    config_class = ProgressiveConfig
    student_sampler = "ode"

    def __init__(self, cfg: ProgressiveConfig, teacher):
        super().__init__(cfg, teacher)
        self.args = cfg.progressive
        self.num_rounds = int(round(math.log2(self.args.initial_steps / self.args.final_steps)))
        self.round = 0
        self.student = self.new_student()
        self.round_teacher: nn.Module | None = None

    # roles
    def trainable_roles(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def buffer_roles(self) -> dict[str, nn.Module]:
        return {"round_teacher": self.round_teacher} if self.round_teacher is not None else {}

    def student_denoiser(self, network: nn.Module) -> Denoiser:
        return self.like_teacher(network)

    def teacher_denoiser(self) -> Denoiser:
        """Round 0: the (guided) teacher; later rounds: the previous round's student, frozen."""
        return self.teacher.denoiser if self.round_teacher is None else self.student_denoiser(self.round_teacher)

    @property
    def student_steps(self) -> int:
        return self.args.initial_steps // 2 ** (self.round + 1)

    def student_timesteps(self, num_steps: int) -> list[float]:
        return progressive_grid(self.teacher.denoiser.schedule, num_steps)[:-1].tolist()

    # the work
    def loss(self, phase, batch, step, generator) -> dict[str, torch.Tensor]:
        x0, cond = batch
        return progressive_loss(self.teacher_denoiser(), self.student_denoiser(self.student), x0, cond,
                                self.student_steps, self.args.weighting, generator)

    def after_step(self, step: int) -> bool:
        """At the end of a round the student becomes the teacher, N halves, and the EMA restarts (an
        average over students of different step counts is no student of either)."""
        if (step + 1) % self.args.steps_per_round == 0 and self.round < self.num_rounds - 1:
            self.round += 1
            self.round_teacher = frozen_sharing_copy(self.student).eval().requires_grad_(False)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        if self.round > 0 and self.round_teacher is None:
            self.round_teacher = frozen_sharing_copy(self.student).eval().requires_grad_(False)
