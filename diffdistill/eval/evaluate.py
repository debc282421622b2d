"""The evaluation harness behind ``diffdistill eval``: sample, extract features, score, write the results.

A :class:`Candidate` is one thing to evaluate (a run's student, the teacher, any loaded pipeline) with
the sampler and step-count → timestep rule it is used with. :func:`evaluate` scores several candidates
in one process against one cached reference (:mod:`.reference`) with the same seeds and the same class
labels, so a teacher-vs-student comparison never mixes statistics, preprocessing or noise. For every
candidate, step count and seed it computes FID, KID and precision/recall (:mod:`.metrics`), reports the
mean and standard deviation over seeds, saves a sample grid per step count, and draws the
quality-vs-steps plot. Under ``accelerate launch`` (``EvalOptions.processes``) every process draws its
share of the batches (:func:`~diffdistill.samplers.batch_share`) and the main process gathers the
features, scores and writes: the same numbers as one process.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..denoiser import Denoiser
from ..errors import DiffDistillError
from ..grid import save_grid
from ..pretrained import Pretrained, cycled
from ..processes import Processes
from ..samplers import batch_share, generate, sampling_grid
from .clip_score import ClipScorer
from .features import FeatureExtractor
from .metrics import fid_from_features, kid, precision_recall, torchmetrics_fid
from .reference import Reference

METRICS_FILE = "metrics.json"
PLOT_FILE = "quality_vs_steps.png"


@dataclass
class Candidate:
    """A denoiser to evaluate and how it is sampled: ``sampler`` over ``timesteps(n)`` (an explicit list)
    or, when that returns None, over ``n`` steps of the schedule's ``spacing`` grid."""

    label: str
    denoiser: Denoiser
    sampler: str
    steps: Sequence[int]
    timesteps: Callable[[int], list[float] | None] = lambda n: None
    spacing: str | None = None
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """What metrics.json records about how this candidate was sampled: the sampler and, per step
        count, the exact native times it visits (before the final clean one)."""
        grids = {str(n): sampling_grid(self.denoiser, sampler=self.sampler, num_steps=n, timesteps=self.timesteps(n),
                                       spacing=self.spacing)[:-1].tolist() for n in self.steps}
        return {"sampler": self.sampler, "spacing": self.spacing or "sampler default", **self.info, "timesteps": grids}


@dataclass
class EvalOptions:
    num: int = 2000
    seeds: Sequence[int] = (0,)
    batch_size: int = 250
    device: str = "cpu"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    torchmetrics_check: bool = False
    grid_rows: int = 4
    progress: bool = True
    #: under ``accelerate launch``: every process samples its share, the main one scores and writes
    processes: Processes = field(default_factory=Processes)


def score(features: torch.Tensor, reference: Reference, opts: EvalOptions, seed: int) -> dict[str, float]:
    """FID, KID (mean over subsets), precision and recall of generated ``features`` against ``reference``."""
    kid_mean, _ = kid(features, reference.features, subsets=opts.kid_subsets, subset_size=opts.kid_subset_size,
                      seed=seed)
    precision, recall = precision_recall(features, reference.features, k=opts.pr_k, seed=seed)
    out = {"fid": fid_from_features(features, reference.statistics), "kid": kid_mean,
           "precision": precision, "recall": recall}
    if opts.torchmetrics_check:
        out["fid_torchmetrics"] = torchmetrics_fid(features, reference.features)
    return out


