"""``diffdistill demo``: the whole job on the shipped digits teacher, in four stages.

1. **train** — distil the teacher into a 1-step and a 4-step student (``configs/digits/<method>.yaml`` and
   ``<method>_4step.yaml``; a method without a 4-step config trains one student, evaluated at 1, 2 and
   4 steps). The students train side by side in their own processes (``diffdistill distill``, one
   thread each on a CPU), so two cores give two trainings in the time of one.
2. **evaluate** — both students and the teacher in one process against one cached reference, with the
   same seeds and labels (:func:`diffdistill.eval.evaluate.evaluate`): the students at 1, 2 and 4 steps,
   the teacher at the same counts and at 50.
3. **export** — the 1-step student as a diffusers pipeline (:func:`diffdistill.export.export_run`).
4. **report** — ``report.md``: the metrics table, the quality-vs-steps plot and teacher / student grids
   side by side.

``output/`` then holds ``runs/`` (the training runs), ``eval/`` (``metrics.json``, the plot, grids),
``export/`` and ``report.md``.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from .errors import ConfigError, DiffDistillError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "digits"
REPORT_FILE = "report.md"
#: the demo's budget per method, applied before --max-steps and the user's key=value overrides: what fits
#: the 10-minute goal on two CPU cores (other methods train for their configs' own max_steps). DMD2's
#: official Adam β₁ = 0.9 needs far more steps than this: at 200 steps with one critic update the 1-step
#: student scored FID 4.11 with it and 0.48 with β₁ = 0 (500 samples; SiD's official setting). The GAN
#: head keeps the settings the demo was timed and scored with (critic features, every noise level, weight
#: 0.003); the long-run config's teacher-feature head is untested at this budget.
BUDGET = {"dmd2": ["train.max_steps=200", "critic.updates=1", "student_optim.betas=0.0,0.999",
                   "critic_optim.betas=0.0,0.999", "student_optim.schedule=constant", "gan.features=critic",
                   "gan.max_time_fraction=1.0", "gan.generator_weight=0.003"]}


@dataclass
class DemoOptions:
    method: str = "dmd2"
    max_steps: int | None = None  # training steps per student; None: the BUDGET's, else the config's own
    num: int = 500  # samples per evaluated entry
    seeds: int = 1
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 50])
    overrides: list[str] = field(default_factory=list)  # key=value for both students
    config_dir: Path = CONFIG_DIR
    jobs: int = 2  # students trained at once
    device: str = "cpu"
    progress: bool = True


@dataclass
class Student:
    label: str
    config: Path
    steps: list[int]  # step counts it is evaluated at
    grid_steps: list[int]  # step counts whose sample grids the report shows
    run: Path


def plan(output: Path, opts: DemoOptions) -> list[Student]:
    """The students to train: ``<method>.yaml`` (evaluated at 1, 2 and 4 steps) and, when it exists,
    ``<method>_4step.yaml``."""
    one = opts.config_dir / f"{opts.method}.yaml"
    if not one.is_file():
        have = sorted(p.stem for p in opts.config_dir.glob("*.yaml")) if opts.config_dir.is_dir() else []
        raise ConfigError(f"no config {one} for --method {opts.method}" +
                          (f"; methods with digits configs: {', '.join(have)}" if have else
                           "; the demo reads configs/digits/ from a source checkout, or pass --config-dir"))
    four = opts.config_dir / f"{opts.method}_4step.yaml"
    if not four.is_file():
        return [Student(opts.method, one, [1, 2, 4], [1, 4], output / "runs" / one.stem)]
    return [Student(f"{opts.method}_1step", one, [1, 2, 4], [1], output / "runs" / one.stem),
            Student(f"{opts.method}_4step", four, [1, 2, 4], [4], output / "runs" / four.stem)]


def overrides(opts: DemoOptions) -> list[str]:
    """key=value for every student: the method's demo budget, then --max-steps, then the user's own."""
    steps = [f"train.max_steps={opts.max_steps}"] if opts.max_steps else []
    device = ["train.cpu=true"] if opts.device == "cpu" else []
    return ["train.sample_every=0", "train.log_every=5", *device, *BUDGET.get(opts.method, []), *steps, *opts.overrides]


def train_students(students: list[Student], opts: DemoOptions) -> dict[str, float]:
    """Train every student with ``diffdistill distill`` in its own process, ``opts.jobs`` at a time; one
    progress bar per student (from its log). Returns the wall seconds of each."""
    from .trainers.loop import last_logged_step
    from .trainers.method import load_distill_config

    common = overrides(opts)
    totals = {s.label: load_distill_config(str(s.config), common).train.max_steps for s in students}  # fail early
    threads = max(1, (os.cpu_count() or 1) // max(1, min(opts.jobs, len(students))))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    pending, running, seconds = list(students), {}, {}
    bars = {}
    try:
        while pending or running:
            while pending and len(running) < max(1, opts.jobs):
                s = pending.pop(0)
                s.run.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(s.run, ignore_errors=True)  # a re-run never evaluates an older student
                total = totals[s.label]
                args = [sys.executable, "-m", "diffdistill.cli", "distill", "--config", str(s.config), "--output",
                        str(s.run), "--quiet", "--overwrite", *common, f"train.checkpoint_every={total}"]
                log = open(s.run.parent / f"{s.run.name}.log", "w")
                running[s.label] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log, s,
                                    time.perf_counter())
                bars[s.label] = tqdm(total=total, desc=f"  train {s.label}", leave=True, disable=not opts.progress)
            time.sleep(1.0)
            for label, (proc, log, s, start) in list(running.items()):
                bars[label].update(last_logged_step(s.run) - bars[label].n)
                if proc.poll() is None:
                    continue
                log.close()
                del running[label]
                if proc.returncode != 0:
                    tail = (s.run.parent / f"{s.run.name}.log").read_text().strip().splitlines()[-1:]
                    raise DiffDistillError(f"training {label} failed ({tail[0] if tail else 'no output'}); its log is "
                                           f"{s.run.parent / (s.run.name + '.log')}")
                bars[label].update(bars[label].total - bars[label].n)
                seconds[label] = time.perf_counter() - start
    finally:
        for proc, log, _, _ in running.values():
            proc.kill()
            proc.wait()
            log.close()
        for bar in bars.values():
            bar.close()
    return seconds


def evaluate_students(students: list[Student], output: Path, opts: DemoOptions) -> dict:
    """Every student (EMA weights) and the teacher, in one :func:`~diffdistill.eval.evaluate.evaluate` call."""
    from .eval.evaluate import EvalOptions, evaluate
    from .eval.jobs import _prepare, student_candidate, teacher_candidate
    from .trainers.saved_run import SavedRun

    eval_opts = EvalOptions(num=opts.num, seeds=list(range(opts.seeds)), device=opts.device, progress=opts.progress)
    runs = [SavedRun(s.run, device=opts.device) for s in students]
    teacher = runs[0].method.teacher
    extractor, reference = _prepare(runs[0].cfg.data, teacher, None, None, eval_opts, "train", False)
    candidates = []
    for s, run in zip(students, runs):
        cand = student_candidate(run, s.steps, ema=True)
        cand.label = s.label
        candidates.append(cand)
    candidates.append(teacher_candidate(teacher, opts.teacher_steps, "ddim", None))
    return evaluate(candidates, teacher, extractor, reference, eval_opts, output / "eval",
                    {"runs": {s.label: str(s.run) for s in students}})


def write_report(output: Path, students: list[Student], metrics: dict, seconds: dict[str, float],
                 export_info: dict, opts: DemoOptions) -> Path:
    """``report.md``: setup, metrics table with ratios to the teacher, plot and side-by-side grids."""
    teacher = metrics["teacher"]
    t50 = teacher["fid"].get("50")
    lines = [f"# diffdistill demo: {opts.method} on the shipped digits teacher", "",
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} · {platform.machine()} "
             f"{os.cpu_count()} CPU core(s) · device {opts.device} · {metrics['num_samples']} samples per entry, "
             f"seeds {metrics['seeds']} · {metrics['feature_extractor']} features against "
             f"{metrics['reference'].get('num_images', '?')} reference images", "",
             "| model | steps | FID | ratio to teacher at the same steps | ratio to teacher at 50 | KID | precision | recall |",
             "|---|---|---|---|---|---|---|---|"]
    for label in [s.label for s in students] + ["teacher"]:
        m = metrics[label]
        for n, fid in m["fid"].items():
            same = teacher["fid"].get(n)
            ratio = f"{fid / same:.2f}" if same and label != "teacher" else "—"
            r50 = f"{fid / t50:.2f}" if t50 else "—"
            std = f" ± {m['fid_std'][n]:.3f}" if len(metrics["seeds"]) > 1 else ""
            lines.append(f"| {label} | {n} | {fid:.3f}{std} | {ratio} | {r50} | {m['kid'][n]:.4f} | "
                         f"{m['precision'][n]:.2f} | {m['recall'][n]:.2f} |")
    timing = ", ".join(f"{label} {sec:.0f} s" for label, sec in seconds.items())
    configs = ", ".join(f"`{s.config.name}`" for s in students)
    lines += ["", f"Training: {configs} with {' '.join(overrides(opts))}; wall time {timing} (trained side by side, "
              f"{opts.jobs} at a time).", "",
              "![FID against sampling steps](eval/quality_vs_steps.png)", "", "## Samples (seed 0, one class per column)", ""]
    cells = [("teacher", n) for n in teacher["fid"]] + [(s.label, str(n)) for s in students for n in s.grid_steps]
    lines += ["| " + " | ".join(f"{who}, {n} step{'s' if n != '1' else ''}" for who, n in cells) + " |",
              "|" + "---|" * len(cells),
              "| " + " | ".join(f"![{who} {n}](eval/grids/{who}_{n}step.png)" for who, n in cells) + " |", "",
              f"The {students[0].label} student is exported to `export/` ({export_info['pipeline']} + {export_info['scheduler']}); "
              f"load it with `DiffusionPipeline.from_pretrained(\"export\")` and call it with "
              f"`num_inference_steps={export_info['default_steps']}`.", ""]
    path = output / REPORT_FILE
    path.write_text("\n".join(lines))
    return path


def run_demo(output: str | Path, opts: DemoOptions) -> Path:
    """Run the four stages into ``output``; returns the report's path."""
    from .export import export_run

    output = Path(output)
    students = plan(output, opts)
    stages = tqdm(total=4, desc="demo", disable=not opts.progress, position=0)
    stages.set_postfix_str("train")
    seconds = train_students(students, opts)
    stages.update(1)
    stages.set_postfix_str("evaluate")
    metrics = evaluate_students(students, output, opts)
    stages.update(1)
    stages.set_postfix_str("export")
    info = export_run(students[0].run, output / "export", overwrite=True)
    stages.update(1)
    stages.set_postfix_str("report")
    report = write_report(output, students, metrics, seconds, info, opts)
    stages.update(1)
    stages.close()
    return report
