"""Latent-consistency-style guidance distillation (LCM, Luo et al. 2023, Algorithm 1).

Consistency distillation (:mod:`.consistency`) in which the teacher's solver step is classifier-free
guided at a scale ``w`` drawn per sample from ``[w_min, w_max]``, and the student (and its target) get
``w`` as an extra input — a sinusoidal embedding of ``1000·(w − 1)`` added to the time embedding — so one
student serves every guidance scale in a single forward pass. The defaults follow the paper: a
skipping-step DDIM solver over 50 evenly spaced timesteps, the LCM boundary scalings, L2 distance.

Scale convention: ``w_min``/``w_max`` are read in the run's ``guidance_convention``. LCM's paper and the
diffusers training script write guidance as ``x_c + ω·(x_c − x_u)`` (``delta``) and embed ``ω``; inside we
hold the standard ``w = ω + 1`` and embed ``w − 1``, exactly what diffusers' LCM pipelines feed the UNet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F

from ..adapters import add_time_condition
from ..config import option
from ..denoiser import Conditioning, Denoiser, standard_guidance_scale
from .consistency import ConsistencyArgs, ConsistencyDistillation
from .method import DistillConfig, register_method


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``1000·w`` (Luo et al. 2023; diffusers' ``get_guidance_scale_embedding``)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freq[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GuidanceEmbeddedStudent(Denoiser):
    """A student whose ``guidance_scale`` (standard ``w``) is an input: ``forward`` embeds ``w − 1`` as
    ``cond.timestep_cond`` and runs ``inner`` once, unguided. ``guidance_scale`` defaults to ``default_scale``."""

    embeds_guidance = True

    def __init__(self, inner: Denoiser, embedding_dim: int, default_scale: float):
        super().__init__(None, inner.schedule, "x0", guidance_scale=default_scale)
        self.inner, self.embedding_dim = inner, embedding_dim

    def forward(self, x_t, t, cond=None, *, guidance_scale=None, output: str = "x0"):
        w = torch.as_tensor(self.guidance_scale if guidance_scale is None else guidance_scale, dtype=torch.float64)
        w = w.expand(x_t.shape[0]) if w.ndim == 0 else w
        emb = guidance_scale_embedding(w - 1, self.embedding_dim).to(x_t.device)
        return self.inner(x_t, t, replace(cond or Conditioning(), timestep_cond=emb), guidance_scale=1.0,
                          output=output)


@dataclass
class LCMArgs(ConsistencyArgs):
    num_scales: int = option(50, min=2, help="skipping-step DDIM solver over this many timesteps")
    discretisation: Literal["karras", "uniform"] = "uniform"
    solver: Literal["heun", "euler", "ddim"] = "ddim"
    boundary: Literal["cm", "lcm"] = "lcm"
    w_min: float = option(1.0, min=0.0, help="lowest teacher guidance scale (run's guidance_convention)")
    w_max: float = option(4.0, min=0.0, help="highest teacher guidance scale")
    embedding_dim: int = option(256, min=2, help="size of the guidance-scale embedding")
    sample_guidance_scale: float = option(2.0, min=0.0, help="w the sample grids use (run's convention)")

    def validate(self) -> None:
        if self.w_max < self.w_min:
            raise ValueError("lcm.w_max must be at least lcm.w_min")


@dataclass
class LCMConfig(DistillConfig):
    method: str = "lcm"
    lcm: LCMArgs = field(default_factory=LCMArgs)


@register_method
class LatentConsistencyDistillation(ConsistencyDistillation):
    name = "lcm"
    config_class = LCMConfig
    supports_lora_student = False  # the guidance embedding is a new layer, not an adapter

    def __init__(self, cfg: LCMConfig, teacher):
        super().__init__(cfg, teacher)
        for net in (self.student, self.target):
            add_time_condition(net, self.args.embedding_dim)
        convention = cfg.guidance_convention
        self.w_range = (standard_guidance_scale(self.args.w_min, convention),
                        standard_guidance_scale(self.args.w_max, convention))
        self.sample_scale = standard_guidance_scale(self.args.sample_guidance_scale, convention)

    @staticmethod
    def method_args(cfg) -> LCMArgs:
        return cfg.lcm

    def student_denoiser(self, network) -> Denoiser:
        return GuidanceEmbeddedStudent(super().student_denoiser(network), self.args.embedding_dim, self.sample_scale)

    def loss(self, phase, batch, step, generator, guidance_scale=None) -> dict[str, torch.Tensor]:
        lo, hi = self.w_range
        w = lo + (hi - lo) * torch.rand(len(batch[0]), generator=generator, dtype=torch.float64)
        terms = super().loss(phase, batch, step, generator, guidance_scale=w)
        return {**terms, "w_mean": w.mean().float()}

