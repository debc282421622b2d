"""Loading teachers from a local diffusers pipeline directory or a Hugging Face Hub id.

A teacher is a diffusers pipeline directory: ``model_index.json``, the denoising network under
``unet/`` or ``transformer/``, its ``scheduler/``, for latent models a ``vae/``, and for text-conditioned
models a ``text_encoder/`` and ``tokenizer/`` (transformers classes, e.g. CLIP's). diffdistill adds
an optional ``diffdistill.json`` with what diffusers does not record (number of classes, the null
class used for classifier-free guidance, a default guidance scale, image size). Weights are only read
from safetensors files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from .adapters import ADAPTERS, DiffusersDenoiser, build_adapter
from .errors import ModelLoadError
from .schedules import FlowSchedule, NoiseSchedule, VPSchedule

if TYPE_CHECKING:
    from .denoiser import Conditioning

META_FILE = "diffdistill.json"
DENOISER_COMPONENTS = ("unet", "transformer")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # owner/name[@revision]


def cycled(items: Sequence[Any], num: int) -> list[Any]:
    """``num`` items: ``items`` repeated in order (item ``i`` is ``items[i % len(items)]``)."""
    return [items[i % len(items)] for i in range(num)]


def cache_root() -> Path:
    """Where diffdistill caches what it computes once (``$DIFFDISTILL_CACHE``, else ``~/.cache/diffdistill``)."""
    return Path(os.environ.get("DIFFDISTILL_CACHE") or Path.home() / ".cache" / "diffdistill")


def cached_tensors(path: Path, make: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors in the safetensors file ``path``; when it is missing, ``make()``'s, written there first
    (through a temporary file and a rename, so processes that race here never read a partial file)."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    if path.is_file():
        return load_file(path)
    tensors = {k: v.detach().contiguous() for k, v in make().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return tensors


def shipped_teacher_path() -> Path:
    """The digits teacher that ships inside the package."""
    return Path(str(resources.files("diffdistill") / "assets" / "digits_teacher"))


@dataclass
class Pretrained:
    """A loaded teacher: its denoiser, an optional VAE (latent models) and its metadata."""

    denoiser: DiffusersDenoiser
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    #: what students and critics start from when the denoiser has no network (analytic teachers)
    init_network: nn.Module | None = None

    @property
    def network(self) -> nn.Module:
        """The network students and critics are copied from."""
        return self.init_network if self.init_network is not None else self.denoiser.network

    def residual_critic_network(self) -> nn.Module:
        """An analytic teacher's exact denoiser plus a zero learned correction (``critic.start: exact_residual``)."""
        if "analytic" not in self.meta:
            from .errors import ConfigError

            raise ConfigError(f"critic.start=exact_residual needs an analytic teacher (analytic:NAME), not {self.path}; "
                              "a critic copied from a real teacher already starts as that teacher")
        from .toy import residual_critic_network

        return residual_critic_network(self.meta["analytic"])

    @property
    def num_classes(self) -> int:
        """Classes the teacher is conditioned on: ``diffdistill.json``, else DiT's label count, else 0."""
        if "num_classes" in self.meta:
            return int(self.meta["num_classes"] or 0)
        return int(getattr(self.denoiser.network.config, "num_embeds_ada_norm", None) or 0)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the denoiser generates (latents for latent models)."""
        if "sample_shape" in self.meta:
            return tuple(self.meta["sample_shape"])
        cfg = self.denoiser.network.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
        return (cfg.in_channels, *size)

    @torch.no_grad()
    def check_images_fit(self, channels: int, resolution: int, source: str = "data") -> None:
        """Refuse, in one line, ``channels`` × ``resolution``² images the teacher cannot take: a channel
        count its network (or VAE) does not have, or a size it cannot denoise (one probe forward of a
        zero image through the VAE and the denoiser)."""
        from .errors import ConfigError

        if len(self.sample_shape) != 3:  # not images (analytic 2-D mixtures)
            return
        takes = self.vae.config.in_channels if self.vae is not None else self.sample_shape[0]
        if channels != takes:
            raise ConfigError(f"the {source} has {channels}-channel images but the teacher takes {takes}-channel "
                              f"ones; set {source}.channels={takes} (or use images with {takes} channels)")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        native = self.sample_shape[-1] * factor
        device = next(self.network.parameters()).device
        x = torch.zeros(1, channels, resolution, resolution, device=device)
        t = self.denoiser.schedule.time_at_fraction(torch.tensor([0.5], dtype=torch.float64)).to(device)
        try:
            z = self.encode(x)
            cond = self.cycled_conditioning(1, [""])
            out = self.denoiser(z, t, cond.to(device) if cond is not None else None)
            if out.shape != z.shape:
                raise RuntimeError(f"it returned shape {tuple(out.shape)} for input {tuple(z.shape)}")
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            reason = (str(exc).strip().splitlines() or ["shape error"])[0][:160]
            raise ConfigError(f"the teacher cannot take {resolution}x{resolution} images ({reason}); its own "
                              f"resolution is {native}: set {source}.resolution={native}") from exc

    @property
    def text_conditioned(self) -> bool:
        """True when the denoiser cross-attends to text embeddings (it needs prompts to sample)."""
        return bool(getattr(getattr(self.denoiser.network, "config", None), "cross_attention_dim", None))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompt: str = "") -> "Conditioning":
        """Text conditioning for ``prompts``: the text encoder's last hidden states, and those of
        ``negative_prompt`` as the unconditional branch of classifier-free guidance (diffusers'
        ``encode_prompt``: pad to the tokenizer's max length, truncate)."""
        from .denoiser import Conditioning
        from .errors import DataError

        if self.text_encoder is None or self.tokenizer is None:
            raise DataError(f"{self.path} has no text_encoder/tokenizer; a text-conditioned teacher directory "
                            "needs both to turn prompts into embeddings")
        device = next(self.text_encoder.parameters()).device
        unique = sorted(set(prompts) | {negative_prompt})
        tokens = self.tokenizer(unique, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        states = self.text_encoder(tokens.input_ids.to(device))[0]
        index = torch.tensor([unique.index(p) for p in prompts], device=device)
        uncond = states[unique.index(negative_prompt)].expand(len(prompts), *states.shape[1:])
        return Conditioning(encoder_hidden_states=states[index], uncond_encoder_hidden_states=uncond.contiguous())

    def cycled_conditioning(self, num: int, prompts: Sequence[str] | None = None) -> "Conditioning | None":
        """Conditioning for ``num`` samples that every sampling path shares (evaluation, sample grids,
        export grids, probes): class labels cycling ``0 … C−1`` (balanced classes), the ``prompts`` cycled
        in order for a text-conditioned model, or None for an unconditional one."""
        from .denoiser import Conditioning
        from .errors import DataError

        if self.text_conditioned:
            if not prompts:
                raise DataError("this model is text-conditioned: give --prompts FILE (one prompt per line) to sample it")
            return self.encode_prompts(cycled(prompts, num))
        if self.num_classes:
            return Conditioning(class_labels=torch.arange(num) % self.num_classes)
        return None

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → latents (the VAE posterior's mode, times its scaling factor; identity for
        pixel-space teachers)."""
        if self.vae is None:
            return images
        scale = getattr(self.vae.config, "scaling_factor", 1.0)
        return (self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode() * scale).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1] (identity for pixel-space teachers)."""
        if self.vae is None:
            return latents
        scale = getattr(self.vae.config, "scaling_factor", 1.0)
        return self.vae.decode(latents.to(self.vae.dtype) / scale).sample.to(latents.dtype)


def resolve_pretrained(source: str | Path) -> Path:
    """A local directory for ``source``: an existing path, or a Hub id downloaded (or found in the cache).

    A Hub id that cannot be reached raises one :class:`ModelLoadError` naming the id and how to supply it.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"teacher path {path} is a file; pass a diffusers pipeline directory")
        return path
    if not HUB_ID.match(str(source)):
        raise ModelLoadError(f"teacher path {path} does not exist; pass a diffusers pipeline directory or a "
                             "Hub id such as 'google/ddpm-cifar10-32' (optionally 'owner/name@revision')")
    from huggingface_hub import snapshot_download

    repo_id, _, revision = str(source).partition("@")
    # configs plus the default (non-variant) safetensors weights, sharded or not
    patterns = ["model_index.json", META_FILE, "scheduler/*"]
    for c in (*DENOISER_COMPONENTS, "vae"):
        patterns += [f"{c}/config.json", f"{c}/diffusion_pytorch_model.safetensors",
                     f"{c}/diffusion_pytorch_model.safetensors.index.json", f"{c}/diffusion_pytorch_model-*.safetensors"]
    patterns += ["tokenizer/*", "text_encoder/config.json", "text_encoder/model.safetensors",
                 "text_encoder/model.safetensors.index.json", "text_encoder/model-*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: one clear line either way
        raise ModelLoadError(
            f"could not get '{source}' from the Hugging Face Hub ({type(exc).__name__}); on a machine with "
            f"access run `huggingface-cli download {source} --local-dir DIR` and pass DIR instead, or point "
            "HF_HOME at a cache that holds it") from exc


def schedule_from_scheduler_dir(path: Path) -> tuple[NoiseSchedule, str, float]:
    """``(schedule, prediction_type, timestep_scale)`` from a diffusers ``scheduler_config.json``."""
    cfg_file = path / "scheduler_config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"missing {cfg_file}; a teacher directory needs its scheduler config")
    cfg = json.loads(cfg_file.read_text())
    if str(cfg.get("_class_name", "")).startswith("FlowMatch"):
        return FlowSchedule(shift=float(cfg.get("shift", 1.0))), "flow", float(cfg.get("num_train_timesteps", 1000))
    return VPSchedule.from_scheduler_config(cfg), cfg.get("prediction_type", "epsilon"), 1.0


def _model_class(index: dict[str, Any], component: str, library: str = "diffusers"):
    import importlib

    lib, class_name = index[component]
    cls = getattr(importlib.import_module(library), class_name, None)
    if lib != library or cls is None:
        raise ModelLoadError(f"component '{component}' is {lib}.{class_name}; only {library} classes load there")
    return cls


def load_pretrained(source: str | Path | None = None, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, guidance_scale: float | None = None) -> Pretrained:
    """Load a teacher (``None``: the shipped digits teacher) as a frozen :class:`Pretrained` whose
    weights are cast to ``dtype`` (float32 by default, whatever precision they were stored in)."""
    if str(source).startswith("analytic:"):  # an exact Gaussian-mixture teacher (diffdistill.toy)
        from .toy import load_toy_teacher

        return load_toy_teacher(str(source).split(":", 1)[1], guidance_scale)
    path = resolve_pretrained(shipped_teacher_path() if source is None else source)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        if (path / "pytorch_lora_weights.safetensors").is_file():
            raise ModelLoadError(f"{path} is a LoRA adapter export, not a pipeline: use the run it came from, or "
                                 "export it again with --fuse for a full pipeline")
        raise ModelLoadError(f"{path} has no model_index.json; pass a diffusers pipeline directory")
    index = json.loads(index_file.read_text())
    component = next((c for c in DENOISER_COMPONENTS if c in index), None)
    if component is None:
        raise ModelLoadError(f"{index_file} names no 'unet' or 'transformer' component")
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    schedule, prediction_type, timestep_scale = schedule_from_scheduler_dir(path / "scheduler")
    network_class = _model_class(index, component)
    if network_class.__name__ not in ADAPTERS:
        raise ModelLoadError(f"{path}: no denoiser adapter for {network_class.__name__} yet; "
                             f"supported: {', '.join(sorted(ADAPTERS))}")
    net_config = network_class.load_config(path, subfolder=component)
    if net_config.get("addition_embed_type"):
        raise ModelLoadError(f"{path}: UNets with added conditioning ({net_config['addition_embed_type']}, e.g. "
                             "SDXL) are not supported yet")
    try:
        network = network_class.from_pretrained(path, subfolder=component, use_safetensors=True, torch_dtype=dtype)
        vae = None
        if "vae" in index:
            vae = _model_class(index, "vae").from_pretrained(path, subfolder="vae", use_safetensors=True,
                                                             torch_dtype=dtype)
        text_encoder = tokenizer = None
        if "text_encoder" in index and "tokenizer" in index:
            from transformers.utils import logging as transformers_logging

            bars = transformers_logging.is_progress_bar_enabled()
            transformers_logging.disable_progress_bar()  # its per-tensor "Loading weights" bar, on stderr
            try:
                text_encoder = _model_class(index, "text_encoder", "transformers").from_pretrained(
                    path, subfolder="text_encoder", use_safetensors=True, dtype=dtype)
            finally:
                if bars:
                    transformers_logging.enable_progress_bar()
            tokenizer = _model_class(index, "tokenizer", "transformers").from_pretrained(path, subfolder="tokenizer")
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(f"could not load the weights in {path} ({str(exc).splitlines()[0]}); "
                             "they must be diffusers safetensors files") from exc
    kwargs: dict[str, Any] = {"timestep_scale": timestep_scale}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    denoiser = build_adapter(network, schedule, prediction_type, meta, **kwargs)
    for module in (denoiser, vae, text_encoder):
        if module is not None:
            module.to(device=device).eval().requires_grad_(False)
    return Pretrained(denoiser=denoiser, path=path, meta=meta, vae=vae, text_encoder=text_encoder,
                      tokenizer=tokenizer)


def save_pipeline_dir(path: str | Path, network: nn.Module, scheduler_config: dict[str, Any],
                      meta: dict[str, Any], pipeline_class: str = "DDPMPipeline") -> Path:
    """Write a pixel-space diffusers pipeline directory (network as ``unet``) plus ``diffdistill.json``."""
    from diffusers import DDPMScheduler

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler.from_config(scheduler_config).save_pretrained(path / "scheduler")
    import diffusers

    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", type(network).__name__], "scheduler": ["diffusers", "DDPMScheduler"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path