def extract(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
    batches = images.split(batch_size)
    return torch.cat([extractor(b) for b in tqdm(batches, desc=f"features ({extractor.name})", leave=False,
                                                  disable=not progress)])


def evaluate(candidates: Sequence[Candidate], teacher: Pretrained, extractor: FeatureExtractor,
             reference: Reference, opts: EvalOptions, output: str | Path | None = None,
             extra: dict | None = None, prompts: Sequence[str] | None = None, clip: ClipScorer | None = None) -> dict:
    """Score every candidate at each of its step counts and seeds; write ``metrics.json``, the grids and
    the plot into ``output`` (when given) and return the metrics dict. With ``prompts`` (text-conditioned
    models) and a ``clip`` scorer, each sample's CLIP score against its prompt is averaged as well."""
    if opts.num <= extractor.dim:
        raise DiffDistillError(f"--num {opts.num} is not above the {extractor.dim} feature dimensions of "
                               f"{extractor.name}: FID's covariance would be singular; use --num {extractor.dim + 1} "
                               "or more")
    procs = opts.processes
    shares = [batch_share(opts.num, opts.batch_size, r, procs.world) for r in range(procs.world)]
    counts = [len(share) for share in shares]
    if 0 in counts:
        raise DiffDistillError(f"--num {opts.num} in batches of {opts.batch_size} leaves "
                               f"{counts.count(0)} of {procs.world} processes without a batch; use --batch-size "
                               f"{-(-opts.num // procs.world)} or less")
    cond = teacher.cycled_conditioning(opts.num, prompts)
    sample_prompts = cycled(prompts, opts.num) if prompts else None
    output = Path(output) if output is not None else None
    mine, progress = shares[procs.rank], opts.progress and procs.is_main
    results: dict = {}
    for cand in candidates:
        per_seed: dict[str, dict[str, list[float]]] = {}
        seconds = {}
        for n in cand.steps:
            start = time.perf_counter()
            for seed in opts.seeds:
                latents = generate(cand.denoiser, teacher.sample_shape, opts.num, sampler=cand.sampler,
                                   num_steps=n, timesteps=cand.timesteps(n), spacing=cand.spacing, cond=cond,
                                   seed=seed, batch_size=opts.batch_size, device=opts.device,
                                   progress=progress and n > 4, shard=procs.shard)
                images = torch.cat([teacher.decode(b.to(opts.device)).cpu() for b in latents.split(opts.batch_size)])
                features = procs.gather(extract(extractor, images, opts.batch_size, progress), counts)
                clip_scores = None
                if clip is not None and sample_prompts is not None:
                    clip_scores = procs.gather(clip.scores(images, sample_prompts[mine.start:mine.stop],
                                                           opts.batch_size).double(), counts)
                grid = output is not None and seed == opts.seeds[0]
                grid_images = _first_images(images, shares, procs, opts.grid_rows * (teacher.num_classes or 8)) \
                    if grid else None
                if not procs.is_main:
                    continue
                for name, value in score(features, reference, opts, seed).items():
                    per_seed.setdefault(name, {}).setdefault(str(n), []).append(value)
                if clip_scores is not None:
                    per_seed.setdefault("clip_score", {}).setdefault(str(n), []).append(float(clip_scores.mean()))
                if grid:
                    _save_grid(grid_images, teacher, output / "grids" / f"{cand.label}_{n}step.png", opts.grid_rows)
            seconds[str(n)] = round(time.perf_counter() - start, 2)
            if progress:
                print(f"{cand.label} {n} step(s): FID {np.mean(per_seed['fid'][str(n)]):.4f}", flush=True)
        if not procs.is_main:
            continue
        entry = {name: {n: float(np.mean(v)) for n, v in by_n.items()} for name, by_n in per_seed.items()}
        # sample standard deviation over seeds (0 for a single seed)
        entry["fid_std"] = {n: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for n, v in per_seed["fid"].items()}
        entry["per_seed"] = per_seed
        entry["seconds"] = seconds
        results[cand.label] = entry | cand.describe()
    if not procs.is_main:
        return procs.broadcast(None)
    metrics = {**results, "feature_extractor": extractor.name, "num_samples": opts.num, "seeds": list(opts.seeds),
               "reference": {k: v for k, v in reference.description.items() if k != "extractor"}
               | {"path": str(reference.path) if reference.path else None},
               "kid_settings": {"subsets": opts.kid_subsets,
                                "subset_size": min(opts.kid_subset_size, opts.num, len(reference.features)), "kernel": "(x.y/d + 1)^3"},
               "precision_recall_k": opts.pr_k,
               **({"clip_model": clip.name, "num_prompts": len(prompts)} if clip is not None and prompts else {}),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(extra or {})}
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
        plot_quality_vs_steps(metrics, [c.label for c in candidates], output / PLOT_FILE)
    return procs.broadcast(metrics)


def _first_images(images: torch.Tensor, shares: Sequence[range], procs: Processes, count: int) -> torch.Tensor:
    """The first ``count`` samples of the whole draw (for the grid), gathered from the processes holding them."""
    counts = [max(0, min(share.stop, count) - share.start) for share in shares]
    return procs.gather(images[:counts[procs.rank]], counts)


def _save_grid(images: torch.Tensor, teacher: Pretrained, path: Path, rows: int) -> None:
    if images.dim() != 4:
        return
    cols = teacher.num_classes or 8
    save_grid(images[:rows * cols], path, ncols=cols)


def plot_quality_vs_steps(metrics: dict, labels: Sequence[str], path: str | Path) -> Path:
    """FID against sampling steps (log axis) per candidate, with the seeds' standard deviation as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    all_steps = sorted({int(n) for label in labels for n in metrics[label]["fid"]})
    for label in labels:
        fid = metrics[label]["fid"]
        steps = sorted(int(n) for n in fid)
        ax.errorbar(steps, [fid[str(n)] for n in steps], yerr=[metrics[label]["fid_std"][str(n)] for n in steps],
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_steps, [str(n) for n in all_steps])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"FID ({metrics['feature_extractor']} features)")
    ax.set_title(f"{metrics['num_samples']} samples, seeds {metrics['seeds']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
