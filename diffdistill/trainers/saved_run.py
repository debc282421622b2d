"""A distillation run directory opened for use rather than training: its resolved config, its method
(teacher loaded), and the student of one verified checkpoint, raw or EMA. Evaluation and export read
runs through this, so they see the student exactly as training left it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..denoiser import Denoiser
from ..errors import ConfigError, DiffDistillError
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, load_network_state, verify_checkpoint
from .loop import CONFIG_FILE, build_method
from .method import DistillConfig, Method, load_distill_config


def ema_choice(raw: bool, decay: float | None) -> bool | float:
    """A command line's "raw weights" flag and ``--ema-decay`` as :meth:`SavedRun.student_network`'s ``ema``."""
    if decay is None:
        return not raw
    if raw:
        raise ConfigError("the raw weights and --ema-decay contradict each other; pass one")
    return decay


class SavedRun:
    """``run_dir`` with the student of ``checkpoint`` (default: the newest one that verifies) loaded."""

    def __init__(self, run_dir: str | Path, checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.run_dir = Path(run_dir)
        if not (self.run_dir / CONFIG_FILE).is_file():
            raise DiffDistillError(f"{self.run_dir} is not a diffdistill run (no {CONFIG_FILE}); make one with "
                                   "`diffdistill distill --config ... --output DIR`")
        self.cfg: DistillConfig = load_distill_config(str(self.run_dir / CONFIG_FILE))
        if not list_checkpoints(self.run_dir):
            raise DiffDistillError(f"run {self.run_dir} has no checkpoint yet; train it further (or lower "
                                   "train.checkpoint_every) before evaluating or exporting it")
        self.method: Method = build_method(self.cfg, device)
        self.load(checkpoint)

    @property
    def default_steps(self) -> int:
        """The step count the student was trained for (``generator.student_steps``), else the largest of
        the run's ``sample_steps``."""
        trained = getattr(getattr(self.cfg, "generator", None), "student_steps", None)
        return int(trained or max(self.cfg.sample_steps))

    def checkpoints(self) -> list[Path]:
        """The run's complete checkpoints, oldest first."""
        return list_checkpoints(self.run_dir)

    def load(self, checkpoint: str | Path | None = None) -> None:
        """Switch to ``checkpoint`` (a path or a ``step_XXXXXXX`` name; default the newest verified one)."""
        if checkpoint is None:
            path = latest_checkpoint(self.run_dir)
            if path is None:
                raise DiffDistillError(f"no checkpoint of {self.run_dir} matches its manifest; the run's files are "
                                       "damaged, retrain or restore them")
        else:
            path = Path(checkpoint)
            if not path.is_dir():
                path = self.run_dir / "checkpoints" / str(checkpoint)
            if not verify_checkpoint(path):
                raise DiffDistillError(f"checkpoint {checkpoint} of {self.run_dir} is missing or corrupt; its "
                                       f"checkpoints are {[p.name for p in self.checkpoints()]}")
        self.networks, state = load_checkpoint(path)
        self.method.load_state_dict(state["method"])
        self.checkpoint, self.step = path, int(state["step"])

    def student_network(self, ema: bool | float = True) -> tuple[nn.Module, str]:
        """The student network with this checkpoint's weights, and which weights they are. ``ema``: True for
        the first EMA copy (``ema_0.999`` for the first of ``train.ema_decays``; the raw ``student`` weights
        when the run keeps none), False for the raw weights, or a decay to pick one of several EMA copies.
        The weights are loaded in place into the method's one student module: a later call (or
        :meth:`load`) changes what an earlier returned network holds."""
        stem = self.weights_name(ema)
        network = self.method.trainable_roles()["student"]
        load_network_state(network, self.networks[stem], self.method.teacher.denoiser,
                           f"checkpoint {self.checkpoint}: '{stem}' weights")
        return network.eval(), stem

    def weights_name(self, ema: bool | float = True) -> str:
        """The checkpoint file stem :meth:`student_network` loads for ``ema``."""
        decays = [float(d) for d in self.cfg.train.ema_decays]
        if isinstance(ema, bool):
            return f"ema_{decays[0]:g}" if ema and decays else "student"
        if float(ema) not in decays:
            raise DiffDistillError(f"run {self.run_dir} keeps no EMA copy at decay {float(ema):g}; it keeps "
                                   f"{', '.join(f'{d:g}' for d in decays) or 'none'} (train.ema_decays)")
        return f"ema_{float(ema):g}"

    def student(self, ema: bool | float = True) -> Denoiser:
        """The student as a :class:`Denoiser` (see :meth:`student_network`)."""
        return self.method.student_denoiser(self.student_network(ema)[0])
