"""`diffdistill export`: the exported pipeline, loaded by plain diffusers in a process that never imports
diffdistill, reproduces `diffdistill sample --run` of the same run, seed and step count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffdistill.cli import main

REPO = Path(__file__).resolve().parent.parent

PLAIN_DIFFUSERS = r'''
import sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
path, out, labels, seed = sys.argv[1], sys.argv[2], [int(c) for c in sys.argv[3].split(",")], int(sys.argv[4])
pipe = DiffusionPipeline.from_pretrained(path)
pipe.set_progress_bar_config(disable=True)
images = {}
for n in (1, 2, 4):
    images[str(n)] = pipe(batch_size=len(labels), class_labels=labels, num_inference_steps=n, output_type="pt",
                          generator=torch.Generator().manual_seed(seed)).images.contiguous()
assert "diffdistill" not in sys.modules
save_file(images, out)
print(type(pipe).__name__, type(pipe.scheduler).__name__)
'''


def tiny_run(tmp_path: Path, config: str, *overrides: str, steps: int = 2) -> Path:
    run = tmp_path / Path(config).stem
    assert main(["distill", "--config", str(REPO / "configs/digits" / config), "--output", str(run), "--max-steps",
                 str(steps), "--quiet", "train.batch_size=4", "train.sample_every=0", *overrides]) == 0
    return run


def run_plain_diffusers(export: Path, out: Path, labels: list[int], seed: int) -> str:
    script = out.with_suffix(".py")
    script.write_text(PLAIN_DIFFUSERS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), str(export), str(out), ",".join(map(str, labels)), str(seed)],
                            capture_output=True, text=True, env=env, cwd=out.parent, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("config, overrides, scheduler", [
    ("dmd2_4step.yaml", ["critic.updates=1"], "LCMScheduler"),
    ("progressive.yaml", ["progressive.initial_steps=4"], "DDIMScheduler"),
    # a LoRA student: ConsistencyModelPipeline cannot load adapters, so the export is the fused pipeline
    ("dmd2_4step.yaml", ["critic.updates=1", "student.lora_rank=4", "student_optim.lr=0.01"], "LCMScheduler"),
], ids=["dmd2_4step", "progressive", "dmd2_4step_lora"])
def test_export_reproduces_the_student_in_plain_diffusers(tmp_path, config, overrides, scheduler):
    run = tiny_run(tmp_path, config, *overrides)
    export = tmp_path / "export"
    assert main(["export", "--run", str(run), "--output", str(export), "--steps", "4"]) == 0
    assert not (export / "pytorch_lora_weights.safetensors").exists()
    card = (export / "README.md").read_text()
    assert "from_pretrained" in card and "num_inference_steps=4" in card and "](samples.png)" in card
    assert (export / "samples.png").stat().st_size > 0
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyModelPipeline" and index["scheduler"] == ["diffusers", scheduler]
    classes, seed = [0, 3, 7], 5
    labels = [c for c in classes for _ in range(2)]  # `sample --classes` repeats each class per column
    stdout = run_plain_diffusers(export, tmp_path / "plain.safetensors", labels, seed)
    assert scheduler in stdout
    theirs = load_file(tmp_path / "plain.safetensors")
    for n in (1, 2, 4):
        ours_file = tmp_path / f"ours_{n}.safetensors"
        assert main(["sample", "--run", str(run), "--steps", str(n), "--classes", "0,3,7", "--num", "6", "--seed",
                     str(seed), "--quiet", "--output", str(tmp_path / f"ours_{n}.png"),
                     "--save-tensors", str(ours_file)]) == 0
        ours = load_file(ours_file)
        assert ours["labels"].tolist() == labels
        ours01 = (ours["images"] / 2 + 0.5).clamp(0, 1)
        assert (ours01 - theirs[str(n)]).abs().max().item() <= 1e-5, n


def test_export_refusals_change_nothing(tmp_path, capsys):
    run = tiny_run(tmp_path, "dmd2.yaml", "critic.updates=1", steps=1)
    shutil.rmtree(run / "checkpoints")  # a run that has not reached its first checkpoint
    out = tmp_path / "out"
    assert main(["export", "--run", str(run), "--output", str(out)]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not out.exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    run2 = tiny_run(tmp_path / "b", "dmd2.yaml", "critic.updates=1", steps=1)
    assert main(["export", "--run", str(run2), "--output", str(full)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and err.count("\n") == 1
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert main(["export", "--run", str(run2), "--output", str(full), "--overwrite"]) == 0
    assert (full / "model_index.json").is_file() and not (full / "keep.txt").exists()


def test_lcm_student_with_guidance_embedding_is_refused(tmp_path, capsys):
    run = tiny_run(tmp_path, "lcm.yaml", steps=1)
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "out")]) == 2
    assert "guidance embedding" in capsys.readouterr().err


def test_sample_run_defaults_to_the_students_steps(tmp_path, capsys):
    run = tiny_run(tmp_path, "dmd2_4step.yaml", "critic.updates=1", steps=1)
    assert main(["sample", "--run", str(run), "--num", "10", "--quiet", "--output", str(tmp_path / "g.png")]) == 0
    assert "(sde, 4 steps)" in capsys.readouterr().out


def test_eval_reads_an_export_as_the_student_it_is(tmp_path, monkeypatch):
    """`eval --model EXPORT` samples the export with the student's sampler and timesteps: same FID as
    `eval --run` of the run it came from (same weights, noise, labels and reference)."""
    monkeypatch.setenv("DIFFDISTILL_CACHE", str(tmp_path / "cache"))
    run = tiny_run(tmp_path, "dmd2_4step.yaml", "critic.updates=1", steps=1)
    export = tmp_path / "export"
    assert main(["export", "--run", str(run), "--output", str(export)]) == 0
    meta = json.loads((export / "diffdistill.json").read_text())
    assert meta["num_classes"] == 10 and meta["student"]["timesteps"]["4"] == [999, 749, 499, 249]
    common = ["--steps", "1,4", "--num", "140", "--quiet"]
    assert main(["eval", "--model", str(export), *common, "--output", str(tmp_path / "m")]) == 0
    assert main(["eval", "--run", str(run), *common, "--teacher-steps", "0", "--output", str(tmp_path / "r")]) == 0
    from_export = json.loads((tmp_path / "m" / "metrics.json").read_text())["model"]
    from_run = json.loads((tmp_path / "r" / "metrics.json").read_text())["student"]
    assert from_export["timesteps"] == from_run["timesteps"]
    for n in ("1", "4"):
        assert from_export["fid"][n] == pytest.approx(from_run["fid"][n], rel=1e-6)
    assert main(["eval", "--model", str(export), "--steps", "3", "--num", "140", "--quiet",
                 "--output", str(tmp_path / "x")]) == 2


def test_distill_takes_an_exported_pipeline_as_its_teacher(tmp_path):
    run = tiny_run(tmp_path, "dmd2_4step.yaml", "critic.updates=1", steps=1)
    export = tmp_path / "export"
    assert main(["export", "--run", str(run), "--output", str(export)]) == 0
    second = tiny_run(tmp_path / "second", "dmd2.yaml", "critic.updates=1", f"teacher={export}", steps=1)
    saved = (second / "config.yaml").read_text()
    assert str(export) in saved and (second / "checkpoints").is_dir()


PLAIN_DIFFUSERS_TEXT = r'''
import json, sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
path, out, prompts, seed = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
pipe = DiffusionPipeline.from_pretrained(path)
pipe.set_progress_bar_config(disable=True)
images = {str(n): pipe(prompt=prompts, num_inference_steps=n, guidance_scale=1.0, output_type="pt",
                       generator=torch.Generator().manual_seed(seed)).images.contiguous() for n in (1, 2, 4)}
assert "diffdistill" not in sys.modules
save_file(images, out)
print(type(pipe).__name__, type(pipe.scheduler).__name__)
'''


def test_text_conditioned_latent_student_exports_as_stable_diffusion(tmp_path):
    from conftest import captioned_folder, tiny_latent_text_pipeline

    from diffdistill.samplers import generate
    from diffdistill.trainers.saved_run import SavedRun

    teacher = tiny_latent_text_pipeline(tmp_path / "teacher")
    data = captioned_folder(tmp_path / "data")
    run = tiny_run(tmp_path, "dmd2_4step.yaml", "critic.updates=1", f"teacher={teacher}", "data.dataset=folder",
                   f"data.path={data}", "data.channels=3", "data.captions=true", steps=2)
    export = tmp_path / "export"
    assert main(["export", "--run", str(run), "--output", str(export)]) == 0
    card = (export / "README.md").read_text()
    assert "guidance_scale=1.0" in card and "](samples.png)" in card and "Columns: '" in card
    assert (export / "samples.png").stat().st_size > 0
    prompts, seed = ["two cats", "a zero", "two cats"], 4
    script = tmp_path / "plain_text.py"
    script.write_text(PLAIN_DIFFUSERS_TEXT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), str(export), str(tmp_path / "plain.safetensors"),
                             json.dumps(prompts), str(seed)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "StableDiffusionPipeline LCMScheduler" in result.stdout
    theirs = load_file(tmp_path / "plain.safetensors")
    saved = SavedRun(run)  # the student exactly as `sample --run` and `eval --run` sample it
    teacher, student = saved.method.teacher, saved.student()
    for n in (1, 2, 4):
        x = generate(student, teacher.sample_shape, len(prompts), sampler=saved.method.student_sampler,
                     timesteps=saved.method.student_timesteps(n), cond=teacher.encode_prompts(prompts), seed=seed,
                     batch_size=len(prompts))
        ours = (teacher.decode(x) / 2 + 0.5).clamp(0, 1)
        assert ours.shape == theirs[str(n)].shape == (3, 3, 16, 16)
        assert (ours - theirs[str(n)]).abs().max().item() <= 1e-5, n
    # `diffdistill sample --run` with prompts draws the same images
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a zero\n")
    assert main(["sample", "--run", str(run), "--prompt", "two cats", "--prompts", str(prompt_file), "--num", "3",
                 "--steps", "2", "--seed", str(seed), "--quiet", "--output", str(tmp_path / "s.png"),
                 "--save-tensors", str(tmp_path / "s.safetensors")]) == 0
    sampled = (load_file(tmp_path / "s.safetensors")["images"] / 2 + 0.5).clamp(0, 1)
    assert (sampled - theirs["2"]).abs().max().item() <= 1e-5


PLAIN_DIFFUSERS_LORA = r'''
import json, sys, torch
from diffusers import DiffusionPipeline, LCMScheduler
from safetensors.torch import save_file
teacher, export, out, prompts, seed = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
adapter = DiffusionPipeline.from_pretrained(teacher)
adapter.load_lora_weights(export)
adapter.scheduler = LCMScheduler.from_pretrained(export, subfolder="scheduler")
fused = DiffusionPipeline.from_pretrained(export)
images = {}
for name, pipe in (("adapter", adapter), ("fused", fused)):
    pipe.set_progress_bar_config(disable=True)
    for n in (1, 2, 4):
        images[f"{name}_{n}"] = pipe(prompt=prompts, num_inference_steps=n, guidance_scale=1.0, output_type="pt",
                                     generator=torch.Generator().manual_seed(seed)).images.contiguous()
assert "diffdistill" not in sys.modules
save_file(images, out)
print(type(adapter.unet.down_blocks[0].resnets[0].conv1).__module__, type(fused.unet.down_blocks[0].resnets[0].conv1).__module__)
'''


def test_lora_text_student_loads_through_load_lora_weights(tmp_path):
    """A LoRA student (student.lora_rank > 0) of a Stable Diffusion-layout teacher: its adapter, loaded by
    plain diffusers' `load_lora_weights` into the teacher pipeline with the exported scheduler, and the
    `--fuse`d pipeline both reproduce the student's samples at 1, 2 and 4 steps."""
    from conftest import captioned_folder, tiny_latent_text_pipeline

    from diffdistill.samplers import generate
    from diffdistill.trainers.saved_run import SavedRun

    teacher = tiny_latent_text_pipeline(tmp_path / "teacher")
    data = captioned_folder(tmp_path / "data")
    run = tiny_run(tmp_path, "dmd2_4step.yaml", "critic.updates=1", f"teacher={teacher}", "data.dataset=folder",
                   f"data.path={data}", "data.channels=3", "data.captions=true", "student.lora_rank=4",
                   "student_optim.lr=0.01", steps=2)
    saved = SavedRun(run)
    student_state = load_file(saved.checkpoint / "student.safetensors")
    assert student_state and all(".lora_" in k for k in student_state)  # adapters only, never the teacher
    assert any(v.abs().max() > 0 for k, v in student_state.items() if ".lora_B." in k)  # B left zero: trained
    export = tmp_path / "export"
    assert main(["export", "--run", str(run), "--output", str(export), "--fuse"]) == 0
    assert (export / "pytorch_lora_weights.safetensors").is_file() and (export / "model_index.json").is_file()
    assert "load_lora_weights" in (export / "README.md").read_text()
    prompts, seed = ["two cats", "a zero"], 3
    script = tmp_path / "plain_lora.py"
    script.write_text(PLAIN_DIFFUSERS_LORA)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), str(teacher), str(export), str(tmp_path / "plain.safetensors"),
                             json.dumps(prompts), str(seed)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    adapter_module, fused_module = result.stdout.split()
    assert adapter_module.startswith("peft.") and fused_module.startswith("torch.")
    theirs = load_file(tmp_path / "plain.safetensors")
    teacher_model, student = saved.method.teacher, saved.student()
    for n in (1, 2, 4):
        x = generate(student, teacher_model.sample_shape, len(prompts), sampler=saved.method.student_sampler,
                     timesteps=saved.method.student_timesteps(n), cond=teacher_model.encode_prompts(prompts),
                     seed=seed, batch_size=len(prompts))
        ours = (teacher_model.decode(x) / 2 + 0.5).clamp(0, 1)
        for how in ("adapter", "fused"):
            assert (ours - theirs[f"{how}_{n}"]).abs().max().item() <= 1e-5, (how, n)
    # the adapter matters: the teacher network under the same sampler gives other images
    x = generate(saved.method.like_teacher(teacher_model.network), teacher_model.sample_shape, len(prompts),
                 sampler=saved.method.student_sampler, timesteps=saved.method.student_timesteps(1),
                 cond=teacher_model.encode_prompts(prompts), seed=seed, batch_size=len(prompts))
    assert ((teacher_model.decode(x) / 2 + 0.5).clamp(0, 1) - theirs["adapter_1"]).abs().max().item() > 1e-3
