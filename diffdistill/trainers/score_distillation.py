"""The shared machinery of the distribution-matching family (DMD, DMD2, VSD, SiD).

Roles: ``student`` (the few-step generator, initialised from the teacher), ``fake_score`` (the critic,
:mod:`.critic`), and with ``gan.enabled`` a ``discriminator`` head (:mod:`.gan`). One training step is one
generator update preceded by ``critic.updates`` critic updates (two time-scale updates, DMD2 §4.2; the
head trains in the critic's phase with its own optimizer and the critic's learning rate settings).

The student is a K-step generator over fixed times (``generator.student_steps``; the trailing K-step grid,
e.g. 999, 749, 499, 249 for K = 4, DMD2's SDXL list) sampled like LCM / DMD2: denoise, re-noise with
fresh noise. Each update trains one of its K steps, drawn uniformly. Its input at step i is a switch
(``generator.student_inputs``): ``"backward_simulation"`` (DMD2 §4.5: run the student's own chain from
pure noise for i steps, without gradient, so training sees what inference sees) or ``"noised_data"``
(noise real images to time ``t_i``, as DMD2's noisy-real baseline and FastGen's default). Conditions
(class labels, prompt embeddings) come from the data batch.
With ``critic.per_step`` each of the K steps has its own critic (:mod:`.critic`): an update draws its step
once (:meth:`ScoreDistillation.draw_step`), and that step's critic (and, with ``gan.features=critic``, its
features for the one shared head) is the only one it trains or queries; with ``critic.step_embedding`` the
one critic is queried and trained as step i's (:class:`~.critic.StepConditionedCritic`).

The generator update noises the sample to ``t`` uniform in ``[t_min_fraction, t_max_fraction]`` of the
schedule (:meth:`~diffdistill.schedules.NoiseSchedule.time_at_fraction`; DMD's 0.02–0.98), asks the
guided teacher and the critic for x0 there, and hands both to the method's pure loss
(:mod:`.distribution_matching`). Subclasses implement :meth:`ScoreDistillation.generator_terms` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..config import option
from ..denoiser import Conditioning, Denoiser
from ..samplers.base import renoise
from .critic import CriticArgs, StepConditionedCritic, add_step_input, build_critic_network, score_matching_loss
from .gan import (DiscriminatorHead, GANArgs, approx_r1_penalty, discriminator_loss, gan_noise, generator_loss,
                  r1_penalty, realism_logits)
from .method import DistillConfig, Method, OptimConfig, Phase


@dataclass
class GeneratorArgs:
    student_steps: int = option(1, min=1, help="K: the student's steps (trailing K-step grid)")
    student_inputs: Literal["backward_simulation", "noised_data"] = "backward_simulation"
    t_min_fraction: float = option(0.02, min=0.0, max=1.0, help="lowest noise level of the matching loss")
    t_max_fraction: float = option(0.98, min=0.0, max=1.0, help="highest noise level of the matching loss")

    def validate(self) -> None:
        if self.t_max_fraction < self.t_min_fraction:
            raise ValueError("generator.t_max_fraction must be at least generator.t_min_fraction")


@dataclass
class CriticSection(CriticArgs):
    updates: int = option(1, min=1, help="critic (and GAN head) updates per generator update (TTUR)")


@dataclass
class ScoreDistillConfig(DistillConfig):
    generator: GeneratorArgs = field(default_factory=GeneratorArgs)
    critic: CriticSection = field(default_factory=CriticSection)
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    gan: GANArgs = field(default_factory=GANArgs)


class ScoreDistillation(Method):
    """Base of the distribution-matching methods; see the module docstring."""

    config_class = ScoreDistillConfig
    student_sampler = "sde"
    #: data-free methods never read the batch's images
    uses_data: bool = True

    def __init__(self, cfg: ScoreDistillConfig, teacher):
        super().__init__(cfg, teacher)
        if not self.uses_data and cfg.generator.student_inputs == "noised_data":
            from ..errors import ConfigError

            raise ConfigError(f"{self.name} is data-free: generator.student_inputs must be backward_simulation")
        if not self.uses_data and cfg.gan.enabled:
            from ..errors import ConfigError

            raise ConfigError(f"{self.name} is data-free: a GAN needs real images; set gan.enabled=false")
        network = teacher.network
        self.student = self.new_student(network)
        critic_base = teacher.residual_critic_network() if cfg.critic.start == "exact_residual" else network
        critics = [build_critic_network(critic_base, cfg.critic, cfg.train.seed)
                   for _ in range(cfg.generator.student_steps if cfg.critic.per_step else 1)]
        self.critic = nn.ModuleList(critics) if len(critics) > 1 else critics[0]
        if cfg.critic.step_embedding:
            add_step_input(self.critic, cfg.generator.student_steps)
        self.head: DiscriminatorHead | None = None
        if cfg.gan.enabled:
            device = next(network.parameters()).device
            # a one-sample probe for the feature shape: class 0, or the empty prompt
            cond = (teacher.cycled_conditioning(1, [""]) or Conditioning()).to(device)
            with torch.random.fork_rng(devices=[]):  # the head's init depends on the run's seed only
                torch.manual_seed(cfg.train.seed)
                self.head = DiscriminatorHead.for_source(self.gan_source(), teacher.sample_shape, cond, device)
            self.head.to(device)
        self.timesteps = torch.tensor(self.student_timesteps(cfg.generator.student_steps), dtype=torch.float64)

    # --- roles --------------------------------------------------------------------------------
    def trainable_roles(self) -> dict[str, nn.Module]:
        roles = {"student": self.student, "fake_score": self.critic}
        return roles | ({"discriminator": self.head} if self.head is not None else {})

    def optim_config(self, role: str) -> OptimConfig:
        return self.cfg.student_optim if role == "student" else self.cfg.critic_optim

    def phases(self, step: int) -> list[Phase]:
        critic_roles = ("fake_score", "discriminator") if self.head is not None else "fake_score"
        return [Phase("critic", critic_roles, repeat=self.cfg.critic.updates), Phase("generator", "student")]

    def student_denoiser(self, network: nn.Module) -> Denoiser:
        return self.like_teacher(network)

    def critic_denoiser(self, step: int = 0) -> Denoiser:
        """The critic of the student's step ``step``: the one shared critic, step ``step``'s own
        (``critic.per_step``) or the shared one told the step (``critic.step_embedding``)."""
        if isinstance(self.critic, nn.ModuleList):
            return self.like_teacher(self.critic[step])
        critic = self.like_teacher(self.critic)
        if self.cfg.critic.step_embedding:
            return StepConditionedCritic(critic, step, self.cfg.generator.student_steps)
        return critic

    def gan_source(self, step: int = 0) -> Denoiser:
        """Where the GAN head reads features (``gan.features``)."""
        return self.critic_denoiser(step) if self.cfg.gan.features == "critic" else self.teacher.denoiser

    # --- the student's samples -------------------------------------------------------------------
    def draw_step(self, generator: torch.Generator) -> int:
        """The student step (0 … K−1) one update trains, uniform."""
        return int(torch.randint(len(self.timesteps), (), generator=generator))

    def sample_student(self, batch: tuple[torch.Tensor, Conditioning], generator: torch.Generator, *,
                       grad: bool, step: int | None = None) -> tuple[torch.Tensor, Conditioning]:
        """One student sample per batch element at its step ``step`` (default: :meth:`draw_step`), see the
        module docstring."""
        x_real, cond = batch
        student, ts = self.student_denoiser(self.student), self.timesteps
        i = self.draw_step(generator) if step is None else step
        schedule = student.schedule
        if self.cfg.generator.student_inputs == "noised_data" and i > 0:
            eps = torch.randn(x_real.shape, generator=generator, dtype=x_real.dtype).to(x_real.device)
            x = schedule.add_noise(x_real, eps, ts[i].expand(len(x_real)))
        else:
            x = schedule.prior_sample(tuple(x_real.shape), generator=generator).to(x_real.device)
            with torch.no_grad():
                for j in range(i):
                    x = renoise(student, student(x, ts[j], cond, guidance_scale=1.0), ts[j + 1], generator)
        with torch.set_grad_enabled(grad):
            return student(x, ts[i], cond, guidance_scale=1.0), cond

    def matching_time(self, n: int, generator: torch.Generator) -> torch.Tensor:
        g = self.cfg.generator
        u = g.t_min_fraction + (g.t_max_fraction - g.t_min_fraction) * torch.rand(n, generator=generator,
                                                                                dtype=torch.float64)
        return self.teacher.denoiser.schedule.time_at_fraction(u)

    # --- the work ------------------------------------------------------------------------------
    def loss(self, phase, batch, step, generator) -> dict[str, torch.Tensor]:
        return self.critic_terms(batch, generator) if phase == "critic" else self.generator_step(batch, generator)

    def critic_terms(self, batch, generator) -> dict[str, torch.Tensor]:
        step = self.draw_step(generator)
        x, cond = self.sample_student(batch, generator, grad=False, step=step)
        dsm = score_matching_loss(self.critic_denoiser(step), x, cond, self.cfg.critic.weighting, generator)
        terms = {"score_matching": dsm}
        loss = dsm
        if self.head is not None:
            gan, source, (x_real, cond_real) = self.cfg.gan, self.gan_source(step), batch
            real = realism_logits(source, self.head, x_real, cond_real,
                                  *gan_noise(source.schedule, x_real, gan.max_time_fraction, generator))
            fake = realism_logits(source, self.head, x, cond,
                                  *gan_noise(source.schedule, x, gan.max_time_fraction, generator))
            terms["gan_discriminator"] = d = discriminator_loss(real, fake)
            # the head's mean verdicts: both near 0.5 (loss near 2·ln 2) means it cannot tell them apart
            terms["real_realism"] = torch.sigmoid(real).mean().detach()
            terms["fake_realism"] = torch.sigmoid(fake).mean().detach()
            loss = loss + gan.discriminator_weight * d
            if gan.penalty != "none":
                t, eps = gan_noise(source.schedule, x_real, gan.max_time_fraction, generator)

                def logits_of(inp):
                    return realism_logits(source, self.head, inp, cond_real, t, eps)

                terms["gan_penalty"] = p = (r1_penalty(logits_of, x_real) if gan.penalty == "r1" else
                                            approx_r1_penalty(logits_of, x_real, gan.approx_r1_sigma, generator))
                loss = loss + gan.penalty_weight * gan.discriminator_weight * p
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}

    def generator_step(self, batch, generator) -> dict[str, torch.Tensor]:
        step = self.draw_step(generator)
        x, cond = self.sample_student(batch, generator, grad=True, step=step)
        t = self.matching_time(len(x), generator).to(x.device)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        terms = self.generator_terms(x, t, eps, cond, batch, generator, step)
        loss = terms["loss"]
        if self.head is not None:
            gan, source = self.cfg.gan, self.gan_source(step)
            fake = realism_logits(source, self.head, x, cond, *gan_noise(source.schedule, x, gan.max_time_fraction,
                                                                         generator))
            terms["gan_generator"] = g = generator_loss(fake)
            loss = loss + gan.generator_weight * g
        return {**{k: v.detach() for k, v in terms.items()}, "loss": loss}

    def score_predictions(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond: Conditioning,
                          step: int = 0, *, through: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x̂_real, x̂_fake)`` at ``x_t = a·x + s·ε``: the guided teacher's and step ``step``'s critic's x0.
        Without gradient (DMD, VSD: their losses use them as constants), or with ``through=True`` keeping the
        graph from both outputs back to ``x`` (SiD)."""
        x_t = self.teacher.denoiser.schedule.add_noise(x if through else x.detach(), eps, t)
        with torch.set_grad_enabled(through and torch.is_grad_enabled()):
            return self.teacher.denoiser(x_t, t, cond), self.critic_denoiser(step)(x_t, t, cond, guidance_scale=1.0)

    def generator_terms(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond: Conditioning,
                        batch, generator: torch.Generator, step: int = 0) -> dict[str, torch.Tensor]:
        """The method's generator loss terms for student samples ``x`` (with graph) made at the student's step
        ``step``, noised at ``t`` with ``eps``; ``"loss"`` is back-propagated."""
        raise NotImplementedError
