"""Benchmark: sampling throughput of a 1-step student against its teacher at 50 steps, side by side.

    python bench/throughput.py [--run RUN_DIR] [--batch 64] [--repeats 5] [--teacher-steps 50]

The student is ``--run``'s (its own sampler and timesteps, EMA weights); without ``--run`` it is the
shipped digits teacher's network used as a 1-step ``sde`` generator, which costs exactly what a
distilled student of the same architecture costs. Both generate ``--batch`` images per call (class labels
cycled) from the same seeds, alternating student and teacher calls ``--repeats`` times after one warm-up
call each; the table prints the median images per second of each and their ratio. Goal (issue 8):
the 1-step student at least 40× the teacher's 50-step throughput.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffdistill.pretrained import load_pretrained  # noqa: E402
from diffdistill.samplers import generate  # noqa: E402


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a distillation run directory (default: the teacher network as a 1-step generator)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--teacher-steps", type=int, default=50)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.run:
        from diffdistill.trainers.saved_run import SavedRun

        run = SavedRun(args.run, device=device)
        teacher, student = run.method.teacher, run.student()
        sampler, timesteps, what = run.method.student_sampler, run.method.student_timesteps(1), f"{run.cfg.method} student"
    else:
        teacher = load_pretrained(None, device=device)
        student, sampler = teacher.denoiser, "sde"
        timesteps, what = teacher.denoiser.schedule.grid(1, "trailing")[:-1].tolist(), "teacher network, 1 step"
    cond = teacher.cycled_conditioning(args.batch)
    cond = cond.to(device) if cond is not None else None

    def run_student():
        generate(student, teacher.sample_shape, args.batch, sampler=sampler, timesteps=timesteps, cond=cond, seed=0,
                 batch_size=args.batch, device=device)

    def run_teacher():
        generate(teacher.denoiser, teacher.sample_shape, args.batch, sampler="ddim", num_steps=args.teacher_steps,
                 spacing="trailing", cond=cond, seed=0, batch_size=args.batch, device=device)

    with torch.no_grad():
        run_student(), run_teacher()  # warm-up
        times = {"student": [], "teacher": []}
        for _ in range(args.repeats):
            times["student"].append(timed(run_student))
            times["teacher"].append(timed(run_teacher))
    rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch}, {args.repeats} repeats "
          f"(median)\n")
    print("| sampler | network evaluations | images / s |")
    print("|---|---|---|")
    print(f"| {what} | 1 | {rate['student']:.1f} |")
    print(f"| teacher, DDIM {args.teacher_steps} steps | {args.teacher_steps} | {rate['teacher']:.2f} |")
    print(f"\nspeed-up: {rate['student'] / rate['teacher']:.1f}x (goal ≥ 40x)")


if __name__ == "__main__":
    main()
