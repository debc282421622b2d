"""SiD: score identity distillation (Zhou et al. 2024). Data-free: images are never read.

The critic is a full copy of the teacher trained with EDM-weighted score matching (``critic.weighting =
karras``, as the official ``SID_EDMLoss``); the generator minimises the score-identity loss
(:func:`.distribution_matching.sid_loss`) with ``α = 1.2`` (paper default) at noise levels up to
``t_max_fraction = 0.8`` of the schedule (the official ``tmax = 800``), with gradients through both score
networks' outputs to the sample (their weights frozen in this phase).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import option
from .distribution_matching import sid_loss
from .method import register_method
from .score_distillation import CriticSection, GeneratorArgs, ScoreDistillation, ScoreDistillConfig


@dataclass
class SiDArgs:
    alpha: float = option(1.2, help="α of the SiD loss (paper: 1.2; α = 1 has the critic-error term only)")


@dataclass
class SiDConfig(ScoreDistillConfig):
    method: str = "sid"
    generator: GeneratorArgs = field(default_factory=lambda: GeneratorArgs(t_min_fraction=0.0, t_max_fraction=0.8))
    critic: CriticSection = field(default_factory=lambda: CriticSection(weighting="karras"))
    sid: SiDArgs = field(default_factory=SiDArgs)


@register_method
class SiD(ScoreDistillation):
    name = "sid"
    config_class = SiDConfig
    uses_data = False

    def generator_terms(self, x, t, eps, cond, batch, generator, step=0):
        loss = sid_loss(x, *self.score_predictions(x, t, eps, cond, step, through=True), self.cfg.sid.alpha)
        return {"score_identity": loss, "loss": loss}
