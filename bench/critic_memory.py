"""Benchmark: peak memory of a full-copy fake-score critic vs a LoRA critic, training side by side.

    python bench/critic_memory.py [--size small|medium] [--steps 3] [--batch 4] [--rank 8]

Each variant runs in its own fresh process: build the frozen teacher UNet (random weights: memory does
not depend on them), then the critic (``critic.kind`` full or lora), then a few score-matching steps with
AdamW. The figure is the peak memory above the teacher alone: ``torch.cuda.max_memory_allocated`` on a
GPU, else the peak resident set size (``ru_maxrss``) on the CPU. The table prints both variants and
their ratio from one invocation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {  # UNet2DModel block_out_channels and sample size
    "small": ((64, 128, 128), 32),
    "medium": ((128, 256, 256, 256), 32),
}


def child(kind: str, size: str, steps: int, batch: int, rank: int) -> dict:
    import resource

    import torch
    from diffusers import UNet2DModel

    sys.path.insert(0, str(REPO))
    from diffdistill.adapters import UNet2DDenoiser
    from diffdistill.schedules import VPSchedule
    from diffdistill.trainers.critic import CriticArgs, build_critic_network, score_matching_loss

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    channels, res = SIZES[size]
    n = len(channels)
    teacher = UNet2DModel(sample_size=res, in_channels=3, out_channels=3, block_out_channels=channels,
                          layers_per_block=2, down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                          up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1)).to(device).requires_grad_(False)
    schedule = VPSchedule.from_scheduler_config({"beta_schedule": "linear"})
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    critic = build_critic_network(teacher, CriticArgs(kind=kind, lora_rank=rank, lora_alpha=rank), seed=0).to(device)
    params = [p for p in critic.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    den = UNet2DDenoiser(critic, schedule, "epsilon")
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x0 = torch.randn(batch, 3, res, res, generator=gen).to(device)
        loss = score_matching_loss(den, x0, None, "snr", gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": kind, "device": device, "trainable": sum(p.numel() for p in params),
            "teacher_params": sum(p.numel() for p in teacher.parameters()), "peak_above_teacher": peak - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.steps, args.batch, args.rank)))
        return
    rows = []
    for kind in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--size", args.size, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--rank", str(args.rank)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    full = rows[0]["peak_above_teacher"]
    print(f"teacher UNet: {rows[0]['teacher_params'] / 1e6:.1f}M parameters, {args.size}, batch {args.batch}, "
          f"{args.steps} critic steps, device {rows[0]['device']}")
    print("| critic | trainable parameters | peak memory above the teacher | vs full |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['trainable'] / 1e6:.2f}M | {r['peak_above_teacher'] / 2**20:.0f} MiB | "
              f"{r['peak_above_teacher'] / full:.2f}x |")


if __name__ == "__main__":
    main()
