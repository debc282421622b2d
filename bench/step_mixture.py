"""Diagnostic: a K-step student's FID, precision and recall after each prefix of its chain and of the equal mixture
of the K outputs.

    python bench/step_mixture.py --run RUN [--checkpoint step_0002400] [--num 2000] [--seeds 0,1,2] [--no-ema]

A K-step DMD2 student trains one of its K steps per update, but with one shared critic
(``critic.per_step=false``, the official code) the critic learns the *mixture* of the K steps' outputs,
so the generator is driven to make that mixture match the data, not each step's output. This prints the
FID in the digits feature space of the student's output after its first 1, 2, …, K steps (the sampler and
timesteps ``diffdistill eval`` uses; the last column is the K-step FID) and of an equal mixture of the K
outputs (``num / K`` of each, drawn at random), each the mean ± std over ``--seeds``, with improved precision
and recall (k = 3, the same features). A mixture far below every one of its parts is the signature of a
critic that fits the mixture; recall falling step by step while precision holds, of steps that drop
variety (docs/results.md, "4-step student").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffdistill.eval.evaluate import EvalOptions, extract  # noqa: E402
from diffdistill.eval.jobs import _prepare  # noqa: E402
from diffdistill.eval.metrics import fid_from_features, precision_recall  # noqa: E402
from diffdistill.samplers import generate  # noqa: E402
from diffdistill.trainers.saved_run import SavedRun  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--no-ema", action="store_true")
    args = parser.parse_args()
    run = SavedRun(args.run, args.checkpoint)
    opts = EvalOptions(num=args.num, progress=False)
    teacher = run.method.teacher
    extractor, reference = _prepare(run.cfg.data, teacher, None, None, opts, "train", False)
    network, weights = run.student_network(not args.no_ema)
    student, sampler = run.method.student_denoiser(network), run.method.student_sampler
    grid = run.method.student_timesteps(run.cfg.generator.student_steps)
    k_steps, cond = len(grid), teacher.cycled_conditioning(args.num, None)
    scores: dict[str, list[tuple[float, float, float]]] = {}

    def score(name: str, features: torch.Tensor, seed: int) -> None:
        fid = fid_from_features(features, reference.statistics)
        scores.setdefault(name, []).append((fid, *precision_recall(features, reference.features, seed=seed)))

    for seed in (int(s) for s in args.seeds.split(",")):
        feats = []
        for k in range(1, k_steps + 1):
            latents = generate(student, teacher.sample_shape, args.num, sampler=sampler, num_steps=k,
                               timesteps=grid[:k], cond=cond, seed=seed, batch_size=opts.batch_size)
            feats.append(extract(extractor, teacher.decode(latents), opts.batch_size, False))
            score(f"after {', '.join(f'{t:g}' for t in grid[:k])}", feats[-1], seed)
        order, share = torch.randperm(args.num, generator=torch.Generator().manual_seed(seed)), args.num // k_steps
        score(f"equal mixture of the {k_steps} outputs",
              torch.cat([f[order[i * share:(i + 1) * share]] for i, f in enumerate(feats)]), seed)
    print(f"{run.run_dir} ({run.checkpoint.name}, {weights}; {args.num} samples, seeds {args.seeds})\n")
    print("| output | FID (mean ± std) | precision | recall |\n|---|---|---|---|")
    for name, values in scores.items():
        fid, precision, recall = np.asarray(values).T
        spread = np.std(fid, ddof=1) if len(fid) > 1 else 0.0
        print(f"| {name} | {fid.mean():.4f} ± {spread:.4f} | {precision.mean():.3f} | {recall.mean():.3f} |")


if __name__ == "__main__":
    main()
