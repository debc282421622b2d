"""The denoiser interface every teacher, student and critic answers through.

A :class:`Denoiser` wraps a network together with its :class:`~diffdistill.schedules.NoiseSchedule` and
the kind of prediction the network makes, and answers ``x0`` (or ``eps`` / ``v`` / ``flow``) for
``(x_t, t, cond)``. Losses and samplers only ever see this interface (EDM's ``D(x; σ)``, in the
schedule's native time). Subclasses implement :meth:`Denoiser.predict` (the raw network call) and
:meth:`Denoiser.null_condition` (the unconditional input for classifier-free guidance).

Classifier-free guidance (Ho & Salimans 2022) — one convention inside the code, the *standard* one::

    x0_cfg = x0_u + w · (x0_c − x0_u)          w = 1: no guidance, w = 0: unconditional

Guidance is applied to the network's native prediction; because every conversion between x0, eps, v
and flow is affine in the prediction at fixed ``(x_t, t)``, this equals guidance on x0 exactly. Code
bases that write ``x0_c + g · (x0_c − x0_u)`` use ``g = w − 1``; configs name their convention and
:func:`standard_guidance_scale` converts at the config boundary.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Iterator, Literal

import torch
from torch import nn

from .errors import DiffDistillError
from .schedules import NoiseSchedule, broadcast_to, canonical_prediction, convert_prediction

GuidanceConvention = Literal["standard", "delta"]


def standard_guidance_scale(scale: float, convention: GuidanceConvention = "standard") -> float:
    """Convert a guidance scale to the standard convention ``x0_u + w·(x0_c − x0_u)``.

    ``"standard"``: the scale is already ``w`` (diffusers' pipelines' ``guidance_scale``, the official DMD2
    code's ``real_guidance_scale``, FastGen's ``guidance_scale``).
    ``"delta"``: the scale ``g`` multiplies the extra push in ``x0_c + g·(x0_c − x0_u)``, so ``w = g + 1``
    (the LCM paper's ω and the diffusers LCM training script's ``w``).
    """
    if convention == "standard":
        return float(scale)
    if convention == "delta":
        return float(scale) + 1.0
    raise ValueError(f"unknown guidance convention {convention!r}; use 'standard' or 'delta'")


@dataclass
class Conditioning:
    """What a denoiser is conditioned on; every field is batched along dim 0 (or ``None``).

    ``class_labels``: integer classes (class-conditional UNets, DiT). ``encoder_hidden_states``: text
    embeddings; ``uncond_encoder_hidden_states``: the embeddings of the empty / negative prompt, used as
    the unconditional branch of classifier-free guidance. ``timestep_cond``: an extra embedding added to
    the time embedding (LCM's guidance-scale embedding).
    """

    class_labels: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    uncond_encoder_hidden_states: torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None

    def map(self, fn) -> "Conditioning":
        """Apply ``fn`` to every tensor field."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def to(self, device: torch.device | str) -> "Conditioning":
        return self.map(lambda v: v.to(device))

    def __getitem__(self, index) -> "Conditioning":
        return self.map(lambda v: v[index])

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """Concatenate conditionings with the same fields along the batch."""
        first = parts[0]
        return replace(first, **{f.name: torch.cat([getattr(p, f.name) for p in parts])
                                 for f in fields(first) if getattr(first, f.name) is not None})


class Denoiser(nn.Module):
    """``D(x_t, t, cond)``: a network, its noise schedule and its prediction type.

    Args:
        network: the wrapped ``nn.Module`` (``None`` for analytic denoisers).
        schedule: the forward process ``x_t = a(t)·x0 + s(t)·eps`` and its native time axis.
        prediction_type: what :meth:`predict` returns (``x0``/``eps``/``v``/``flow`` or diffusers' names).
        guidance_scale: default CFG scale ``w`` (standard convention) used when a call passes none.
        timestep_scale: the network receives ``t · timestep_scale`` (1 for VP timesteps, 1000 for
            diffusers' flow transformers, which take ``σ·1000``).
    """

    #: submodule whose output :meth:`denoise_with_features` returns (the bottleneck), or None
    feature_module: nn.Module | None = None
    #: True where ``guidance_scale`` is a network input (LCM's embedded ``w``), not classifier-free guidance
    embeds_guidance: bool = False

    def __init__(self, network: nn.Module | None, schedule: NoiseSchedule, prediction_type: str,
                 guidance_scale: float = 1.0, timestep_scale: float = 1.0):
        super().__init__()
        self.network = network
        self.schedule = schedule
        self.prediction_type = canonical_prediction(prediction_type)
        self.guidance_scale = float(guidance_scale)
        self.timestep_scale = float(timestep_scale)

    # --- what subclasses implement -------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The raw prediction of type ``self.prediction_type`` (no guidance)."""
        raise NotImplementedError

    def null_condition(self, cond: Conditioning) -> Conditioning:
        """The unconditional counterpart of ``cond`` for classifier-free guidance."""
        raise DiffDistillError(f"{type(self).__name__} has no unconditional input; "
                               "classifier-free guidance needs guidance_scale=1")

    # --- the interface -------------------------------------------------------------------------
    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network is fed for native time ``t``."""
        return t * self.timestep_scale if self.timestep_scale != 1.0 else t

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Conditioning | None = None, *,
                guidance_scale: float | torch.Tensor | None = None, output: str = "x0") -> torch.Tensor:
        """Prediction of kind ``output`` at ``(x_t, t)``, with CFG scale ``w`` (standard convention).

        ``t`` is a scalar or a ``(B,)`` tensor of native times; ``guidance_scale`` a float or a ``(B,)``
        tensor of per-sample scales (LCM); the result has ``x_t``'s dtype.
        """
        t = self._batch_times(t, x_t)
        cond = cond if cond is not None else Conditioning()
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        if not torch.is_tensor(w) and float(w) == 1.0:
            raw = self.predict(x_t, t, cond)
        else:
            both = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                Conditioning.cat([self.null_condition(cond), cond]))
            uncond, condi = both.chunk(2)
            raw = uncond + broadcast_to(w, uncond).to(uncond.dtype) * (condi - uncond)
        a, s = self.schedule.alpha_sigma(t)
        return convert_prediction(raw.to(x_t.dtype), self.prediction_type, output, x_t, a, s)

    def denoise_with_features(self, x_t: torch.Tensor, t: torch.Tensor | float,
                              cond: Conditioning | None = None, *, output: str = "x0"
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One unguided pass returning ``(prediction, bottleneck features)``.

        Features are read with a forward hook on :attr:`feature_module` (a public PyTorch API), so the
        diffusers forward itself is never replaced.
        """
        if self.feature_module is None:
            raise DiffDistillError(f"{type(self).__name__} exposes no intermediate features")
        with capture_output(self.feature_module) as captured:
            pred = self.forward(x_t, t, cond, guidance_scale=1.0, output=output)
        return pred, captured[0]

    def features(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Conditioning | None = None
                 ) -> torch.Tensor:
        """The bottleneck features alone: the forward stops once :attr:`feature_module` has run, so the
        rest of the network (a UNet's decoder) costs nothing — what DMD2's GAN reads ("return_bottleneck").

        The stop is an exception raised by a forward hook and caught here; the network's code is untouched
        and the autograd graph up to the features is kept.
        """
        if self.feature_module is None:
            raise DiffDistillError(f"{type(self).__name__} exposes no intermediate features")

        def stop(_module, _inputs, out):
            raise _FeaturesReady(out[0] if isinstance(out, tuple) else out)

        handle = self.feature_module.register_forward_hook(stop)
        try:
            self.predict(x_t, self._batch_times(t, x_t), cond if cond is not None else Conditioning())
        except _FeaturesReady as ready:
            return ready.features
        finally:
            handle.remove()
        raise DiffDistillError(f"{type(self).__name__}: the feature module did not run")

    @staticmethod
    def _batch_times(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        return t.expand(x.shape[0]).clone() if t.ndim == 0 else t


class _FeaturesReady(Exception):
    """Carries the bottleneck features out of a forward pass stopped early (see :meth:`Denoiser.features`)."""

    def __init__(self, features: torch.Tensor):
        super().__init__("features ready")
        self.features = features


@contextmanager
def capture_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of ``module`` (first element if it returns a tuple) while the block runs."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, out):
        captured.append(out[0] if isinstance(out, tuple) else out)

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
