"""Small :class:`~diffdistill.denoiser.Denoiser` adapters for diffusers networks.

One subclass per network family, registered by the diffusers class name it wraps:

* :class:`UNet2DDenoiser` — ``UNet2DModel``, unconditional or class-conditional (the last class
  embedding index is the "null" class when the model was trained with label dropout);
* :class:`UNet2DConditionDenoiser` — ``UNet2DConditionModel`` on text embeddings (Stable Diffusion);
* :class:`DiTDenoiser` — ``DiTTransformer2DModel`` on class labels (null class = ``num_embeds_ada_norm``;
  a learned-variance output is cut to its mean half, as diffusers' ``DiTPipeline`` does).

Each exposes its bottleneck as :attr:`Denoiser.feature_module` for GAN heads; features are read with
a forward hook, never by replacing the diffusers forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .denoiser import Conditioning, Denoiser
from .errors import DiffDistillError
from .schedules import NoiseSchedule

ADAPTERS: dict[str, type["DiffusersDenoiser"]] = {}


def register_adapter(class_name: str) -> Callable[[type["DiffusersDenoiser"]], type["DiffusersDenoiser"]]:
    """Class decorator: use this adapter for diffusers models named ``class_name``."""
    def deco(cls: type["DiffusersDenoiser"]) -> type["DiffusersDenoiser"]:
        ADAPTERS[class_name] = cls
        return cls
    return deco


def adapter_for(network: nn.Module) -> type["DiffusersDenoiser"]:
    """The registered adapter class for ``network``'s diffusers class."""
    name = type(network).__name__
    if name not in ADAPTERS:
        raise DiffDistillError(f"no denoiser adapter for diffusers model class {name}; "
                               f"supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]


class DiffusersDenoiser(Denoiser):
    """Base of the diffusers adapters: runs the network in its own dtype, returns ``x_t``'s dtype.

    ``null_class``: the class index that means "no class" (for CFG), or ``None`` if the network has none.
    """

    def __init__(self, network: nn.Module, schedule: NoiseSchedule, prediction_type: str, *,
                 null_class: int | None = None, guidance_scale: float = 1.0, timestep_scale: float = 1.0):
        super().__init__(network, schedule, prediction_type, guidance_scale, timestep_scale)
        self.null_class = null_class

    @property
    def net_dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def _inputs(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_t.to(self.net_dtype), self.model_time(t).to(device=x_t.device, dtype=torch.float32)

    def _null_labels(self, cond: Conditioning) -> Conditioning:
        if self.null_class is None or cond.class_labels is None:
            return super().null_condition(cond)
        return Conditioning(class_labels=torch.full_like(cond.class_labels, self.null_class),
                            timestep_cond=cond.timestep_cond)

    def null_condition(self, cond: Conditioning) -> Conditioning:
        return self._null_labels(cond)


def add_time_condition(network: nn.Module, dim: int) -> None:
    """Give ``network.time_embedding`` a zero-initialised ``cond_proj`` (``dim`` → time channels), the input
    diffusers' ``TimestepEmbedding`` adds to the timestep features (LCM's guidance-scale embedding, Luo et al.
    2023). Zero init keeps the network's outputs unchanged until training moves it."""
    te = network.time_embedding
    if getattr(te, "cond_proj", None) is None:
        te.cond_proj = nn.Linear(dim, te.linear_1.in_features, bias=False).to(te.linear_1.weight)
        nn.init.zeros_(te.cond_proj.weight)
    if "time_cond_proj_dim" in network.config:  # UNet2DConditionModel records it, so save/load round-trips
        network.register_to_config(time_cond_proj_dim=dim)


@contextmanager
def time_condition(network: nn.Module, condition: torch.Tensor | None) -> Iterator[None]:
    """Feed ``condition`` to ``network.time_embedding`` for the calls inside the block.

    ``UNet2DModel.forward`` has no ``timestep_cond`` argument; a forward pre-hook (a public PyTorch API)
    passes it to the ``TimestepEmbedding`` call instead of replacing the diffusers forward.
    """
    if condition is None:
        yield
        return
    if getattr(network.time_embedding, "cond_proj", None) is None:
        raise DiffDistillError("this network has no time-condition input; call add_time_condition first")

    def hook(_module, args, kwargs):
        return args, {**kwargs, "condition": condition.to(network.time_embedding.cond_proj.weight)}

    handle = network.time_embedding.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@register_adapter("UNet2DModel")
class UNet2DDenoiser(DiffusersDenoiser):
    """``UNet2DModel(sample, timestep, class_labels)``; features: the mid block's output. A
    ``cond.timestep_cond`` reaches the time embedding through :func:`time_condition`."""

    @property
    def feature_module(self) -> nn.Module | None:
        return self.network.mid_block

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x, tt = self._inputs(x_t, t)
        labels = cond.class_labels
        if labels is None and self.network.config.num_class_embeds is not None:
            if self.null_class is None:
                raise DiffDistillError("this UNet2DModel is class-conditional: pass class labels")
            labels = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        with time_condition(self.network, cond.timestep_cond):
            return self.network(x, tt, class_labels=labels).sample


@register_adapter("UNet2DConditionModel")
class UNet2DConditionDenoiser(DiffusersDenoiser):
    """``UNet2DConditionModel(sample, timestep, encoder_hidden_states)``; features: the mid block's output.

    CFG's unconditional branch uses ``cond.uncond_encoder_hidden_states`` (empty / negative prompt).
    """

    @property
    def feature_module(self) -> nn.Module | None:
        return self.network.mid_block

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if cond.encoder_hidden_states is None:
            raise DiffDistillError("this teacher is text-conditioned: pass prompts (encoder_hidden_states)")
        x, tt = self._inputs(x_t, t)
        return self.network(x, tt, encoder_hidden_states=cond.encoder_hidden_states.to(self.net_dtype),
                            class_labels=cond.class_labels,
                            timestep_cond=None if cond.timestep_cond is None else cond.timestep_cond.to(self.net_dtype)
                            ).sample

    def null_condition(self, cond: Conditioning) -> Conditioning:
        if cond.uncond_encoder_hidden_states is None:
            raise DiffDistillError("classifier-free guidance on a text-conditioned teacher needs the "
                                   "empty-prompt embeddings (uncond_encoder_hidden_states)")
        return Conditioning(encoder_hidden_states=cond.uncond_encoder_hidden_states,
                            uncond_encoder_hidden_states=cond.uncond_encoder_hidden_states,
                            class_labels=cond.class_labels, timestep_cond=cond.timestep_cond)


@register_adapter("DiTTransformer2DModel")
class DiTDenoiser(DiffusersDenoiser):
    """``DiTTransformer2DModel(hidden_states, timestep, class_labels)``; features: the middle block."""

    @property
    def feature_module(self) -> nn.Module | None:
        blocks = self.network.transformer_blocks
        return blocks[len(blocks) // 2]

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if cond.class_labels is None:
            raise DiffDistillError("DiT is class-conditional: pass class labels")
        x, tt = self._inputs(x_t, t)
        out = self.network(x, timestep=tt, class_labels=cond.class_labels).sample
        channels = x.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out


def build_adapter(network: nn.Module, schedule: NoiseSchedule, prediction_type: str,
                  meta: dict[str, Any] | None = None, **kwargs: Any) -> DiffusersDenoiser:
    """Wrap a diffusers ``network`` in its registered adapter.

    ``meta`` (a teacher directory's ``diffdistill.json``) may give ``null_class`` and ``guidance_scale``.
    DiT's null class defaults to its ``num_embeds_ada_norm``.
    """
    meta = meta or {}
    null_class = meta.get("null_class")
    if null_class is None and type(network).__name__ == "DiTTransformer2DModel":
        null_class = network.config.num_embeds_ada_norm
    kwargs.setdefault("guidance_scale", meta.get("guidance_scale", 1.0))
    return adapter_for(network)(network, schedule, prediction_type, null_class=null_class, **kwargs)
