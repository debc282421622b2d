"""Tests for the shipped digits feature classifier and its save/load."""

import pytest
import torch

from diffdistill.data import load_digits
from diffdistill.errors import ModelLoadError
from diffdistill.eval.digits_classifier import (
    DigitsClassifier,
    classifier_metadata,
    load_digits_classifier,
    save_digits_classifier,
)


@pytest.fixture(scope="module")
def shipped() -> DigitsClassifier:
    return load_digits_classifier()


def test_shipped_classifier_loads_frozen(shipped):
    assert not shipped.training
    assert not any(p.requires_grad for p in shipped.parameters())
    assert shipped.config["resolution"] == 16


def test_shipped_accuracy_is_recorded_and_reproduced(shipped):
    recorded = classifier_metadata()["test_accuracy"]
    assert recorded >= 0.97
    images, labels = load_digits("test", 16)
    with torch.no_grad():
        accuracy = (shipped(images).argmax(dim=1) == labels).double().mean().item()
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(recorded, abs=1e-9)


def test_features_shape(shipped):
    images, _ = load_digits("test", 16)
    with torch.no_grad():
        features = shipped.features(images[:5])
        single = shipped.features(images[:1])
    assert features.shape == (5, 128)
    assert torch.allclose(features[:1], single, atol=1e-5)  # no batch statistics


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitsClassifier(resolution=8, width=8, feature_dim=16).eval()
    path = tmp_path / "tiny.safetensors"
    save_digits_classifier(model, path, test_accuracy=0.5)
    loaded = load_digits_classifier(path)
    assert loaded.config == model.config
    assert classifier_metadata(path) == {"config": model.config, "test_accuracy": 0.5}
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.features(x), model.features(x))


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="make_assets.py --classifier"):
        load_digits_classifier(tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="missing.safetensors"):
        classifier_metadata(tmp_path / "missing.safetensors")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="junk.safetensors"):
        load_digits_classifier(path)
