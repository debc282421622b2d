"""Search a consistency run's multistep sampling levels on FID (for ``consistency.sample_sigmas``).

    python bench/tune_sample_sigmas.py --run RUN [--steps 2,4] [--num 2000] [--seeds 100,101] [--evals 8]

Song et al. 2023 choose the intermediate time points of their multistep consistency sampling per model by
searching on FID (the official sampler takes them as ``--ts``). This script does such a search for a
``consistency``, ``lcm`` or ``ict`` run: for each step count ``n`` it starts from the run's levels (its ``sample_sigmas``, else
grid levels evenly spaced in index) and, one level at a time from the noisiest down, runs a golden-section search in
log σ over the open interval between that level's neighbours (``--evals`` evaluations each; σ_max and
σ_min are the ends), keeping the best point found. Every evaluation is the mean FD of ``--num`` EMA-student
samples over ``--seeds`` against the training split's reference, like ``diffdistill eval``. The default
seeds (100, 101) are not the ones ``diffdistill eval`` reports (0, 1, 2 with ``--seeds 3``), so a
reported figure for the tuned levels is not the draw they were chosen on. It prints every evaluation, the
starting and the tuned levels with their FD, and the config line to paste.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffdistill.eval.evaluate import Candidate, EvalOptions, evaluate  # noqa: E402
from diffdistill.eval.features import get_feature_extractor  # noqa: E402
from diffdistill.eval.jobs import default_features  # noqa: E402
from diffdistill.eval.reference import load_reference  # noqa: E402
from diffdistill.trainers.saved_run import SavedRun  # noqa: E402

GOLDEN = (math.sqrt(5) - 1) / 2


class Scorer:
    """Mean FD of the run's EMA student sampled through explicit σ levels (the first one σ_max)."""

    def __init__(self, run_dir: str, num: int, seeds: list[int], guidance_scale: float | None = None):
        self.run = SavedRun(run_dir, None, device="cpu")
        self.method = m = self.run.method
        if not hasattr(m.args, "sample_sigmas"):
            raise SystemExit(f"{run_dir} is a '{self.run.cfg.method}' run; this search is for consistency, lcm and "
                             "ict runs (the methods with a sample_sigmas key)")
        self.schedule = m.teacher.denoiser.schedule
        self.opts = EvalOptions(num=num, seeds=seeds, progress=False, kid_subsets=10)
        self.extractor = get_feature_extractor(default_features(self.run.cfg.data))
        self.reference = load_reference(self.run.cfg.data, self.extractor, split="train")
        network, _ = self.run.student_network(True)
        self.denoiser = m.student_denoiser(network)
        if guidance_scale is not None and self.denoiser.embeds_guidance:  # an LCM student's input scale
            self.denoiser.guidance_scale = float(guidance_scale)
        self.first_t = float(m.student_timesteps(2)[0])
        self.sigma_max, self.sigma_min = float(self.schedule.sigma(self.first_t)), float(m.sigma_min)

    def starting_levels(self, n: int) -> list[float]:
        ts = torch.tensor(self.method.student_timesteps(n)[1:], dtype=torch.float64)
        return self.schedule.sigma(ts).tolist()

    def fid(self, levels: list[float]) -> float:
        ts = [self.first_t] + self.schedule.t_from_sigma(torch.tensor(levels, dtype=torch.float64)).tolist()
        n = len(ts)
        cand = Candidate("student", self.denoiser, self.method.student_sampler, [n], timesteps=lambda k: ts)
        fid = evaluate([cand], self.method.teacher, self.extractor, self.reference, self.opts)["student"]["fid"][str(n)]
        print(f"  {n} steps, levels {fmt(levels)}: FD {fid:.4f}", flush=True)
        return fid


def fmt(levels: list[float]) -> str:
    return "[" + ", ".join(f"{s:.4g}" for s in levels) + "]"


def search_level(scorer: Scorer, levels: list[float], k: int, evals: int, best: float) -> tuple[list[float], float]:
    """Golden-section search of level ``k`` in log σ between its neighbours; the best point seen wins."""
    hi = math.log(levels[k - 1] if k > 0 else scorer.sigma_max)
    lo = math.log(levels[k + 1] if k + 1 < len(levels) else scorer.sigma_min)
    pad = 0.02 * (hi - lo)  # stay strictly between the neighbours
    a, b = lo + pad, hi - pad
    seen: dict[float, float] = {}

    def at(u: float) -> float:
        if u not in seen:
            seen[u] = scorer.fid(levels[:k] + [math.exp(u)] + levels[k + 1:])
        return seen[u]

    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    for _ in range(max(evals - 1, 1)):
        if at(c) < at(d):
            b, d = d, c
            c = b - GOLDEN * (b - a)
        else:
            a, c = c, d
            d = a + GOLDEN * (b - a)
        if len(seen) >= evals:
            break
    u, value = min(seen.items(), key=lambda kv: kv[1])
    if value < best:
        return levels[:k] + [math.exp(u)] + levels[k + 1:], value
    return levels, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--steps", default="2,4", help="step counts to tune (each ≥ 2)")
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--seeds", default="100,101")
    ap.add_argument("--evals", type=int, default=8, help="FD evaluations per level")
    ap.add_argument("--passes", type=int, default=1, help="sweeps over the levels")
    ap.add_argument("--guidance-scale", type=float,
                    help="lcm runs: the (standard) scale the student samples at, as diffdistill eval's option")
    ap.add_argument("--output", help="also write the result as JSON here")
    args = ap.parse_args()
    scorer = Scorer(args.run, args.num, [int(s) for s in args.seeds.split(",")], args.guidance_scale)
    print(f"sigma_max {scorer.sigma_max:.4g}, sigma_min {scorer.sigma_min:.4g}; seeds {args.seeds}, {args.num} samples each")
    rows, tuned = [], {}
    for n in [int(s) for s in args.steps.split(",")]:
        if n < 2:
            raise SystemExit("--steps: only step counts of 2 or more have intermediate levels")
        levels = scorer.starting_levels(n)
        print(f"{n} steps: starting levels")
        start = best = scorer.fid(levels)
        first = levels
        for _ in range(args.passes):
            for k in range(n - 1):
                print(f"{n} steps: level {k + 1} of {n - 1}")
                levels, best = search_level(scorer, levels, k, args.evals, best)
        rows.append((n, first, start, levels, best))
        tuned[str(n)] = [round(s, 4) for s in levels]
    print("\n| steps | starting levels | FD | tuned levels | FD |\n|---|---|---|---|---|")
    for n, first, start, levels, best in rows:
        print(f"| {n} | {fmt(first)} | {start:.4f} | {fmt(levels)} | {best:.4f} |")
    line = json.dumps(tuned)
    print(f"\nconfig: {scorer.run.cfg.method}.sample_sigmas: {line}")
    if args.output:
        Path(args.output).write_text(json.dumps({"run": args.run, "seeds": args.seeds, "num": args.num,
                                                 "rows": [{"steps": n, "start": d, "start_fd": s, "tuned": l,
                                                           "tuned_fd": b} for n, d, s, l, b in rows]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
