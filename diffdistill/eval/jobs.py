"""The three jobs ``diffdistill eval`` runs: a run's student beside its teacher, a sweep over a run's
checkpoints, and any loadable model (a teacher or exported pipeline directory, a hub id) on its own."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ..data import DataConfig
from ..errors import DiffDistillError
from ..pretrained import Pretrained, load_pretrained
from .clip_score import ClipScorer
from .evaluate import Candidate, EvalOptions, evaluate
from .features import get_feature_extractor
from .reference import load_reference

SWEEP_FILE = "checkpoint_sweep.json"


def default_features(data: DataConfig) -> str:
    """The digits classifier for the digits data, clean-fid's Inception for everything else."""
    return "digits" if data.dataset == "digits" else "inception-clean"


def _prepare(data: DataConfig, teacher: Pretrained, features: str | None, feature_weights: str | None,
             opts: EvalOptions, split: str, refresh: bool):
    if data.dataset == "analytic" or len(teacher.sample_shape) != 3:
        raise DiffDistillError("image metrics need image data; score the analytic 2-D mixtures with "
                               "bench/toy_gmm.py (sliced W2 to the exact distribution)")
    extractor = get_feature_extractor(features or default_features(data), weights=feature_weights,
                                      device=opts.device)
    procs = opts.processes
    if not procs.is_main:  # the main process computes (or refreshes) the cached reference; the others read it
        procs.barrier()
    reference = load_reference(data, extractor, split=split, refresh=refresh and procs.is_main,
                               progress=opts.progress and procs.is_main)
    if procs.is_main:
        procs.barrier()
    return extractor, reference


def teacher_candidate(teacher: Pretrained, steps: Sequence[int], sampler: str, spacing: str | None,
                      label: str = "teacher") -> Candidate:
    scale = getattr(teacher.denoiser, "guidance_scale", 1.0)
    info = {"guidance_scale": scale} if scale != 1.0 else {}
    return Candidate(label, teacher.denoiser, sampler, list(steps), spacing=spacing, info=info)


def student_candidate(run, steps: Sequence[int], ema: bool | float, guidance_scale: float | None = None) -> Candidate:
    """The loaded checkpoint's student (EMA or raw weights) with its own sampler and timesteps. A
    ``guidance_scale`` (standard ``w``) is given only to a student that takes it as an input (LCM's)."""
    network, weights = run.student_network(ema)
    denoiser = run.method.student_denoiser(network)
    info = {"method": run.cfg.method, "checkpoint": run.checkpoint.name, "weights": weights}
    if guidance_scale is not None and denoiser.embeds_guidance:
        denoiser.guidance_scale = float(guidance_scale)
    if denoiser.embeds_guidance:
        info["guidance_scale"] = denoiser.guidance_scale
    return Candidate("student", denoiser, run.method.student_sampler, list(steps),
                     timesteps=run.method.student_timesteps, info=info)


def evaluate_run(run_dir: str | Path, steps: Sequence[int], teacher_steps: Sequence[int], opts: EvalOptions, *,
                 teacher_sampler: str = "ddim", teacher_spacing: str | None = None, ema: bool | float = True,
                 checkpoint: str | None = None, features: str | None = None, feature_weights: str | None = None,
                 split: str = "train", refresh_reference: bool = False, output: str | Path | None = None,
                 prompts: Sequence[str] | None = None, clip: ClipScorer | None = None,
                 guidance_scale: float | None = None) -> dict:
    """The run's student (EMA weights by default) at ``steps`` and its teacher at ``teacher_steps``, in one
    process against one reference; writes ``metrics.json`` into ``output`` (default: the run directory).
    ``guidance_scale`` (standard ``w``) sets the teacher's CFG scale and, for a student that embeds the
    scale (LCM), the scale it samples at, so that both are scored at the same guidance."""
    from ..trainers.saved_run import SavedRun

    run = SavedRun(run_dir, checkpoint, device=opts.device)
    teacher = run.method.teacher
    if guidance_scale is not None:
        teacher.denoiser.guidance_scale = float(guidance_scale)
    extractor, reference = _prepare(run.cfg.data, teacher, features, feature_weights, opts, split, refresh_reference)
    candidates = [student_candidate(run, steps, ema, guidance_scale)]
    if teacher_steps:
        candidates.append(teacher_candidate(teacher, teacher_steps, teacher_sampler, teacher_spacing))
    extra = {"run": str(run.run_dir), "teacher_source": run.cfg.teacher or "shipped digits teacher", "train_step": run.step}
    return evaluate(candidates, teacher, extractor, reference, opts, output or run.run_dir, extra, prompts, clip)


