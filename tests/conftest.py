"""Shared fixtures: tiny diffusers networks and schedules, built locally (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy second core


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """What the package caches on disk (reference statistics, toy fits) goes to a folder of this session's,
    never the user's ~/.cache; subprocesses inherit it."""
    os.environ["DIFFDISTILL_CACHE"] = str(tmp_path_factory.mktemp("diffdistill_cache"))


SCHEDULER_CONFIGS = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}


def tiny_unet(num_class_embeds: int | None = None, channels: int = 1, size: int = 8, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                       num_class_embeds=num_class_embeds).eval()


def tiny_cond_unet(cross_dim: int = 12, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=cross_dim,
                                attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def tiny_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=5,
                                 norm_num_groups=2).eval()


@pytest.fixture
def randomize_weights():
    """Perturb every parameter so zero-initialised output layers do not hide mistakes."""
    def apply(module, scale: float = 0.05, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
        return module
    return apply


TINY_TEACHER_OVERRIDES = ["train.steps=3", "train.batch_size=16", "train.warmup_steps=1", "data.resolution=8",
                          "model.block_out_channels=8,16", "model.attention_levels=1", "model.norm_num_groups=4",
                          "model.attention_head_dim=4"]


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A 3-step class-conditional digits teacher at 8x8 (a few seconds to make), shared by the session."""
    from pathlib import Path

    from diffdistill.config import load_config
    from diffdistill.teacher import TeacherConfig, train_teacher

    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(TeacherConfig, repo / "configs/teacher/digits.yaml", TINY_TEACHER_OVERRIDES)
    return train_teacher(cfg, tmp_path_factory.mktemp("tiny_teacher") / "teacher", progress=False)


def tiny_clip_tokenizer(path, max_length: int = 16):
    """A CLIP tokenizer with a byte-level vocabulary and no merges, written under ``path`` (no download)."""
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length)


def tiny_text_pipeline(path, cross_dim: int = 12, channels: int = 3, seed: int = 0):
    """A text-conditioned pixel-space teacher directory: tiny UNet2DConditionModel, DDPM scheduler, tiny
    CLIPTextModel (hidden size = cross_dim) and tokenizer, all built locally with random weights."""
    import json
    from pathlib import Path

    import diffusers
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=cross_dim,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    tokenizer = tiny_clip_tokenizer(path / ".vocab")
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=cross_dim, intermediate_size=24,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                           pad_token_id=tokenizer.pad_token_id))
    unet.save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(path / "tokenizer")
    index = {"_class_name": "DiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def tiny_latent_text_pipeline(path, seed: int = 0):
    """A latent text-to-image teacher directory in Stable Diffusion's layout: tiny AutoencoderKL (RGB 16 px
    ↔ 2×8×8 latents), tiny UNet2DConditionModel, CLIP text encoder and tokenizer, DDPM scheduler."""
    import json
    from pathlib import Path

    import diffusers
    from diffusers import AutoencoderKL

    path = Path(tiny_text_pipeline(path, channels=2, seed=seed))
    torch.manual_seed(seed + 1)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                  norm_num_groups=4, sample_size=16,
                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")).save_pretrained(path / "vae",
                                                                                          safe_serialization=True)
    index = json.loads((path / "model_index.json").read_text())
    index.update({"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
                  "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None],
                  "feature_extractor": [None, None], "requires_safety_checker": False})
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def captioned_folder(path, num: int = 12, size: int = 16, seed: int = 0):
    """``num`` random RGB PNGs, each with a ``.txt`` caption beside it."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["a red circle", "two cats", "a zero", "a blue square"]
    for i in range(num):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
        (path / f"{i:03d}.txt").write_text(words[i % len(words)])
    return path
