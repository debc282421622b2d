"""DMD2 (Yin et al. 2024b): distribution matching without regression, with TTUR, a GAN and multi-step
students trained by backward simulation.

Against DMD (:mod:`.dmd`): no regression loss and no paired data (§4.1); the critic takes ``critic.updates
= 5`` steps per generator step (two time-scale updates, §4.2); a diffusion-GAN head on the critic's
bottleneck, trained on real images vs student samples, adds a non-saturating term to the generator
(§4.3; weights 3e-3 generator / 1e-2 head, the official ImageNet values); multi-step students use their
own chain for their inputs (§4.5). Every one of these is a config switch: ``critic.updates``,
``gan.enabled`` / ``gan.features`` (critic or teacher), ``generator.student_inputs`` (backward_simulation
or noised_data), ``generator.student_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .distribution_matching import dmd_loss
from .gan import GANArgs
from .method import register_method
from .score_distillation import CriticSection, ScoreDistillation, ScoreDistillConfig


@dataclass
class DMD2Config(ScoreDistillConfig):
    method: str = "dmd2"
    critic: CriticSection = field(default_factory=lambda: CriticSection(updates=5))
    gan: GANArgs = field(default_factory=lambda: GANArgs(enabled=True))


@register_method
class DMD2(ScoreDistillation):
    name = "dmd2"
    config_class = DMD2Config

    def generator_terms(self, x, t, eps, cond, batch, generator, step=0):
        loss = dmd_loss(x, *self.score_predictions(x, t, eps, cond, step))
        return {"distribution_matching": loss, "loss": loss}
