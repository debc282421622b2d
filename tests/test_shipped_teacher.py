"""The digits teacher that ships in the package: it loads, round-trips, and draws the requested digits."""

from __future__ import annotations

import json

import pytest
import torch

from diffdistill.denoiser import Conditioning
from diffdistill.eval.digits_classifier import load_digits_classifier
from diffdistill.pretrained import META_FILE, load_pretrained, save_pipeline_dir, shipped_teacher_path
from diffdistill.teacher import class_accuracy


@pytest.fixture(scope="module")
def teacher():
    return load_pretrained()


def test_shipped_teacher_is_small_and_complete(teacher):
    path = shipped_teacher_path()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 4 * 2**20, size  # a few MB at most
    assert teacher.num_classes == 10 and teacher.sample_shape == (1, 16, 16)
    meta = json.loads((path / META_FILE).read_text())
    # recorded by scripts/make_assets.py: 1000 Heun-50 samples, unguided and at w = 2
    assert min(meta["class_accuracy"].values()) >= 0.90


def test_shipped_teacher_draws_the_requested_class(teacher):
    """Heun, 50 steps, 200 samples (20 per class), no guidance: the classifier agrees ≥ 90 % of the time."""
    accuracy = class_accuracy(teacher, load_digits_classifier(), num=200, num_steps=50, guidance_scale=1.0,
                              seed=1, batch_size=200)
    assert accuracy >= 0.90, accuracy


def test_shipped_teacher_save_load_round_trip(teacher, tmp_path):
    den = teacher.denoiser
    save_pipeline_dir(tmp_path / "copy", den.network, den.schedule.scheduler_config | {"prediction_type": "v_prediction"},
                      teacher.meta)
    again = load_pretrained(tmp_path / "copy")
    assert again.meta == teacher.meta and again.denoiser.schedule == den.schedule
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(class_labels=torch.tensor([0, 3, 5, 9]))
    with torch.no_grad():
        torch.testing.assert_close(again.denoiser(x, 500.0, cond), den(x, 500.0, cond))
