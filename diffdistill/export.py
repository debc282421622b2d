"""Export a distilled student as a diffusers pipeline directory that plain diffusers loads and runs
exactly as diffdistill sampled it (``DiffusionPipeline.from_pretrained(path)``; no remote code).

The student's few-step sampler maps onto one of diffusers' own schedulers:

- ``sde`` students (consistency, iCT, DMD/DMD2, VSD, SiD: denoise, then re-noise with fresh noise) →
  ``LCMScheduler``. Its ``step`` is ``x0 = c_out·x̂0 + c_skip·x`` then ``α_prev·x0 + σ_prev·ε``; with
  ``timestep_scaling = 1e6`` the boundary scalings are ``c_skip < 1e-12`` and ``|c_out − 1| < 1e-12`` at
  every timestep ≥ 1, so it is exactly our re-noising sampler. ``original_inference_steps`` is chosen so
  that ``set_timesteps(n)`` yields the student's own timestep list.
- ``ode`` students (progressive distillation: deterministic DDIM steps) → ``DDIMScheduler`` (η = 0,
  ``set_alpha_to_one``), with the spacing that reproduces the student's grid.

Every step count ``1 … max`` is checked when exporting: the model card lists the counts whose diffusers
timesteps equal the student's, and an export whose requested count does not match is refused.

Pixel-space UNet2DModel students (unconditional or class-conditional) export as a
``ConsistencyModelPipeline``: diffusers' generic "UNet2DModel + scheduler (+ class labels)" pipeline,
which calls ``scheduler.scale_model_input`` (identity here), the UNet, and ``scheduler.step`` per
timestep. Latent text-conditioned UNet2DConditionModel students export as a ``StableDiffusionPipeline``
with the teacher's VAE, text encoder and tokenizer (call it with ``guidance_scale=1``: the student is
unguided). LCM's guidance-embedding students are not exported yet; they are refused with one clear line.

LoRA students (``student.lora_rank > 0``) export their adapter as ``pytorch_lora_weights.safetensors``
through the pipeline's own ``save_lora_weights`` (with the peft config as adapter metadata, so
``load_lora_weights`` rebuilds rank, alpha and targets exactly), beside the student's ``scheduler/``: load
the teacher pipeline, ``load_lora_weights(export)`` and swap in that scheduler. ``fuse=True`` (``--fuse``)
also writes the full pipeline with the adapter merged into the weights; pipelines without
``load_lora_weights`` (``ConsistencyModelPipeline``) always get the fused pipeline.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

from .errors import ConfigError, DiffDistillError
from .pretrained import META_FILE

CARD_FILE = "README.md"
LORA_FILE = "pytorch_lora_weights.safetensors"
GRID_FILE = "samples.png"
TIMESTEP_SCALING = 1.0e6  # LCMScheduler boundary condition: c_skip = 0.25 / ((t·1e6)² + 0.25) ≈ 0 for t ≥ 1


def _teacher_scheduler_config(run) -> dict[str, Any]:
    path = run.method.teacher.path / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise DiffDistillError(f"the teacher of {run.run_dir} has no diffusers scheduler config ({path}); only "
                               "students of diffusers teachers can be exported")
    return json.loads(path.read_text())


def build_scheduler(teacher_config: dict[str, Any], sampler: str, max_steps: int, spacing: str = "trailing"):
    """The diffusers scheduler for a student ``sampler`` ("sde" or "ode"), on the teacher's noise schedule."""
    from diffusers import DDIMScheduler, LCMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "rescale_betas_zero_snr", "steps_offset")
    base = {k: teacher_config[k] for k in keep if k in teacher_config}
    common = {**base, "clip_sample": False, "thresholding": False, "set_alpha_to_one": True}
    if sampler == "sde":
        return LCMScheduler(**common, original_inference_steps=max(4, max_steps), timestep_scaling=TIMESTEP_SCALING)
    if sampler in ("ode", "ddim"):
        return DDIMScheduler(**common, timestep_spacing=spacing)
    raise ConfigError(f"no diffusers scheduler reproduces the '{sampler}' student sampler")


def scheduler_timesteps(scheduler, num_steps: int) -> list[int] | None:
    """``scheduler.set_timesteps(num_steps)``'s list, or None when it refuses that count."""
    try:
        scheduler.set_timesteps(num_steps)
    except ValueError:
        return None
    return [int(t) for t in scheduler.timesteps]


def matching_step_counts(run, scheduler, max_steps: int) -> dict[int, list[int]]:
    """Step counts ``n ≤ max_steps`` for which the scheduler visits exactly the student's timesteps."""
    out = {}
    for n in range(1, max_steps + 1):
        ours = run.method.student_timesteps(n)
        theirs = scheduler_timesteps(scheduler, n)
        if theirs is not None and len(theirs) == len(ours) and all(abs(a - b) < 1e-9 for a, b in zip(ours, theirs)):
            out[n] = theirs
    return out


