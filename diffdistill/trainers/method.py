"""What a distillation method declares, and the registry the CLI finds methods in.

A :class:`Method` owns its *roles* — the frozen ``teacher`` and trainable networks such as the
``student`` (and, for later methods, a ``fake_score`` critic or a ``discriminator``) — and tells the
generic loop (:mod:`diffdistill.trainers.loop`) three things: which roles are optimised (one optimizer
each), its *phases* (which role's optimizer steps, how many times, per training step), and the named
loss terms of a phase. The loop never knows which method it runs; a new method is one registered file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..config import option
from ..data import DataConfig
from ..denoiser import Conditioning, Denoiser
from ..errors import ConfigError
from ..pretrained import Pretrained
from .lora import LORA_TARGETS, add_lora, trainable_copy


@dataclass
class OptimConfig:
    """AdamW for one role, with linear warm-up then a constant, cosine or linear learning rate.

    ``decay_steps`` > 0 holds the rate constant and decays it over the run's last ``decay_steps`` steps only
    (warmup-stable-decay, Hu et al. 2024, MiniCPM §4): such a run's first steps are those of the constant
    run, so a constant run may be resumed into its decay (see ``loop._check_resume_config``).
    ``cycle_steps`` > 0 restarts the whole schedule (warm-up, hold, decay) every ``cycle_steps`` steps, so
    that "the run" above is one cycle: progressive distillation's official code anneals the rate linearly
    to zero within every round (Salimans & Ho 2022; ``learning_rate_anneal_steps = steps_per_iter``)."""

    lr: float = option(1e-4, min=0.0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = option(0.0, min=0.0)
    warmup_steps: int = option(0, min=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    decay_steps: int = option(0, min=0, help="schedule=cosine|linear: decay over the last N steps only; 0 = over all steps")
    cycle_steps: int = option(0, min=0, help="restart the schedule every N steps (progressive: steps_per_round); "
                                             "0 = one schedule over the run")


@dataclass
class TrainConfig:
    """The generic loop's settings (identical for every method)."""

    max_steps: int = option(1000, min=1)
    batch_size: int = option(64, min=1)
    grad_accum: int = option(1, min=1, help="micro-batches per optimizer step")
    grad_clip: float = option(1.0, min=0.0, help="max gradient norm per role; 0 = off")
    mixed_precision: Literal["no", "bf16"] = option("no", help="bf16 autocast; fp16 is not offered: it needs loss "
                                                         "scaling, which the loop does not do")
    gradient_checkpointing: bool = option(False, help="recompute the trained networks' activations in backward "
                                                      "(diffusers models that support it): less memory, more time")
    attention: Literal["auto", "sdpa", "xformers"] = option("auto", help="attention kernel of diffusers models: "
                                                             "xformers when installed and on a GPU (auto), else torch SDPA")
    shard_teacher: bool = option(False, help="multi-process runs: shard the frozen teacher's weights over the "
                                             "processes (FSDP2); on by itself under an accelerate FSDP launch")
    seed: int = 0
    ema_decays: list[float] = field(default_factory=lambda: [0.999])
    ema_rampup: float = option(0.05, min=0.0, help="EDM EMA ramp-up: half-life ≤ this × steps averaged; 0 = off")
    log_every: int = option(10, min=1)
    sample_every: int = option(500, min=0, help="sample grid PNG every N steps; 0 = off")
    checkpoint_every: int = option(500, min=1)
    keep_checkpoints: int = option(3, min=1)
    cpu: bool = option(False, help="train on the CPU even when a GPU is present")
    max_nonfinite_steps: int = option(10, min=1, help="stop after this many consecutive steps with a non-finite "
                                                      "loss or gradient (each such step is skipped and logged)")


@dataclass
class StudentArgs:
    """How the student is made from the teacher network: every weight trained (``lora_rank = 0``), or
    LoRA adapters on the frozen teacher weights (:mod:`.lora`; LCM-LoRA / DMD2's SDXL LoRA students)."""

    lora_rank: int = option(0, min=0, help="0: train every student weight; r > 0: train rank-r LoRA adapters only")
    lora_alpha: float = option(8.0, min=0.0, help="LoRA scale numerator: the update is (alpha/rank)·BA")
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class DistillConfig:
    """Sections every method shares; a method's config subclasses this and adds its own section."""

    method: str = ""
    teacher: str | None = option(None, help="diffusers pipeline dir or Hub id; None = the shipped digits teacher")
    guidance_scale: float = option(1.0, min=0.0, help="teacher CFG scale (in guidance_convention)")
    guidance_convention: Literal["standard", "delta"] = "standard"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentArgs = field(default_factory=StudentArgs)
    student_optim: OptimConfig = field(default_factory=OptimConfig)
    sample_steps: list[int] = field(default_factory=lambda: [1, 2, 4])


