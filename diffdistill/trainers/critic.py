"""The fake-score critic of the distribution-matching methods: a denoiser of the student's samples.

It starts as the teacher and learns, by denoising score matching on (detached) student samples, the
score of the student's output distribution (DMD, Yin et al. 2024, §3.2; VSD, Wang et al. 2023, §4).
Two forms (switch ``critic.kind``):

- ``"full"``: a trainable float32 copy of the teacher network (DMD, DMD2, SiD);
- ``"lora"``: LoRA adapters (peft) on a *shallow* copy of the teacher whose base weights are the frozen
  teacher's own tensors, so the critic costs only its adapters, their gradients and optimizer state
  (VSD / SwiftBrush). The loop never checkpoints those shared tensors.

The score-matching weighting is a switch, because the official codes differ: ``"snr"`` is the ε-MSE
(``‖ε̂ − ε‖² = SNR·‖x̂0 − x0‖²``; DMD2's Stable Diffusion code), ``"karras"`` the EDM weighting
``(SNR + 1/σ_d²)·‖x̂0 − x0‖²`` (DMD2's ImageNet code and SiD), ``"snr_plus_one"`` the v-MSE.
Training times are uniform over the whole schedule (both DMD2 codes).

``start`` matters for analytic teachers only, whose exact denoiser has no network to copy. ``"teacher"``
copies the MLP fitted to the mixture that students start from, so the critic starts off the exact teacher by
that fit's error (which nothing in the DMD gradient cancels); ``"exact_residual"`` is the exact denoiser plus a
learned correction that starts at zero (:class:`~diffdistill.toy.ResidualToyMLP`), so the critic starts as the
teacher exactly, as a copy of a real teacher does. On ring8 DMD2 with it scored 1.61× the exact ODE's SW2
against 1.47× from ``"teacher"`` (20 000 updates, docs/results.md "Analytic Gaussian mixture"), so it is not the default.

For a K-step student, ``per_step`` is a switch too. DMD2's code trains one critic on the outputs of all K
steps, so the critic models their *mixture*, and each step's generator gradient corrects the mixture
rather than that step's own distribution. With ``per_step`` the critic role holds K networks (a
``ModuleList``), and critic k sees only step k's outputs and scores only step k's samples. The cheaper
third form, ``step_embedding``, keeps one critic but tells it which step made its input: the step's one-hot
code enters the network's time embedding through a zero-initialised projection (the input LCM uses for its
guidance scale), so the critic starts as the teacher, learns from every step's samples, and can still fit
each step's own distribution (:class:`StepConditionedCritic`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from ..config import option
from ..denoiser import Conditioning, Denoiser
from ..errors import ConfigError
from ..samplers.base import per_sample
from .lora import LORA_TARGETS, add_lora, trainable_copy

@dataclass
class CriticArgs:
    kind: Literal["full", "lora"] = "full"
    lora_rank: int = option(8, min=1, help="LoRA rank (critic.kind = lora)")
    lora_alpha: float = option(8.0, min=0.0, help="LoRA scale numerator: the update is (alpha/rank)·BA")
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    weighting: Literal["snr", "karras", "snr_plus_one"] = "snr"
    start: Literal["teacher", "exact_residual"] = option("teacher", help="analytic teachers: exact_residual = the "
                                                         "exact denoiser plus a zero-initialised learned correction")
    per_step: bool = option(False, help="K-step students: one critic per student step, each trained on that step's "
                                        "outputs only (K times the critic's memory); off: one critic for all steps")
    step_embedding: bool = option(False, help="K-step students: the one critic is told the student step that "
                                              "made its input (a learned code in its time embedding)")

    def validate(self) -> None:
        if self.per_step and self.step_embedding:
            raise ValueError("critic.per_step and critic.step_embedding are two alternatives; set one")


def build_critic_network(teacher_network: nn.Module, args: CriticArgs, seed: int) -> nn.Module:
    """The critic's network per ``args.kind``; see the module docstring. ``seed`` draws a LoRA critic's
    adapter initialisation (distinct from a LoRA student's drawn from the same run seed)."""
    if args.kind == "full":
        return trainable_copy(teacher_network)
    return add_lora(teacher_network, args.lora_rank, args.lora_alpha, args.lora_targets, "critic", seed + 1)


def add_step_input(network: nn.Module, steps: int) -> None:
    """Give the critic ``network`` the zero-initialised step input :class:`StepConditionedCritic` feeds."""
    from ..adapters import add_time_condition

    if not hasattr(network, "time_embedding"):
        raise ConfigError(f"critic.step_embedding needs a network with a diffusers time embedding (UNet2DModel, "
                          f"UNet2DConditionModel); {type(network).__name__} has none: use critic.per_step")
    if getattr(network.time_embedding, "cond_proj", None) is not None:
        raise ConfigError("critic.step_embedding: this teacher's time embedding already takes a condition "
                          "(time_cond_proj_dim, e.g. an LCM UNet); use critic.per_step")
    add_time_condition(network, steps)


class StepConditionedCritic(Denoiser):
    """The shared critic ``inner`` as the critic of student step ``step`` of ``steps``: every call passes
    the step's one-hot code as ``cond.timestep_cond``, which reaches the time embedding through the
    projection :func:`add_step_input` added (zero at initialisation, so every step starts at ``inner``)."""

    def __init__(self, inner: Denoiser, step: int, steps: int):
        super().__init__(inner.network, inner.schedule, inner.prediction_type, timestep_scale=inner.timestep_scale)
        self.inner = inner
        self.code = torch.nn.functional.one_hot(torch.tensor(step), steps).to(torch.float64)

    @property
    def feature_module(self) -> nn.Module | None:
        return self.inner.feature_module

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        code = self.code.to(x_t.device).expand(len(x_t), -1)
        return self.inner.predict(x_t, t, replace(cond, timestep_cond=code))


def score_matching_weight(denoiser: Denoiser, t: torch.Tensor, weighting: str, sigma_data: float = 0.5
                          ) -> torch.Tensor:
    """Per-sample weight of ``‖x̂0 − x0‖²`` (float64); see the module docstring."""
    a, s = denoiser.schedule.alpha_sigma(t)
    snr = (a / s) ** 2
    extra = {"snr": 0.0, "karras": 1.0 / sigma_data**2, "snr_plus_one": 1.0}[weighting]
    return snr + extra


def score_matching_loss(critic: Denoiser, x0: torch.Tensor, cond: Conditioning, weighting: str,
                        generator: torch.Generator) -> torch.Tensor:
    """Denoising score matching of ``critic`` on the samples ``x0`` (detached): ``t`` uniform over the
    schedule, ``x_t = a·x0 + s·ε``, loss ``mean_b λ(t)·mean_CHW (D(x_t, t) − x0)²``."""
    x0 = x0.detach()
    schedule = critic.schedule
    u = torch.rand(len(x0), generator=generator, dtype=torch.float64)
    t = schedule.time_at_fraction(u).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    pred = critic(schedule.add_noise(x0, eps, t), t, cond, guidance_scale=1.0)
    weight = per_sample(score_matching_weight(critic, t, weighting), x0).flatten()
    return (weight.to(x0.dtype) * ((pred - x0) ** 2).flatten(1).mean(1)).mean()
