"""Benchmark: the generic training loop's overhead on DMD2, against a minimal hand-written loop.

    python bench/trainer_overhead.py [--config configs/digits/dmd2.yaml] [--iterations 20] [key=value ...]

Both loops train the same networks (the trainer's own student, critic and GAN head, one copy each) with
the same forward and backward passes per iteration: ``critic.updates`` critic steps (a student sample
without gradient, denoising score matching of the critic, the GAN head on real and fake bottleneck
features) and one generator step (a student sample with gradient, the teacher's and the critic's x0
without gradient, the DMD loss and the GAN generator term), AdamW with gradient clipping, and the EMA
update. The hand-written loop calls the same pure loss functions directly; the trainer runs
``Trainer.train_step`` (phases, accelerate's autocast and backward, requires-grad switching, per-term
logging, LR schedulers, the non-finite guard, EMA ramp-up). The two alternate iteration by iteration
after a warm-up of each; the table prints the median seconds per iteration and their ratio.
Goal (issue 8): at most 1.15×.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffdistill.data import random_batch  # noqa: E402
from diffdistill.denoiser import Conditioning  # noqa: E402
from diffdistill.trainers.critic import score_matching_loss  # noqa: E402
from diffdistill.trainers.distribution_matching import dmd_loss  # noqa: E402
from diffdistill.trainers.ema import ema_update  # noqa: E402
from diffdistill.trainers.gan import discriminator_loss, gan_noise, generator_loss, realism_logits  # noqa: E402
from diffdistill.trainers.loop import Trainer  # noqa: E402
from diffdistill.trainers.method import load_distill_config  # noqa: E402


def hand_written_step(trainer: Trainer, generator: torch.Generator) -> None:
    """One DMD2 iteration written out by hand (1-step student, sampled at the schedule's last time)."""
    m, cfg = trainer.method, trainer.cfg
    x_real, labels = random_batch(trainer.dataset, cfg.train.batch_size, generator)
    cond = Conditioning(class_labels=labels)
    student, critic, teacher = m.student_denoiser(m.student), m.critic_denoiser(), m.teacher.denoiser
    t_student = m.timesteps[0]
    opt_s, opt_c = trainer.optimizers["student"], trainer.optimizers["fake_score"]
    opt_d = trainer.optimizers.get("discriminator")
    critic_params = [p for p in m.critic.parameters() if p.requires_grad]
    head_params = list(m.head.parameters()) if m.head is not None else []
    gan = cfg.gan
    for _ in range(cfg.critic.updates):
        with torch.no_grad():
            x = student(student.schedule.prior_sample(tuple(x_real.shape), generator=generator), t_student, cond,
                        guidance_scale=1.0)
        loss = score_matching_loss(critic, x, cond, cfg.critic.weighting, generator)
        if m.head is not None:
            real = realism_logits(critic, m.head, x_real, cond, *gan_noise(critic.schedule, x_real, gan.max_time_fraction, generator))
            fake = realism_logits(critic, m.head, x, cond, *gan_noise(critic.schedule, x, gan.max_time_fraction, generator))
            loss = loss + gan.discriminator_weight * discriminator_loss(real, fake)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(critic_params, cfg.train.grad_clip)
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
        if opt_d is not None:
            torch.nn.utils.clip_grad_norm_(head_params, cfg.train.grad_clip)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
    for p in critic_params + head_params:  # the generator step trains the student only
        p.requires_grad_(False)
    x = student(student.schedule.prior_sample(tuple(x_real.shape), generator=generator), t_student, cond,
                guidance_scale=1.0)
    t = m.matching_time(len(x), generator)
    eps = torch.randn(x.shape, generator=generator)
    with torch.no_grad():
        x_t = teacher.schedule.add_noise(x.detach(), eps, t)
        x0_real, x0_fake = teacher(x_t, t, cond), critic(x_t, t, cond, guidance_scale=1.0)
    loss = dmd_loss(x, x0_real, x0_fake)
    if m.head is not None:
        fake = realism_logits(critic, m.head, x, cond, *gan_noise(critic.schedule, x, gan.max_time_fraction, generator))
        loss = loss + gan.generator_weight * generator_loss(fake)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.student.parameters(), cfg.train.grad_clip)
    opt_s.step()
    opt_s.zero_grad(set_to_none=True)
    for p in critic_params + head_params:
        p.requires_grad_(True)
    for decay, ema in trainer.ema.items():
        ema_update(ema, m.student, decay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/digits/dmd2.yaml"))
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_distill_config(args.config, ["train.log_every=1", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        generator = torch.Generator().manual_seed(1)
        trainer.train_step(), hand_written_step(trainer, generator)  # warm-up
        times = {"trainer": [], "hand": []}
        for _ in range(args.iterations):
            start = time.perf_counter()
            trainer.train_step()
            times["trainer"].append(time.perf_counter() - start)
            start = time.perf_counter()
            hand_written_step(trainer, generator)
            times["hand"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{cfg.method}: batch {cfg.train.batch_size}, {cfg.critic.updates} critic update(s) per generator update, "
          f"GAN {'on' if cfg.gan.enabled else 'off'}; torch threads {torch.get_num_threads()}; "
          f"{args.iterations} alternating iterations (median)\n")
    print("| loop | seconds / iteration |")
    print("|---|---|")
    print(f"| hand-written | {med['hand']:.4f} |")
    print(f"| diffdistill Trainer.train_step | {med['trainer']:.4f} |")
    print(f"\noverhead: {med['trainer'] / med['hand']:.3f}x (goal ≤ 1.15x)")


if __name__ == "__main__":
    main()