def sweep_checkpoints(run_dir: str | Path, steps: Sequence[int], teacher_steps: Sequence[int], opts: EvalOptions, *,
                      teacher_sampler: str = "ddim", teacher_spacing: str | None = None, ema: bool | float = True,
                      features: str | None = None, feature_weights: str | None = None, split: str = "train",
                      refresh_reference: bool = False, output: str | Path | None = None) -> dict:
    """Every checkpoint's student at ``steps`` (and the teacher once), as one table in ``checkpoint_sweep.json``;
    the best checkpoint per step count is the one with the lowest mean FID."""
    from ..trainers.saved_run import SavedRun

    run = SavedRun(run_dir, device=opts.device)
    teacher = run.method.teacher
    extractor, reference = _prepare(run.cfg.data, teacher, features, feature_weights, opts, split, refresh_reference)
    quiet = replace(opts, progress=False)
    rows = []
    for path in run.checkpoints():
        run.load(path)
        cand = student_candidate(run, steps, ema)
        m = evaluate([cand], teacher, extractor, reference, quiet)["student"]
        rows.append({"checkpoint": path.name, "train_step": run.step, "weights": cand.info["weights"],
                     **{k: m[k] for k in ("fid", "fid_std", "kid", "precision", "recall")}})
        if opts.progress and opts.processes.is_main:
            print(f"{path.name}: FID " + ", ".join(f"{n} step(s) {v:.4f}" for n, v in m["fid"].items()), flush=True)
    table = {"checkpoints": rows, "best": {str(n): min(rows, key=lambda r: r["fid"][str(n)])["checkpoint"]
                                           for n in steps},
             "feature_extractor": extractor.name, "num_samples": opts.num, "seeds": list(opts.seeds)}
    if teacher_steps:
        t = evaluate([teacher_candidate(teacher, teacher_steps, teacher_sampler, teacher_spacing)], teacher,
                     extractor, reference, quiet)
        table["teacher"] = {k: t["teacher"][k] for k in ("fid", "fid_std", "kid", "precision", "recall", "sampler")}
    if opts.processes.is_main:
        out = Path(output or run.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / SWEEP_FILE).write_text(json.dumps(table, indent=1) + "\n")
    return table


def evaluate_model(source: str, steps: Sequence[int], opts: EvalOptions, output: str | Path, *, sampler: str = "ddim",
                   spacing: str | None = None, data: DataConfig | None = None, features: str | None = None,
                   feature_weights: str | None = None, split: str = "train", refresh_reference: bool = False,
                   prompts: Sequence[str] | None = None, clip: ClipScorer | None = None) -> dict:
    """Any loadable model (teacher or exported pipeline directory, hub id) at ``steps`` with ``sampler``,
    against ``data`` (default: the digits at the model's resolution); text-conditioned models sample the
    cycled ``prompts`` and, with a ``clip`` scorer, get a CLIP score too."""
    model = load_pretrained(source, device=opts.device)
    if data is None:
        channels, resolution = model.sample_shape[0], model.sample_shape[-1]
        if channels != 1 or model.vae is not None:
            raise DiffDistillError(f"{source} does not make one-channel digits images; give the reference images "
                                   "with --data-path FOLDER --resolution R --channels C")
        data = DataConfig(dataset="digits", resolution=resolution, channels=channels)
    extractor, reference = _prepare(data, model, features, feature_weights, opts, split, refresh_reference)
    cand = teacher_candidate(model, steps, sampler, spacing, label="model")
    student = model.meta.get("student")
    if student:  # a diffdistill export: sample it as the student it is, on its exported timesteps
        missing = [n for n in steps if str(n) not in student["timesteps"]]
        if missing:
            raise DiffDistillError(f"{source} was exported for {', '.join(student['timesteps'])} steps, not {missing}")
        cand = Candidate("model", model.denoiser, student["sampler"], list(steps),
                         timesteps=lambda n: [float(t) for t in student["timesteps"][str(n)]],
                         info={"exported_method": student["method"]})
    return evaluate([cand], model, extractor, reference, opts, output, {"model_source": str(source)},
                    prompts=prompts, clip=clip)