def pipeline_class(run):
    """The diffusers pipeline class that runs the run's student: ``ConsistencyModelPipeline`` for
    pixel-space UNet2DModel students (unconditional or class-conditional), ``StableDiffusionPipeline`` for
    latent text-conditioned UNet2DConditionModel students; anything else is refused in one line."""
    from diffusers import ConsistencyModelPipeline, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel

    teacher, network = run.method.teacher, run.method.trainable_roles()["student"]
    if isinstance(network, UNet2DModel) and teacher.vae is None:
        if getattr(network.time_embedding, "cond_proj", None) is not None:
            raise DiffDistillError(f"the {run.cfg.method} student takes a guidance embedding through a cond_proj that "
                                   "UNet2DModel does not record (fed by a forward hook), so plain diffusers cannot "
                                   "reproduce it; exporting it is not supported yet")
        return ConsistencyModelPipeline
    if isinstance(network, UNet2DConditionModel) and teacher.vae is not None and teacher.text_encoder is not None:
        return StableDiffusionPipeline
    kind = "latent" if teacher.vae is not None else "pixel-space"
    raise DiffDistillError(f"exporting a {kind} {type(network).__name__} student is not supported yet; pixel-space "
                           "UNet2DModel students and latent text-conditioned UNet2DConditionModel students export")


