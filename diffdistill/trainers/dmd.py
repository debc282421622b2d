"""DMD: distribution matching distillation (Yin et al. 2024), one-step, with its regression loss.

The generator follows the distribution-matching gradient (eq. 7; :func:`.distribution_matching.dmd_loss`)
given by the guided teacher and a fake-score critic trained alongside (one critic update per generator
update), plus a regression loss (eq. 9) that keeps the generator on the teacher's noise → image map:
``λ_reg · d(G(z), y)`` over pairs ``(z, y)`` made once by the teacher's ODE sampler. The paper's ``d`` is
LPIPS, which needs downloaded weights; here it is pixel L2 (``dmd.regression_distance``), pseudo-Huber as
the alternative. ``λ_reg = 0.25`` (paper, §4). Pairs come from ``dmd.pairs`` (a file ``diffdistill pairs``
wrote; made and cached there if missing) or, with ``dmd.pairs: null``, are made in memory at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..config import option
from ..denoiser import Conditioning
from ..pretrained import cached_tensors
from ..samplers import generate
from .consistency import pseudo_huber, squared_l2
from .distribution_matching import dmd_loss
from .method import register_method
from .score_distillation import ScoreDistillation, ScoreDistillConfig


@dataclass
class DMDArgs:
    regression_weight: float = option(0.25, min=0.0, help="λ_reg; 0 turns the regression loss off")
    regression_distance: Literal["l2", "pseudo_huber"] = "l2"
    pairs: str | None = option(None, help="safetensors of (noise, image, labels) pairs; null = make in memory")
    num_pairs: int = option(1024, min=1)
    pair_sampler: str = "heun"
    pair_steps: int = option(50, min=1)
    pair_seed: int = 0


@dataclass
class DMDConfig(ScoreDistillConfig):
    method: str = "dmd"
    dmd: DMDArgs = field(default_factory=DMDArgs)


def make_pairs(teacher, num: int, sampler: str, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """``num`` (noise, teacher ODE image, label) triples; the noise is exactly what ``generate`` drew."""
    classes = teacher.num_classes
    labels = torch.arange(num) % classes if classes else torch.zeros(num, dtype=torch.long)
    cond = Conditioning(class_labels=labels) if classes else None
    images = generate(teacher.denoiser, teacher.sample_shape, num, sampler=sampler, num_steps=steps, cond=cond,
                      seed=seed)
    noise = teacher.denoiser.schedule.prior_sample((num, *teacher.sample_shape),
                                                   generator=torch.Generator().manual_seed(seed))
    return {"noise": noise.contiguous(), "images": images.contiguous(), "labels": labels}


def load_or_make_pairs(teacher, args: DMDArgs) -> dict[str, torch.Tensor]:
    """The pairs file ``args.pairs`` (made and written first when missing), or fresh pairs when it is unset."""
    def make() -> dict[str, torch.Tensor]:
        return make_pairs(teacher, args.num_pairs, args.pair_sampler, args.pair_steps, args.pair_seed)

    return cached_tensors(Path(args.pairs), make) if args.pairs else make()


@register_method
class DMD(ScoreDistillation):
    name = "dmd"
    config_class = DMDConfig

    def __init__(self, cfg: DMDConfig, teacher):
        super().__init__(cfg, teacher)
        self.pairs = load_or_make_pairs(teacher, cfg.dmd) if cfg.dmd.regression_weight > 0 else None

    def generator_terms(self, x, t, eps, cond, batch, generator, step=0):
        terms = {"distribution_matching": dmd_loss(x, *self.score_predictions(x, t, eps, cond, step))}
        loss = terms["distribution_matching"]
        if self.pairs is not None:
            terms["regression"] = reg = self.regression(len(x), x.device, generator)
            loss = loss + self.cfg.dmd.regression_weight * reg
        return {**terms, "loss": loss}

    def regression(self, n: int, device, generator: torch.Generator) -> torch.Tensor:
        """``d(G(z), y)`` on ``n`` random pairs, through the student's first (pure-noise) step."""
        idx = torch.randint(len(self.pairs["noise"]), (n,), generator=generator)
        z, y = self.pairs["noise"][idx].to(device), self.pairs["images"][idx].to(device)
        cond = Conditioning(class_labels=self.pairs["labels"][idx].to(device)) if self.teacher.num_classes \
            else Conditioning()
        out = self.student_denoiser(self.student)(z, self.timesteps[0], cond, guidance_scale=1.0)
        distance = squared_l2 if self.cfg.dmd.regression_distance == "l2" else pseudo_huber
        return distance(out, y).mean()
