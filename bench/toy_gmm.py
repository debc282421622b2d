"""Benchmark: one-step generators against the exact 2-D Gaussian-mixture teacher.

    python bench/toy_gmm.py [--configs configs/toy/dmd2.yaml,...] [--seeds 0,1,2] [--sample-seeds 1,2,3,4,5]
                            [--max-steps N] [--num 100000] [key=value ...]
    python bench/toy_gmm.py --score-runs RUN[,RUN...] [--raw]

For each config (a method run with ``teacher: analytic:ring8``; by default every file under ``configs/toy/``:
DMD2, and DMD with its regression loss) it trains the student through the normal loop, once per ``--seeds``
entry (``train.seed``); ``--score-runs`` instead scores runs already trained by ``diffdistill distill``
(their EMA student unless ``--raw``). It then prints one table, a row per run, over one draw of ``--num``
samples per ``--sample-seeds`` entry (1 step):

- the sliced Wasserstein-2 distance (256 projections) to 200 000 exact mixture samples, the mean over the
  draws, and its ratio to the exact teacher's own 100-step Heun ODE samples scored the same way. Goal
  (issue 4): ratio ≤ 1.1 and every mode covered. At 100 000 samples one draw of the exact ODE moves by
  0.004–0.007 with the seed, a quarter to a third of its value, mostly with how the draw's mode counts
  scatter, hence the mean over draws (docs/results.md, "Analytic Gaussian mixture");
- the same ratio with every draw, the exact ODE's too, subsampled to the mixture's nearest-mode weights
  (:func:`at_mixture_weights`): what is left of the gap once the mode weights are taken out;
- the off-mode share: samples more than 3 standard deviations from every mode (on the "bridges" a one-step
  map leaves between modes; the exact ODE has about 1 %), the mean over the draws;
- the nearest-mode weights against the mixture's, mean and largest error in percentage points over the
  modes, the draws pooled (the exact ODE's are multinomial scatter, about 0.05 pp);
- the fewest samples any mode received within 3 standard deviations, in any draw (mode coverage);
- the training wall time.

Reference rows: the exact ODE (its draws kept under ``$DIFFDISTILL_CACHE/toy`` after the first run) and
fresh exact samples (the estimator's floor). ``--fitted-reference`` adds the
same ODE on the MLP that students and critics start from (:func:`diffdistill.toy.fit_toy_network`; about
10 min): how well that network class represents the mixture as an ODE (1.10x the exact ODE); a reference,
not a bound (docs/results.md). ``--regression-reference`` adds the
students' network, started from the same fitted MLP, trained by plain regression (MSE) onto pairs of noise
and the exact teacher's 100-step Heun ODE sample from it (400 000 pairs, 20 000 Adam steps, about 6 min on
one core), then sampled in one step like a student: whether the network class can represent the one-step
map at all (0.96x the exact ODE on ring8, docs/results.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffdistill.eval.sliced_wasserstein import sliced_wasserstein2  # noqa: E402
from diffdistill.pretrained import cache_root, cached_tensors  # noqa: E402
from diffdistill.samplers import generate  # noqa: E402
from diffdistill.toy import fit_toy_network, mixture  # noqa: E402
from diffdistill.trainers.dmd import make_pairs  # noqa: E402
from diffdistill.trainers.loop import Trainer, lr_factor  # noqa: E402
from diffdistill.trainers.method import OptimConfig, load_distill_config  # noqa: E402
from diffdistill.trainers.saved_run import SavedRun, ema_choice  # noqa: E402


def sw2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return sliced_wasserstein2(x, ref, num_projections=256, generator=torch.Generator().manual_seed(0))


@dataclass
class Score:
    """One model's figures over its draws (one draw of ``--num`` samples per sampling seed)."""

    sw2: float            # mean over the draws
    off_mode: float       # share of samples more than 3 std from every mode, mean over the draws
    weight_error: float   # mean over modes of |nearest-mode share - component weight|, draws pooled
    weight_error_max: float
    fewest: int           # the smallest count any mode got within 3 std, over all draws
    deviation: tuple[float, ...] = ()  # per mode: nearest-mode share - component weight, draws pooled
    sw2_at_weights: float = float("nan")  # mean SW2 of each draw subsampled to the mixture's mode weights

    def cells(self, exact: "Score") -> str:
        return (f"{self.sw2:.4f} | {self.sw2 / exact.sw2:.2f} | {self.sw2_at_weights / exact.sw2_at_weights:.2f} | "
                f"{self.off_mode:.1%} | "
                f"{100 * self.weight_error:.2f} / {100 * self.weight_error_max:.2f} pp | {self.fewest}")