def build_pipeline(run, cls, network, scheduler):
    """An instance of ``cls`` (:func:`pipeline_class`) holding ``network`` and ``scheduler`` (and, for
    Stable Diffusion, the teacher's VAE, text encoder and tokenizer; no safety checker)."""
    teacher = run.method.teacher
    if cls.__name__ == "ConsistencyModelPipeline":
        return cls(unet=network, scheduler=scheduler)
    return cls(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=network,
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def export_run(run_dir: str | Path, output: str | Path, *, ema: bool | float = True, steps: int | None = None,
               checkpoint: str | None = None, overwrite: bool = False, fuse: bool = False) -> dict[str, Any]:
    """Write ``run_dir``'s student as a diffusers pipeline into ``output`` (a LoRA student: its adapter,
    and with ``fuse`` or when the pipeline cannot load adapters, the fused pipeline); returns what was
    exported."""
    from .trainers.lora import fused_copy, has_lora, lora_config, lora_state_dict
    from .trainers.saved_run import SavedRun

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise DiffDistillError(f"export directory {output} is not empty; pass --overwrite or choose another")
    run = SavedRun(run_dir, checkpoint)
    cls = pipeline_class(run)  # refuse what cannot be exported before any work
    default_steps = steps or run.default_steps
    max_steps = max(4, default_steps)
    teacher_config = _teacher_scheduler_config(run)
    scheduler = build_scheduler(teacher_config, run.method.student_sampler, max_steps)
    matches = matching_step_counts(run, scheduler, max_steps)
    if run.method.student_sampler in ("ode", "ddim") and default_steps not in matches:
        for spacing in ("leading", "linspace"):
            scheduler = build_scheduler(teacher_config, run.method.student_sampler, max_steps, spacing)
            matches = matching_step_counts(run, scheduler, max_steps)
            if default_steps in matches:
                break
    if default_steps not in matches:
        theirs = scheduler_timesteps(scheduler, default_steps)
        raise DiffDistillError(f"the {default_steps}-step student visits timesteps "
                               f"{[round(t, 3) for t in run.method.student_timesteps(default_steps)]}, which no "
                               f"diffusers scheduler setting reproduces (closest: {theirs}); diffusers schedulers "
                               "index integer timesteps")
    network, weights = run.student_network(ema)
    lora = has_lora(network)
    adapter = lora and hasattr(cls, "load_lora_weights")
    full = not adapter or fuse
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    if full:
        build_pipeline(run, cls, fused_copy(network) if lora else network, scheduler).save_pretrained(
            output, safe_serialization=True)
    if adapter:
        cls.save_lora_weights(output, unet_lora_layers=lora_state_dict(network), weight_name=LORA_FILE,
                              unet_lora_adapter_metadata=lora_config(network))
        if not full:
            scheduler.save_pretrained(output / "scheduler")
    info = {"run": str(run.run_dir), "method": run.cfg.method, "checkpoint": run.checkpoint.name,
            "train_step": run.step, "weights": weights, "sampler": run.method.student_sampler,
            "scheduler": type(scheduler).__name__, "default_steps": default_steps,
            "timesteps": {str(n): t for n, t in matches.items()},
            "num_classes": run.method.teacher.num_classes, "text": run.method.teacher.text_conditioned,
            "pipeline": cls.__name__, "teacher": run.cfg.teacher or "shipped digits teacher",
            "pipeline_default_steps": inspect.signature(cls.__call__).parameters["num_inference_steps"].default,
            "lora": {"adapter": LORA_FILE if adapter else None, "fused": full} if lora else None}
    info["grid"], info["grid_prompts"] = _sample_grid(run, network, default_steps, output / GRID_FILE)
    (output / CARD_FILE).write_text(model_card(info, run.run_dir))
    # what diffusers does not record, for `diffdistill eval --model` and `distill --teacher` (ignored by diffusers)
    meta = {k: v for k, v in run.method.teacher.meta.items() if k in ("num_classes", "null_class", "sample_shape")}
    meta["student"] = {"method": info["method"], "sampler": info["sampler"], "timesteps": info["timesteps"],
                       "default_steps": default_steps}
    (output / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return info


def _sample_grid(run, network, num_steps: int, path: Path) -> tuple[str, list[str] | None]:
    """A grid of the exported ``network``'s samples, seed 0: 4 per class (one class per column), 2 for each
    of the first 4 distinct training captions of a text student (one per column), or 16. Returns the
    file name and the prompts."""
    from .data import build_dataset
    from .grid import save_grid
    from .samplers import generate

    teacher, classes, prompts = run.method.teacher, run.method.teacher.num_classes, None
    if teacher.text_conditioned:
        try:
            prompts = list(dict.fromkeys(build_dataset(run.cfg.data).captions))[:4]
        except DiffDistillError:  # the training captions moved: the grid uses generic prompts
            prompts = ["a photo", "a painting"]
    num = 4 * classes if classes else 2 * len(prompts) if prompts else 16
    cond = teacher.cycled_conditioning(num, prompts)
    x = generate(run.method.student_denoiser(network), teacher.sample_shape, num, sampler=run.method.student_sampler,
                 timesteps=run.method.student_timesteps(num_steps), cond=cond, seed=0, batch_size=num)
    save_grid(teacher.decode(x), path, ncols=classes or (len(prompts) if prompts else None))
    return path.name, prompts


def usage(info: dict[str, Any], call_args: str) -> list[str]:
    """The model card's code block: load the pipeline (or the teacher, the LoRA adapter and the
    student's scheduler) and sample at the student's step count."""
    call = (f"images = pipe({call_args}, num_inference_steps={info['default_steps']}, "
            "generator=torch.Generator().manual_seed(0)).images")
    lora, scheduler, teacher = info.get("lora"), info["scheduler"], info["teacher"]
    if lora and lora["adapter"]:
        lines = ["```python", "import torch", f"from diffusers import DiffusionPipeline, {scheduler}", "",
                 "# the LoRA adapter on the teacher pipeline, with the student's scheduler",
                 f'pipe = DiffusionPipeline.from_pretrained("{teacher}")', 'pipe.load_lora_weights("PATH")',
                 f'pipe.scheduler = {scheduler}.from_pretrained("PATH", subfolder="scheduler")']
        if lora["fused"]:
            lines.append('# or the fused pipeline: pipe = DiffusionPipeline.from_pretrained("PATH")')
    else:
        lines = ["```python", "import torch", "from diffusers import DiffusionPipeline", "",
                 'pipe = DiffusionPipeline.from_pretrained("PATH")']
    return [*lines, call, "```", ""]


def model_card(info: dict[str, Any], run_dir: Path) -> str:
    """The export's README.md: what the student is, how to call it, and its metrics when evaluated."""
    counts = ", ".join(f"{n} ({info['timesteps'][n]})" for n in info["timesteps"])
    call_args = ('prompt=["a photo of a cat"], guidance_scale=1.0' if info["text"] else
                 "class_labels=[0, 1, 2, 3], batch_size=4" if info["num_classes"] else "batch_size=4")
    lines = [
        "---", "library_name: diffusers", "tags: [diffdistill, few-step, distillation]", "---", "",
        f"# {info['method']} student ({info['default_steps']}-step)", "",
        f"Distilled with diffdistill's `{info['method']}` method from teacher "
        f"`{info['teacher']}`; {info['weights']} weights of checkpoint `{info['checkpoint']}` "
        f"(training step {info['train_step']}).", "",
        f"Scheduler: `{info['scheduler']}`, configured so that `num_inference_steps=n` visits exactly the "
        f"student's timesteps for n = {counts}.", "",
        *usage(info, call_args),
        f"![{info['default_steps']}-step samples, seed 0]({info['grid']})", "",
        *([f"Columns: {', '.join(repr(p) for p in info['grid_prompts'])}.", ""] if info["grid_prompts"] else []),
        (f"Pass `num_inference_steps={info['default_steps']}`: the pipeline's own default is "
         f"{info['pipeline_default_steps']}." if info["pipeline_default_steps"] != info["default_steps"] else
         f"The pipeline's own default, {info['default_steps']} step(s), is the student's.")
        + (" Pass `guidance_scale=1.0`: the student is unguided, and the pipeline's default (7.5) would run "
           "classifier-free guidance on it." if info["text"] else ""), "",
    ]
    metrics_file = Path(run_dir) / "metrics.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        lines += [f"## Metrics ({m.get('feature_extractor')} features, {m.get('num_samples')} samples, seeds "
                  f"{m.get('seeds')})", "", "| model | steps | FID |", "|---|---|---|"]
        for who in ("student", "teacher"):
            for n, v in m.get(who, {}).get("fid", {}).items():
                lines.append(f"| {who} | {n} | {v:.4f} |")
        lines.append("")
    return "\n".join(lines)

