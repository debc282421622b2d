"""Train a small class-conditional diffusers ``UNet2DModel`` teacher (``diffdistill teacher``).

The objective is the usual denoising regression (Ho et al. 2020) on the prediction type the schedule
config names (``v_prediction`` by default, Salimans & Ho 2022 §4): draw ``t`` uniformly, noise the
images, regress the network's output on the matching target. Labels are replaced by the null class
with probability ``label_dropout`` so that classifier-free guidance works (Ho & Salimans 2022). The EMA
of the weights is saved as a diffusers pipeline directory that :func:`~diffdistill.pretrained.load_pretrained`
and ``diffdistill sample --teacher`` read.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .config import option, save_config, to_dict
from .data import DataConfig, build_dataset, infinite_batches, make_dataloader
from .pretrained import save_pipeline_dir
from .schedules import VPSchedule, join_prediction
from .trainers.ema import ema_update


@dataclass
class TeacherModelConfig:
    """A diffusers ``UNet2DModel``; attention in the blocks listed by ``attention_levels``."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[int] = field(default_factory=lambda: [1, 2])
    layers_per_block: int = option(1, min=1, max=4)
    norm_num_groups: int = option(8, min=1)
    attention_head_dim: int = option(32, min=1)


@dataclass
class TeacherScheduleConfig:
    """The diffusers scheduler config the teacher is trained (and later sampled) with."""

    num_train_timesteps: int = option(1000, min=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    beta_start: float = option(0.0001, min=0.0, max=1.0)
    beta_end: float = option(0.02, min=0.0, max=1.0)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"


@dataclass
class TeacherTrainConfig:
    steps: int = option(4000, min=1)
    batch_size: int = option(128, min=1)
    lr: float = option(1e-3, min=0.0)
    warmup_steps: int = option(100, min=0)
    weight_decay: float = option(0.0, min=0.0)
    grad_clip: float = option(1.0, min=0.0)
    ema_decay: float = option(0.999, min=0.0, max=1.0)
    label_dropout: float = option(0.1, min=0.0, max=1.0)
    seed: int = 0
    log_every: int = option(50, min=1)


@dataclass
class TeacherConfig:
    """Everything ``diffdistill teacher`` needs; saved as ``config.yaml`` in the output directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    schedule: TeacherScheduleConfig = field(default_factory=TeacherScheduleConfig)
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    guidance_scale: float = option(1.0, min=0.0, help="default CFG scale w (standard convention)")
    save_dtype: Literal["float32", "float16"] = "float32"

    def validate(self) -> None:
        levels = len(self.model.block_out_channels)
        if any(not 0 <= i < levels for i in self.model.attention_levels):
            raise ValueError(f"model.attention_levels must index model.block_out_channels (0..{levels - 1})")
        if any(c % self.model.norm_num_groups for c in self.model.block_out_channels):
            raise ValueError("every model.block_out_channels entry must be divisible by model.norm_num_groups")


def build_unet(cfg: TeacherConfig, num_classes: int):
    """The teacher network; ``num_classes + 1`` class embeddings, the last being the null class."""
    from diffusers import UNet2DModel

    m = cfg.model
    down = tuple("AttnDownBlock2D" if i in m.attention_levels else "DownBlock2D"
                 for i in range(len(m.block_out_channels)))
    up = tuple(b.replace("Down", "Up") for b in reversed(down))
    return UNet2DModel(sample_size=cfg.data.resolution, in_channels=cfg.data.channels,
                       out_channels=cfg.data.channels, block_out_channels=tuple(m.block_out_channels),
                       layers_per_block=m.layers_per_block, down_block_types=down, up_block_types=up,
                       norm_num_groups=m.norm_num_groups, attention_head_dim=m.attention_head_dim,
                       num_class_embeds=num_classes + 1 if num_classes else None)


def train_teacher(cfg: TeacherConfig, output: str | Path, *, max_steps: int | None = None,
                  progress: bool = True) -> Path:
    """Train the teacher and write its pipeline directory (and ``config.yaml``) to ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output / "config.yaml")
    tc = cfg.train
    torch.manual_seed(tc.seed)
    dataset = build_dataset(cfg.data)
    num_classes = getattr(dataset, "num_classes", 0)
    unet = build_unet(cfg, num_classes).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sched_cfg = to_dict(cfg.schedule)
    schedule = VPSchedule.from_scheduler_config(sched_cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps = min(tc.steps, max_steps) if max_steps else tc.steps
    lr_at = lambda i: tc.lr * min(1.0, (i + 1) / max(1, tc.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * i / steps))  # noqa: E731
    gen = torch.Generator().manual_seed(tc.seed)
    batches = infinite_batches(make_dataloader(dataset, min(tc.batch_size, len(dataset)), seed=tc.seed))
    log = []
    start = time.time()
    bar = tqdm(range(steps), desc="teacher", disable=not progress)
    for step in bar:
        x0, labels = next(batches)
        if num_classes:
            drop = torch.rand(len(labels), generator=gen) < tc.label_dropout
            labels = torch.where(drop, num_classes, labels)
        t = schedule.sample_t(len(x0), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = schedule.add_noise(x0, eps, t)
        a, s = schedule.alpha_sigma(t)
        target = join_prediction(x0, eps, cfg.schedule.prediction_type, a, s).float()
        out = unet(x_t, t.float(), class_labels=labels if num_classes else None).sample
        loss = torch.nn.functional.mse_loss(out, target)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip)
        opt.step()
        ema_update(ema, unet, tc.ema_decay if step >= tc.warmup_steps else 0.0)
        if step % tc.log_every == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item(), "lr": lr_at(step)})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    meta = {"num_classes": num_classes, "null_class": num_classes if num_classes else None,
            "guidance_scale": cfg.guidance_scale, "resolution": cfg.data.resolution, "channels": cfg.data.channels,
            "dataset": cfg.data.dataset, "train_steps": steps, "train_seconds": round(time.time() - start, 1)}
    save_pipeline_dir(output, ema.to(getattr(torch, cfg.save_dtype)), sched_cfg, meta)
    (output / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return output


@torch.no_grad()
def class_accuracy(teacher, classifier, *, num: int = 1000, sampler: str = "heun", num_steps: int = 50,
                   guidance_scale: float | None = None, seed: int = 0, batch_size: int = 250) -> float:
    """Share of samples that ``classifier`` labels as the class they were generated for.

    Labels cycle through ``0 … num_classes−1``; ``teacher`` is a :class:`~diffdistill.pretrained.Pretrained`.
    """
    from .denoiser import Conditioning
    from .samplers import generate

    labels = torch.arange(num) % teacher.num_classes
    images = generate(teacher.denoiser, teacher.sample_shape, num, sampler=sampler, num_steps=num_steps,
                      cond=Conditioning(class_labels=labels), guidance_scale=guidance_scale, seed=seed,
                      batch_size=batch_size)
    predicted = torch.cat([classifier(teacher.decode(b)).argmax(1) for b in images.split(batch_size)])
    return (predicted == labels).double().mean().item()