def at_mixture_weights(x: torch.Tensor, nearest: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The largest subsample of ``x`` whose nearest-mode shares equal ``weights`` (to rounding): the first
    ``n·w_k`` samples of each mode, with ``n`` as large as the scarcest mode allows. A draw is i.i.d., so its
    first points are a random subset; no resampling, no duplicates."""
    counts = torch.bincount(nearest, minlength=len(weights)).double()
    n = float((counts / weights.double()).min())
    return torch.cat([x[nearest == k][: int(n * float(w))] for k, w in enumerate(weights)])


def score(draws: list[torch.Tensor], mix, ref: torch.Tensor) -> Score:
    """The figures of :class:`Score` over ``draws`` against the exact samples ``ref``. Besides SW2 itself,
    SW2 of each draw subsampled to the mixture's mode weights: at 100 000 samples the draws' mode counts
    (multinomial scatter for the exact ODE, scatter plus any bias for a student) carry much of SW2, so this
    column shows what is left once the weights are taken out (the gap between the two is the weights' share)."""
    std = float(mix.covs.diagonal(dim1=1, dim2=2).max().sqrt())
    off, fewest, at_weights = [], [], []
    counts = torch.zeros(mix.num_components, dtype=torch.float64)
    for x in draws:
        d = torch.cdist(x.double(), mix.means)
        nearest, near = d.argmin(1), d.min(1).values < 3 * std
        off.append(1.0 - float(near.double().mean()))
        fewest.append(int(torch.bincount(nearest[near], minlength=mix.num_components).min()))
        counts += torch.bincount(nearest, minlength=mix.num_components).double()
        at_weights.append(sw2(at_mixture_weights(x, nearest, mix.weights), ref))
    deviation = counts / counts.sum() - mix.weights.double()
    return Score(statistics.mean(sw2(x, ref) for x in draws), statistics.mean(off), float(deviation.abs().mean()),
                 float(deviation.abs().max()), min(fewest), tuple(round(float(d), 5) for d in deviation),
                 statistics.mean(at_weights))


def one_step_draws(method, network, num: int, seeds: list[int]) -> list[torch.Tensor]:
    """``num`` one-step samples of the student ``network`` per seed, with the method's own sampler."""
    student = method.student_denoiser(network)
    return [generate(student, method.teacher.sample_shape, num, sampler=method.student_sampler,
                     timesteps=method.student_timesteps(1), seed=s) for s in seeds]


def ode_draws(denoiser, shape: tuple[int, ...], num: int, seeds: list[int]) -> list[torch.Tensor]:
    """``num`` samples of ``denoiser``'s 100-step Heun ODE per seed."""
    return [generate(denoiser, shape, num, sampler="heun", num_steps=100, seed=s) for s in seeds]


def exact_ode_draws(method, num: int, seeds: list[int]) -> list[torch.Tensor]:
    """:func:`ode_draws` of the exact (analytic) teacher, kept on disk per seed under
    ``$DIFFDISTILL_CACHE/toy`` (about 2-4 min a draw to make; they depend only on the mixture, the count,
    the seed and torch)."""
    name, shape = method.cfg.teacher.split(":", 1)[1], method.teacher.sample_shape
    folder = cache_root() / "toy"
    return [cached_tensors(folder / f"{name}-exact-heun100-num{num}-seed{s}-torch{torch.__version__}.safetensors",
                           lambda s=s: {"samples": ode_draws(method.teacher.denoiser, shape, num, [s])[0]})["samples"]
            for s in seeds]


def regression_reference(method, steps: int = 20000, pairs: int = 400000, seed: int = 0):
    """A copy of the students' starting network fitted by MSE onto (noise, exact 100-step Heun ODE sample)
    pairs (DMD's :func:`~diffdistill.trainers.dmd.make_pairs`) at the student's one time step; returned as
    the network."""
    data = make_pairs(method.teacher, pairs, "heun", 100, seed)
    noise, target = data["noise"], data["images"]
    gen = torch.Generator().manual_seed(seed)
    network = copy.deepcopy(method.teacher.network).float().train().requires_grad_(True)
    student, t = method.student_denoiser(network), method.student_timesteps(1)[0]
    opt = torch.optim.Adam(network.parameters(), lr=5e-4)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(OptimConfig(schedule="cosine"), steps))
    for _ in range(steps):
        idx = torch.randint(0, pairs, (512,), generator=gen)
        loss = ((student(noise[idx], t) - target[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    return network.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(str(p) for p in sorted((REPO / "configs/toy").glob("*.yaml"))))
    parser.add_argument("--score-runs", help="comma-separated run directories (made by `diffdistill distill`) to "
                                             "score instead of training --configs")
    parser.add_argument("--raw", action="store_true", help="--score-runs: the raw weights instead of the EMA")
    parser.add_argument("--ema-decay", type=float, help="--score-runs: this EMA copy (default: the run's first)")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--num", type=int, default=100000)
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, one run each")
    parser.add_argument("--sample-seeds", default="1,2,3,4,5", help="sampling seeds every figure is taken over")
    parser.add_argument("--runs", default="runs/bench_toy")
    parser.add_argument("--fitted-reference", action="store_true",
                        help="also run the 100-step ODE on the fitted MLP students start from (about 10 min)")
    parser.add_argument("--regression-reference", action="store_true",
                        help="also fit the student network by regression onto exact ODE pairs (about 6 min)")
    parser.add_argument("--regression-steps", type=int, default=20000)
    parser.add_argument("overrides", nargs="*", help="key=value applied to every config")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sample_seeds = [int(s) for s in args.sample_seeds.split(",")]
    rows, refs = [], None

    def references(m) -> dict[str, Score]:
        """The reference rows, scored once against the first run's method (they do not depend on the run)."""
        mix, shape = mixture(m.cfg.data.mixture), m.teacher.sample_shape
        ref = mix.sample(200000, generator=torch.Generator().manual_seed(123))[0]
        out = {"exact teacher, 100 Heun steps": score(exact_ode_draws(m, args.num, sample_seeds), mix, ref),
               "fresh exact samples (the estimator's floor)":
                   score([mix.sample(args.num, generator=torch.Generator().manual_seed(s))[0] for s in sample_seeds], mix, ref)}
        if args.fitted_reference:
            out["fitted MLP (students' and critics' start), 100 Heun steps"] = \
                score(ode_draws(m.like_teacher(m.teacher.network), shape, args.num, sample_seeds), mix, ref)
        if args.regression_reference:
            regressed = regression_reference(m, steps=args.regression_steps)
            out[f"fitted MLP regressed onto exact ODE pairs ({args.regression_steps} steps; not a method), 1 step"] = \
                score(one_step_draws(m, regressed, args.num, sample_seeds), mix, ref)
        for name, value in out.items():
            print(f"{name}: {value}", flush=True)
        return out | {"_ref": ref, "_mix": mix}

    if args.score_runs:
        for run_dir in args.score_runs.split(","):
            run = SavedRun(run_dir)
            refs = refs or references(run.method)
            network, weights = run.student_network(ema_choice(args.raw, args.ema_decay))
            draws = one_step_draws(run.method, network, args.num, sample_seeds)
            rows.append((Path(run_dir).name, run.cfg.train.seed, run.cfg.method, run.step, None,
                         score(draws, refs["_mix"], refs["_ref"])))
            print(rows[-1], f"({weights} weights)", flush=True)
    else:
        for path, seed in ((p, s) for p in args.configs.split(",") for s in seeds):
            cfg = load_distill_config(path, [*args.overrides, "train.sample_every=0", f"train.seed={seed}"])
            fit_toy_network(cfg.teacher.split(":", 1)[1])  # fitted (or loaded from the cache) outside the timed training
            start = time.perf_counter()
            trainer = Trainer(cfg, Path(args.runs) / f"{Path(path).stem}_seed{seed}", max_steps=args.max_steps,
                              progress=False)
            trainer.run()
            seconds = time.perf_counter() - start
            refs = refs or references(trainer.method)
            draws = one_step_draws(trainer.method, trainer.ema[cfg.train.ema_decays[0]], args.num, sample_seeds)
            rows.append((Path(path).stem, seed, cfg.method, trainer.step, seconds,
                         score(draws, refs["_mix"], refs["_ref"])))
            print(rows[-1], flush=True)
    exact = refs["exact teacher, 100 Heun steps"]
    print()
    print("| run | seed | method | steps | train time | SW2 1 step | × the exact ODE | × at the mixture's weights | "
          "off-mode | mean / max \\|w − w_k\\| | fewest per mode |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, seed, method, steps, seconds, result in rows:
        took = "—" if seconds is None else f"{seconds:.0f} s"
        print(f"| {name} | {seed} | {method} | {steps} | {took} | {result.cells(exact)} |")
    for name, result in refs.items():
        if not name.startswith("_"):
            print(f"| {name} | — | — | — | — | {result.cells(exact)} |")
    print(f"\n{args.num} samples per draw vs 200000 exact mixture samples, one draw per sampling seed "
          f"{args.sample_seeds}; SW2 with 256 projections and the off-mode share (more than 3 std from every mode) "
          f"are means over the draws; × at the mixture's weights: the same ratio with every draw (the exact ODE's "
          f"too) subsampled to the mixture's nearest-mode weights; the nearest-mode weights pool the draws; "
          f"fewest per mode: the smallest count within 3 std of a mode in any draw.")
    for name in dict.fromkeys(r[0] for r in rows):
        ratios = [r[5].sw2 / exact.sw2 for r in rows if r[0] == name]
        print(f"{name}: median ratio over seeds {', '.join(str(r[1]) for r in rows if r[0] == name)}: "
              f"{statistics.median(ratios):.2f} (range {min(ratios):.2f}–{max(ratios):.2f})")


if __name__ == "__main__":
    main()