@dataclass
class Phase:
    """``repeat`` optimizer steps of role ``role`` (or of each role in a tuple, e.g. a critic and the GAN
    head it feeds) on the loss terms ``Method.loss(name, …)`` returns."""

    name: str
    role: str | tuple[str, ...]
    repeat: int = 1


class Method:
    """Base of every distillation method; see the module docstring.

    Subclasses set :attr:`name` and :attr:`config_class`, build their roles in ``__init__`` and implement
    :meth:`loss`. Randomness comes only from the ``generator`` argument, so runs resume bit-identically.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[DistillConfig]] = DistillConfig
    #: the student's few-step sampler: "sde" (denoise, re-noise) or "ode" (DDIM hop)
    student_sampler: ClassVar[str] = "sde"

    def __init__(self, cfg: DistillConfig, teacher: Pretrained):
        self.cfg = cfg
        self.teacher = teacher

    # --- roles --------------------------------------------------------------------------------
    #: whether ``student.lora_rank > 0`` is supported (a method that adds layers to its student says no)
    supports_lora_student: ClassVar[bool] = True

    def new_student(self, network: nn.Module | None = None) -> nn.Module:
        """A trainable student made from ``network`` (default: the teacher's) per ``cfg.student``: a float32
        deep copy, or LoRA adapters on ``network``'s own frozen weights."""
        network = self.teacher.network if network is None else network
        args = self.cfg.student
        if not args.lora_rank:
            return trainable_copy(network)
        if not self.supports_lora_student:
            raise ConfigError(f"{self.name} does not support LoRA students; set student.lora_rank=0")
        return add_lora(network, args.lora_rank, args.lora_alpha, args.lora_targets, "student", self.cfg.train.seed)

    def trainable_roles(self) -> dict[str, nn.Module]:
        """Roles with an optimizer, checkpointed; ``"student"`` also gets EMA copies."""
        raise NotImplementedError

    def buffer_roles(self) -> dict[str, nn.Module]:
        """Untrained networks whose state must survive a resume (e.g. a round's teacher, a target net)."""
        return {}

    def optim_config(self, role: str) -> OptimConfig:
        return self.cfg.student_optim

    def phases(self, step: int) -> list[Phase]:
        return [Phase("student", "student")]

    # --- the work ------------------------------------------------------------------------------
    def loss(self, phase: str, batch: tuple[torch.Tensor, Conditioning], step: int,
             generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Named loss terms of one micro-batch; ``"loss"`` is the one back-propagated."""
        raise NotImplementedError

    def after_step(self, step: int) -> bool:
        """Called once after every training step (all phases and EMA updates done); returning True
        restarts every EMA copy from the current student (e.g. when the student's task changes)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain Python state beyond the networks (a round counter, a curriculum position)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # --- sampling -------------------------------------------------------------------------------
    def student_denoiser(self, network: nn.Module) -> Denoiser:
        """The student (or one of its EMA copies) as a :class:`Denoiser`."""
        raise NotImplementedError

    def like_teacher(self, network: nn.Module) -> Denoiser:
        """``network`` (a copy of the teacher's) behind the teacher's adapter, schedule and prediction
        type, unguided."""
        from ..adapters import build_adapter

        den = self.teacher.denoiser
        return build_adapter(network, den.schedule, den.prediction_type, {"null_class": getattr(den, "null_class", None)},
                             timestep_scale=den.timestep_scale)

    def student_timesteps(self, num_steps: int) -> list[float]:
        """The native times the ``num_steps``-step student sampler visits (then clean data)."""
        return self.teacher.denoiser.schedule.grid(num_steps, "trailing")[:-1].tolist()


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method: <cls.name>`` in configs."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    from . import consistency, dmd, dmd2, ict, lcm, progressive, sid, vsd  # noqa: F401  (built-in methods)

    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method '{name}'{hint} (available: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def load_distill_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """Read a distillation config: its ``method`` key (or a ``method=…`` override) picks the config class."""
    import yaml

    from ..config import load_config

    method = next((o.split("=", 1)[1] for o in overrides if o.startswith("method=")), None)
    if method is None and path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f)
            method = raw.get("method") if isinstance(raw, dict) else None
        except (OSError, yaml.YAMLError):
            method = ""  # load_config below reports the file problem in one line
    if method is None:
        raise ConfigError(f"{path or 'the overrides'} name no method; add 'method: progressive' (or another: "
                          f"{', '.join(sorted(METHODS)) or 'see diffdistill/trainers'})")
    cls = get_method(method).config_class if method else DistillConfig
    return load_config(cls, path, overrides)
