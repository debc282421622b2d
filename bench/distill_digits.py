"""Benchmark: distil the shipped digits teacher with each method, then compare Fréchet distances.

    python bench/distill_digits.py [--methods progressive,consistency] [--max-steps N] [--num 1000]

For every method config under ``configs/digits/`` it trains a student (``--max-steps`` caps the config's
budget), then prints one table: the Fréchet distance between generated digits and the digits train
split in the shipped digits classifier's feature space (an FID whose feature network is the digits
classifier), for the student at 1, 2 and 4 steps beside the teacher at the same step counts (DDIM,
trailing grid) and at 50 steps, plus training wall time. All numbers come from one process, one set of
reference statistics and the same seeds, through the same feature extractor, 8-bit rounding, cached
reference and sampling batch size as ``diffdistill eval`` (so a row equals ``diffdistill eval --run
runs/bench/METHOD --num N --seeds 1,`` with seed 1; the batch size matters for multi-step students, whose
samplers draw fresh noise per batch).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffdistill.data import DataConfig  # noqa: E402
from diffdistill.denoiser import Conditioning  # noqa: E402
from diffdistill.eval.evaluate import EvalOptions  # noqa: E402
from diffdistill.eval.features import DigitsFeatures  # noqa: E402
from diffdistill.eval.metrics import fid_from_features  # noqa: E402
from diffdistill.eval.reference import load_reference  # noqa: E402
from diffdistill.pretrained import load_pretrained  # noqa: E402
from diffdistill.samplers import generate  # noqa: E402
from diffdistill.trainers.loop import Trainer  # noqa: E402
from diffdistill.trainers.method import load_distill_config  # noqa: E402

STEPS = (1, 2, 4)
#: ``diffdistill eval``'s sampling batch size: fixes the per-batch fresh noise of stochastic multi-step samplers
BATCH = EvalOptions().batch_size


def fd(images, extractor, ref) -> float:
    return fid_from_features(extractor(images), ref.statistics)


def labels_for(num: int, classes: int) -> Conditioning:
    return Conditioning(class_labels=torch.arange(num) % classes)


def eval_points(cfg, total_steps: int) -> list[tuple[int, tuple[int, ...]]]:
    """When to evaluate which step counts: progressive distillation has a different student per round
    (the N-step student is the one at the end of the round that distils 2N steps into N), every other
    method one student for all step counts at the end."""
    if cfg.method != "progressive":
        return [(total_steps, STEPS)]
    p = cfg.progressive
    ends = {n: int(round(math.log2(p.initial_steps / n))) * p.steps_per_round for n in STEPS}
    return [(min(ends[n], total_steps), (n,)) for n in sorted(STEPS, reverse=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(sorted(p.stem for p in (REPO / "configs/digits").glob("*.yaml"))))
    parser.add_argument("--max-steps", type=int, help="cap every method's training steps")
    parser.add_argument("--num", type=int, default=1000, help="generated samples per FD")
    parser.add_argument("--runs", default="runs/bench", help="where the runs go")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every config")
    args = parser.parse_args()
    torch.manual_seed(0)
    classifier = DigitsFeatures()
    ref = load_reference(DataConfig(), classifier, split="train", progress=False)
    teacher = load_pretrained()
    cond = labels_for(args.num, teacher.num_classes)
    rows = []
    t0 = time.perf_counter()
    teacher_fd = {n: fd(generate(teacher.denoiser, teacher.sample_shape, args.num, sampler="ddim", num_steps=n,
                                 spacing="trailing", cond=cond, seed=1,
                                 batch_size=BATCH), classifier, ref) for n in (*STEPS, 50)}
    print(f"teacher evaluated in {time.perf_counter() - t0:.0f}s", flush=True)
    for method in args.methods.split(","):
        cfg = load_distill_config(str(REPO / "configs/digits" / f"{method}.yaml"), [*args.overrides, "train.sample_every=0"])
        run = Path(args.runs) / method
        start = time.perf_counter()
        trainer = Trainer(cfg, run, max_steps=args.max_steps)
        m, fds = trainer.method, {}
        for stop, counts in eval_points(cfg, trainer.total_steps):
            trainer.total_steps = stop
            trainer.run()
            student = m.student_denoiser(trainer.ema[cfg.train.ema_decays[0]])
            for n in counts:
                images = generate(student, teacher.sample_shape, args.num, sampler=m.student_sampler,
                                  timesteps=m.student_timesteps(n), cond=cond, seed=1, batch_size=BATCH)
                fds[n] = fd(images, classifier, ref)
        seconds = time.perf_counter() - start
        rows.append((method, trainer.step, seconds, fds))
        print(f"{method}: {trainer.step} steps in {seconds:.0f}s; FD {fds}", flush=True)
    print()
    print("| method | train steps | train time | FD 1 step (teacher) | FD 2 steps (teacher) | FD 4 steps (teacher) "
          "| teacher FD at 50 |")
    print("|---|---|---|---|---|---|---|")
    for method, steps, seconds, fds in rows:
        cells = " | ".join(f"{fds[n]:.2f} ({teacher_fd[n]:.2f})" for n in STEPS)
        print(f"| {method} | {steps} | {seconds:.0f} s | {cells} | {teacher_fd[50]:.2f} |")
    print(f"\nFD: Fréchet distance to the digits train split in the digits classifier's 128-d features; "
          f"{args.num} samples, classes cycled, seed 1; teacher sampler DDIM (trailing).")


if __name__ == "__main__":
    main()
