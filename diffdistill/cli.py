"""``diffdistill <command>``: the command line.

Every user-facing failure is a :class:`~diffdistill.errors.DiffDistillError`: the CLI prints its one
line and exits with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from .errors import ConfigError, DiffDistillError


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _csv_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _ensure_empty_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise DiffDistillError(f"output {path} is a file; pass a directory")
    ancestor = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        what = "is a file" if not ancestor.is_dir() else "is not writable"
        raise DiffDistillError(f"cannot create output directory {path}: {ancestor} {what}; choose a writable location")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DiffDistillError(f"output directory {path} is not empty; choose a new one or pass --overwrite")


def _run_output(args: argparse.Namespace, cfg, resume: bool = False) -> Path | None:
    """For a training command: print the resolved config and return None on ``--dry-run``; otherwise the
    checked ``--output`` directory (empty unless ``--overwrite``, or any when resuming)."""
    from .config import config_to_yaml

    if args.dry_run:
        print(config_to_yaml(cfg), end="")
        return None
    if not args.output:
        raise DiffDistillError(f"{args.command} needs --output DIR (or --dry-run)")
    output = Path(args.output)
    if not resume:
        _ensure_empty_dir(output, args.overwrite)
    return output


def cmd_teacher(args: argparse.Namespace) -> None:
    """Train a class-conditional UNet2DModel teacher and save it as a diffusers pipeline directory."""
    from .config import load_config
    from .teacher import TeacherConfig, train_teacher

    cfg = load_config(TeacherConfig, args.config, args.overrides)
    output = _run_output(args, cfg)
    if output is None:
        return
    train_teacher(cfg, output, max_steps=args.max_steps, progress=not args.quiet)
    print(f"teacher written to {output}")


def cmd_distill(args: argparse.Namespace) -> None:
    """Distil a teacher into a few-step student with the method the config names."""
    from .trainers.loop import distill
    from .trainers.method import load_distill_config

    cfg = load_distill_config(args.config, args.overrides)
    output = _run_output(args, cfg, resume=args.resume)
    if output is None:
        return
    distill(cfg, output, max_steps=args.max_steps, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, the main process speaks
        print(f"run written to {output}")


def cmd_sample(args: argparse.Namespace) -> None:
    """Sample a teacher (or, with --run, a distilled student) into a labelled PNG grid (and optionally a
    safetensors file of the images)."""
    import torch

    from .denoiser import Conditioning, standard_guidance_scale
    from .grid import save_grid
    from .pretrained import load_pretrained
    from .samplers import generate

    device = _device(args.device)
    if args.run:
        from .trainers.saved_run import SavedRun, ema_choice

        run = SavedRun(args.run, args.checkpoint, device=device)
        teacher, sampler = run.method.teacher, run.method.student_sampler
        denoiser = run.student(ema_choice(args.no_ema, args.ema_decay))
        num_steps = args.steps or run.default_steps
        timesteps = args.timesteps or run.method.student_timesteps(num_steps)
    else:
        teacher = load_pretrained(args.teacher, device=device)
        denoiser, sampler, num_steps, timesteps = teacher.denoiser, args.sampler, args.steps or 50, args.timesteps
    shape = teacher.sample_shape
    cond, row_labels, ncols = None, None, None
    if teacher.num_classes:
        classes = args.classes or list(range(teacher.num_classes))
        if any(not 0 <= c < teacher.num_classes for c in classes):
            raise DiffDistillError(f"--classes must lie in 0..{teacher.num_classes - 1}")
        per_class = max(1, args.num // len(classes))
        labels = torch.tensor(classes).repeat_interleave(per_class)
        cond, row_labels, ncols = Conditioning(class_labels=labels), [str(c) for c in classes], per_class
    elif teacher.text_conditioned:
        from .eval.clip_score import read_prompts

        prompts = [*(args.prompt or []), *(read_prompts(args.prompts) if args.prompts else [])]
        if not prompts:
            raise ConfigError("this model is text-conditioned: pass --prompt TEXT (repeatable) or --prompts FILE")
        cond, ncols = teacher.cycled_conditioning(args.num, prompts), min(len(prompts), args.num)
    num = len(cond.class_labels) if cond is not None and cond.class_labels is not None else args.num
    w = None if args.guidance_scale is None else standard_guidance_scale(args.guidance_scale, args.guidance_convention)
    try:
        images = generate(denoiser, shape, num, sampler=sampler, num_steps=None if timesteps else num_steps,
                          timesteps=timesteps, spacing=args.spacing, cond=cond, guidance_scale=w, seed=args.seed,
                          batch_size=args.batch_size, device=device, progress=not args.quiet)
    except ValueError as exc:  # a grid the schedule cannot make, e.g. --spacing karras on a flow teacher
        raise ConfigError(f"{exc} (sample options)") from exc
    images = teacher.decode(images.to(device)).cpu()
    path = save_grid(images, args.output, ncols=ncols, row_labels=row_labels)
    if args.save_tensors:
        from safetensors.torch import save_file

        tensors = {"images": images.contiguous()}
        if cond is not None and cond.class_labels is not None:
            tensors["labels"] = cond.class_labels
        save_file(tensors, args.save_tensors)
    print(f"{num} samples ({sampler}, {len(timesteps) if timesteps else num_steps} steps) -> {path}")


def cmd_export(args: argparse.Namespace) -> None:
    """Write a run's student as a diffusers pipeline that plain diffusers loads and samples exactly."""
    from .export import export_run
    from .trainers.saved_run import ema_choice

    info = export_run(args.run, args.output, ema=ema_choice(args.no_ema, args.ema_decay), steps=args.steps,
                      checkpoint=args.checkpoint, overwrite=args.overwrite, fuse=args.fuse)
    lora = info["lora"]
    what = ("LoRA adapter" + (" and fused pipeline" if lora["fused"] else "") if lora and lora["adapter"] else
            "fused LoRA pipeline" if lora else "pipeline")
    print(f"{info['method']} student ({what}: {info['pipeline']} + {info['scheduler']}, {info['default_steps']}-step; "
          f"exact at {', '.join(info['timesteps'])} steps) -> {args.output}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on the shipped digits teacher: distil a 1-step and a 4-step student, evaluate them
    beside the teacher, export the 1-step student and write report.md."""
    from .demo import DemoOptions, run_demo

    output = Path(args.output)
    _ensure_empty_dir(output, args.overwrite)
    opts = DemoOptions(method=args.method, max_steps=args.max_steps, num=args.num, seeds=args.seeds,
                       teacher_steps=args.teacher_steps,
                       overrides=args.overrides, jobs=args.jobs, device=_device(args.device), progress=not args.quiet,
                       **({"config_dir": Path(args.config_dir)} if args.config_dir else {}))
    start = time.perf_counter()
    report = run_demo(output, opts)
    print(f"demo finished in {time.perf_counter() - start:.0f} s -> {report}")


def cmd_pairs(args: argparse.Namespace) -> None:
    """Make DMD's regression pairs: noise and the teacher's deterministic ODE image from it."""
    from safetensors.torch import save_file

    from .denoiser import standard_guidance_scale
    from .pretrained import load_pretrained
    from .samplers import get_sampler
    from .trainers.dmd import make_pairs

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise DiffDistillError(f"{output} exists; choose another file or pass --overwrite")
    get_sampler(args.sampler)
    w = None if args.guidance_scale is None else standard_guidance_scale(args.guidance_scale, args.guidance_convention)
    teacher = load_pretrained(args.teacher, guidance_scale=w)
    pairs = make_pairs(teacher, args.num, args.sampler, args.steps, args.seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(pairs, str(output))
    print(f"{args.num} pairs ({args.sampler}, {args.steps} steps) -> {output}; use it as dmd.pairs={output}")


def _seeds(text: str) -> list[int]:
    """``3`` → seeds 0, 1, 2; ``0,5,9`` (or ``7,`` for the single seed 7) → exactly those."""
    seeds = [int(v) for v in text.split(",") if v.strip()] if "," in text else list(range(int(text)))
    if not seeds:
        raise argparse.ArgumentTypeError("give a seed count ≥ 1 (3 → 0,1,2) or a list such as 0,5,9 (7, for seed 7)")
    return seeds


def _step_counts(text: str) -> list[int]:
    steps = _csv_ints(text)
    if any(n < 1 for n in steps) and steps != [0]:
        raise argparse.ArgumentTypeError("step counts must be ≥ 1 (a lone 0 skips the teacher)")
    return steps


def cmd_eval(args: argparse.Namespace) -> None:
    """Score a run's student beside its teacher (or any model) with FID, KID and precision/recall."""
    from .data import DataConfig
    from .denoiser import standard_guidance_scale
    from .eval.evaluate import METRICS_FILE, EvalOptions
    from .eval.jobs import SWEEP_FILE, evaluate_model, evaluate_run, sweep_checkpoints
    from .processes import current_processes
    from .trainers.saved_run import ema_choice

    procs = current_processes()  # under `accelerate launch`: each process samples its share of every batch list
    device = _device(args.device)
    if procs.world > 1 and device == "cuda":
        device = procs.device  # this process's own GPU
    opts = EvalOptions(num=args.num, seeds=args.seeds, batch_size=args.batch_size, device=device,
                       torchmetrics_check=args.torchmetrics_check, progress=not args.quiet, processes=procs)
    say = print if procs.is_main else (lambda *a, **k: None)
    common = dict(features=args.features, feature_weights=args.feature_weights, split=args.split,
                  refresh_reference=args.refresh_reference)
    if args.prompts:
        from .eval.clip_score import ClipScorer, read_prompts

        common["prompts"] = read_prompts(args.prompts)
        common["clip"] = ClipScorer.from_pretrained(args.clip_model, args.clip_pretrained, device=opts.device)
    if args.model:
        if args.guidance_scale is not None:
            raise ConfigError("eval --guidance-scale applies to --run (teacher and LCM-style student together)")
        if not args.output:
            raise ConfigError("eval --model needs --output DIR for metrics.json")
        data = DataConfig(dataset="folder", path=args.data_path, resolution=args.resolution,
                          channels=args.channels) if args.data_path else None
        metrics = evaluate_model(args.model, args.steps, opts, args.output, sampler=args.sampler,
                                 spacing=args.spacing, data=data, **common)
        say(f"FID {metrics['model']['fid']} -> {Path(args.output) / METRICS_FILE}")
        return
    if args.steps == [0]:
        raise ConfigError("--steps must list step counts ≥ 1")
    teacher_steps = [] if args.teacher_steps == [0] else (args.teacher_steps or sorted({*args.steps, 50}))
    kwargs = dict(teacher_sampler=args.sampler, teacher_spacing=args.spacing, ema=ema_choice(args.no_ema, args.ema_decay),
                  output=args.output, **common)
    if args.all_checkpoints:
        if args.guidance_scale is not None:
            raise ConfigError("--guidance-scale does not take --all-checkpoints yet; evaluate checkpoints one by one")
        if args.prompts:
            raise ConfigError("--all-checkpoints does not take --prompts yet; evaluate checkpoints one by one")
        table = sweep_checkpoints(args.run, args.steps, teacher_steps, opts, **kwargs)
        say(f"best checkpoint per step count: {table['best']} -> {Path(args.output or args.run) / SWEEP_FILE}")
        return
    w = None if args.guidance_scale is None else standard_guidance_scale(args.guidance_scale, args.guidance_convention)
    metrics = evaluate_run(args.run, args.steps, teacher_steps, opts, checkpoint=args.checkpoint,
                           guidance_scale=w, **kwargs)
    lines = [f"{who} FID: " + ", ".join(f"{n} step(s) {v:.4f}" for n, v in metrics[who]["fid"].items())
             for who in ("student", "teacher") if who in metrics]
    say("\n".join(lines) + f"\n-> {Path(args.output or args.run) / METRICS_FILE}")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help=cmd_eval.__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="a distillation run directory: its student beside its teacher")
    what.add_argument("--model", help="any teacher or exported pipeline directory (or Hub id), on its own")
    p.add_argument("--steps", type=_step_counts, default=[1, 2, 4],
                   help="student (or --model) step counts (default 1,2,4)")
    p.add_argument("--teacher-steps", type=_step_counts,
                   help="teacher step counts in the same run (default: --steps and 50; 0 skips the teacher)")
    p.add_argument("--num", type=int, default=2000, help="generated samples per step count and seed (default 2000)")
    p.add_argument("--seeds", type=_seeds, default=[0], help="a count (3 → seeds 0,1,2) or a list 0,5,9 (default 1)")
    p.add_argument("--sampler", default="ddim", help="the teacher's (or --model's) sampler (default ddim)")
    p.add_argument("--spacing", help="its timestep spacing (default: trailing for ddim and dpmpp_2m, karras for "
                                     "euler and heun)")
    p.add_argument("--features", help="digits, inception-clean or inception-legacy_tensorflow "
                                      "(default: digits for digits data, else inception-clean)")
    p.add_argument("--feature-weights", "--inception-weights", dest="feature_weights",
                   help="local weights for the feature network (clean-fid's inception-2015-12-05.pt, or a "
                        "digits classifier file)")
    p.add_argument("--split", default="train", help="reference split of the data (digits: train or test)")
    p.add_argument("--refresh-reference", action="store_true", help="recompute the cached reference statistics")
    p.add_argument("--checkpoint", help="evaluate this checkpoint (e.g. step_0000400) instead of the newest")
    p.add_argument("--all-checkpoints", action="store_true", help="sweep every checkpoint into one table")
    p.add_argument("--no-ema", action="store_true", help="the raw student weights instead of the first EMA copy")
    p.add_argument("--ema-decay", type=float,
                   help="which EMA copy, when the run keeps several (train.ema_decays; default: the first)")
    p.add_argument("--guidance-scale", type=float,
                   help="--run: the teacher's CFG scale and the scale a guidance-embedded (lcm) student samples at "
                        "(default: the run's; other students sample as trained)")
    p.add_argument("--guidance-convention", choices=["standard", "delta"], default="standard",
                   help="standard: x_u + w(x_c - x_u); delta: x_c + w(x_c - x_u) (LCM's)")
    p.add_argument("--torchmetrics-check", action="store_true", help="also compute FID with torchmetrics")
    p.add_argument("--prompts", help="text-conditioned models: a file with one prompt per line (cycled over "
                                     "the samples); adds the CLIP score")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name, or local-dir:PATH")
    p.add_argument("--clip-pretrained", default="laion2b_s34b_b79k",
                   help="open_clip pretrained tag or a local weights file")
    p.add_argument("--data-path", help="--model: an image folder as reference data (default: the digits)")
    p.add_argument("--resolution", type=int, default=16, help="--data-path: image resolution")
    p.add_argument("--channels", type=int, default=3, help="--data-path: image channels")
    p.add_argument("--output", help="where metrics.json, grids and the plot go (default: the run directory)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def _training_parser(sub, func, config_help: str, output_help: str, override_example: str) -> argparse.ArgumentParser:
    """The options every training command shares: config, output, step cap, dry run, overrides."""
    p = sub.add_parser(func.__name__.removeprefix("cmd_"), help=func.__doc__)
    p.add_argument("--config", help=config_help)
    p.add_argument("--output", help=output_help)
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {override_example}")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffdistill", description="Distil diffusion models into few-step generators.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{teacher,distill,pairs,sample,eval,export,demo}")

    p = _training_parser(sub, cmd_teacher, "YAML config (default: built-in digits teacher defaults)",
                         "directory for the diffusers pipeline", "train.steps=100")
    p = _training_parser(sub, cmd_distill, "YAML config naming a method, e.g. configs/digits/progressive.yaml",
                         "run directory (checkpoints, logs, sample grids, config.yaml)", "train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")

    p = sub.add_parser("pairs", help=cmd_pairs.__doc__)
    p.add_argument("--teacher", help="diffusers pipeline directory or Hub id (default: the shipped digits teacher)")
    p.add_argument("--output", required=True, help="safetensors file to write (noise, images, labels)")
    p.add_argument("--num", type=int, default=1024)
    p.add_argument("--sampler", default="heun", help="a deterministic sampler: heun, euler, ddim, dpmpp_2m")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, help="teacher CFG scale (default: the teacher's)")
    p.add_argument("--guidance-convention", choices=["standard", "delta"], default="standard")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("sample", help=cmd_sample.__doc__)
    p.add_argument("--teacher", help="diffusers pipeline directory or Hub id (default: the shipped digits teacher)")
    p.add_argument("--run", help="sample this distillation run's student instead (its own sampler and timesteps)")
    p.add_argument("--checkpoint", help="--run: this checkpoint (e.g. step_0000400) instead of the newest")
    p.add_argument("--no-ema", action="store_true", help="--run: the raw student weights, not the first EMA copy")
    p.add_argument("--ema-decay", type=float, help="--run: which EMA copy, when the run keeps several "
                   "(train.ema_decays; default: the first)")
    p.add_argument("--sampler", default="heun", help="ddim, euler, heun, dpmpp_2m, ode or sde (default: heun)")
    p.add_argument("--steps", type=int, help="number of sampling steps (default: 50; --run: the student's own)")
    p.add_argument("--spacing", help="timestep grid: trailing, leading, uniform or karras (default per sampler)")
    p.add_argument("--timesteps", type=_csv_floats, help="explicit timestep list, e.g. 999,749,499,249")
    p.add_argument("--num", type=int, default=64,
                   help="number of samples (default: 64; with classes, rounded down to a multiple of their count)")
    p.add_argument("--classes", type=_csv_ints, help="classes to sample, one grid row each (default: all)")
    p.add_argument("--prompt", action="append", help="text-conditioned models: a prompt (repeatable; one grid "
                   "column each, cycled over --num)")
    p.add_argument("--prompts", help="text-conditioned models: a file with one prompt per line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default: the teacher's)")
    p.add_argument("--guidance-convention", choices=["standard", "delta"], default="standard",
                   help="standard: x_u + w(x_c - x_u); delta: x_c + w(x_c - x_u) (LCM's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--output", default="samples.png", help="PNG grid to write (default: samples.png)")
    p.add_argument("--save-tensors", help="also write the images (and labels) to this safetensors file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)
    _eval_parser(sub)

    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    p.add_argument("--output", required=True, help="directory for runs/, eval/, export/ and report.md")
    p.add_argument("--method", default="dmd2", help="the method whose configs/digits configs to run (default dmd2)")
    p.add_argument("--max-steps", type=int, help="training steps per student (default: the demo's budget)")
    p.add_argument("--num", type=int, default=500, help="samples per evaluated entry (default 500)")
    p.add_argument("--seeds", type=int, default=1, help="evaluation seeds (default 1)")
    p.add_argument("--teacher-steps", type=_step_counts, default=[1, 2, 4, 50],
                   help="the teacher's step counts (default 1,2,4,50)")
    p.add_argument("--jobs", type=int, default=2, help="students trained at once (default 2)")
    p.add_argument("--config-dir", help="where <method>.yaml and <method>_4step.yaml are (default configs/digits)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="key=value for both students' configs, e.g. train.batch_size=64")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help=cmd_export.__doc__)
    p.add_argument("--run", required=True, help="the distillation run directory")
    p.add_argument("--output", required=True, help="the pipeline directory to write")
    p.add_argument("--steps", type=int, help="the default step count (default: the student's own)")
    p.add_argument("--checkpoint", help="export this checkpoint instead of the newest")
    p.add_argument("--ema", dest="no_ema", action="store_false", help="export the first EMA copy (default)")
    p.add_argument("--no-ema", dest="no_ema", action="store_true", help="export the raw student weights")
    p.add_argument("--ema-decay", type=float,
                   help="which EMA copy, when the run keeps several (train.ema_decays; default: the first)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--fuse", action="store_true", help="LoRA students: also write the full pipeline with the "
                   "adapter merged in (pipelines that cannot load adapters always get it)")
    p.set_defaults(func=cmd_export, no_ema=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, before or after the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        args.func(args)
        from .processes import leave_process_group

        leave_process_group()  # under `accelerate launch`: every process is done before the group goes
    except (DiffDistillError, OSError) as exc:  # OSError: a file or directory the system refused
        if debug:
            traceback.print_exc()
        print(f"diffdistill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
