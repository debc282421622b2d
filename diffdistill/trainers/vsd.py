"""Variational score distillation as a one-step generator loss (VSD, Wang et al. 2023; SwiftBrush,
Nguyen & Tran 2024). Data-free: images are never read.

The critic is a LoRA on the teacher (``critic.kind = lora``), trained by ε-matching on student samples;
the generator follows ``w(t)·(ε̂_teacher(x_t) − ε̂_lora(x_t))`` (:func:`.distribution_matching.vsd_loss`)
— the DMD direction without its normalisation, written in ε — with ``w(t) = σ_t²`` (ProlificDreamer) or 1
(``vsd.weighting``). SwiftBrush's teacher-time range is the DMD one (0.02–0.98 of the schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..samplers.base import per_sample
from .distribution_matching import vsd_loss
from .method import register_method
from .score_distillation import CriticSection, ScoreDistillation, ScoreDistillConfig


@dataclass
class VSDArgs:
    weighting: Literal["sigma_squared", "uniform"] = "sigma_squared"


@dataclass
class VSDConfig(ScoreDistillConfig):
    method: str = "vsd"
    critic: CriticSection = field(default_factory=lambda: CriticSection(kind="lora"))
    vsd: VSDArgs = field(default_factory=VSDArgs)


@register_method
class VSD(ScoreDistillation):
    name = "vsd"
    config_class = VSDConfig
    uses_data = False

    def generator_terms(self, x, t, eps, cond, batch, generator, step=0):
        a, s = (per_sample(c, x) for c in self.teacher.denoiser.schedule.alpha_sigma(t))
        loss = vsd_loss(x, *self.score_predictions(x, t, eps, cond, step), a, s, self.cfg.vsd.weighting)
        return {"variational_score": loss, "loss": loss}
