"""``diffdistill teacher`` and ``diffdistill sample`` end to end on a tiny config, plus config round trips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffdistill.cli import main
from diffdistill.config import load_config, save_config
from diffdistill.pretrained import load_pretrained
from diffdistill.teacher import TeacherConfig

REPO = Path(__file__).resolve().parent.parent
TINY = ["train.steps=3", "train.batch_size=16", "train.warmup_steps=1", "data.resolution=8",
        "model.block_out_channels=8,16", "model.attention_levels=1", "model.norm_num_groups=4",
        "model.attention_head_dim=4"]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["teacher", "--config", str(REPO / "configs/teacher/digits.yaml"), "--output", str(out),
                 "--quiet", *TINY]) == 0
    return out


def test_teacher_command_writes_a_loadable_pipeline_and_its_resolved_config(tiny_teacher):
    for name in ["model_index.json", "diffdistill.json", "config.yaml", "unet/config.json",
                 "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]:
        assert (tiny_teacher / name).is_file(), name
    cfg = load_config(TeacherConfig, tiny_teacher / "config.yaml")
    assert cfg == load_config(TeacherConfig, REPO / "configs/teacher/digits.yaml", TINY)
    teacher = load_pretrained(tiny_teacher)
    assert teacher.num_classes == 10 and teacher.denoiser.null_class == 10
    assert teacher.sample_shape == (1, 8, 8) and teacher.denoiser.prediction_type == "v"
    assert next(teacher.denoiser.parameters()).dtype == torch.float32  # stored float16, loaded float32


def test_sample_command_writes_grid_and_tensors(tiny_teacher, tmp_path):
    grid, tensors = tmp_path / "grid.png", tmp_path / "x.safetensors"
    args = ["sample", "--teacher", str(tiny_teacher), "--sampler", "ddim", "--steps", "3", "--num", "6",
            "--classes", "2,7", "--seed", "4", "--quiet", "--output", str(grid), "--save-tensors", str(tensors)]
    assert main(args) == 0
    saved = load_file(tensors)
    assert saved["images"].shape == (6, 1, 8, 8) and saved["labels"].tolist() == [2, 2, 2, 7, 7, 7]
    assert grid.stat().st_size > 0
    assert main(args[:-1] + [str(tmp_path / "y.safetensors")]) == 0  # same seed, same images
    torch.testing.assert_close(load_file(tmp_path / "y.safetensors")["images"], saved["images"])


def test_teacher_refuses_non_empty_output_and_bad_keys(tiny_teacher, capsys):
    assert main(["teacher", "--output", str(tiny_teacher), "--quiet", *TINY]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["teacher", "--dry-run", "train.stpes=5"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train.steps'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["teacher", "--dry-run", "train.steps=-1"]) == 2
    assert main(["sample", "--teacher", str(tiny_teacher), "--classes", "12", "--quiet"]) == 2


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["teacher", "--dry-run", "train.steps=7", "guidance_scale=2"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "guidance_scale: 2.0" in out


def test_debug_flag_shows_traceback():
    proc = subprocess.run([sys.executable, "-m", "diffdistill.cli", "--debug", "sample", "--teacher", "/no/such/dir"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "does not exist" in proc.stderr


def test_teacher_config_round_trip(tmp_path):
    cfg = load_config(TeacherConfig, REPO / "configs/teacher/digits.yaml", ["train.lr=3e-4", "data.resolution=32"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(TeacherConfig, tmp_path / "c.yaml") == cfg
    assert load_config(TeacherConfig, None) == TeacherConfig()
