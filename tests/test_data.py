"""Tests for diffdistill.data: digits, image folders and loaders."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffdistill.data import (
    DigitsDataset,
    ImageFolderDataset,
    infinite_batches,
    load_digits,
    make_dataloader,
)
from diffdistill.errors import DataError


def _write_image(path: Path, size: tuple[int, int] = (20, 12), seed: int = 0) -> None:
    """Write a random RGB image of (width, height) ``size``; the suffix picks the format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("resolution", [8, 16])
def test_digits_shapes_ranges_labels(resolution):
    images, labels = load_digits("all", resolution)
    assert images.shape == (1797, 1, resolution, resolution)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() == -1 and images.max() > 0.9
    assert set(labels.tolist()) == set(range(10))


def test_digits_resolution_8_is_the_raw_grid():
    from sklearn.datasets import load_digits as sklearn_load_digits

    images, _ = load_digits("all", 8)
    raw = torch.from_numpy(sklearn_load_digits().images).float()
    assert torch.allclose(images[:, 0], raw / 8 - 1)


def test_digits_splits_are_fixed_and_disjoint():
    train_images, train_labels = load_digits("train", 8)
    test_images, test_labels = load_digits("test", 8)
    all_images, _ = load_digits("all", 8)
    assert len(train_labels) + len(test_labels) == 1797 and len(test_labels) == 360
    rows = {tuple(row.tolist()) for row in all_images.flatten(1)}
    train_rows = {tuple(row.tolist()) for row in train_images.flatten(1)}
    test_rows = {tuple(row.tolist()) for row in test_images.flatten(1)}
    assert train_rows | test_rows == rows
    duplicates = len(all_images) - len(rows)  # the digits set holds a few identical images
    assert len(train_rows & test_rows) <= duplicates
    again_images, again_labels = load_digits("test", 8)
    assert torch.equal(again_images, test_images) and torch.equal(again_labels, test_labels)


def test_digits_unknown_split():
    with pytest.raises(DataError, match="validation"):
        load_digits("validation")


def test_digits_dataset():
    dataset = DigitsDataset("test", 16)
    image, label = dataset[0]
    assert len(dataset) == 360 and image.shape == (1, 16, 16) and 0 <= label < 10
    assert dataset.num_classes == 10 and dataset.channels == 1 and dataset.resolution == 16


def test_image_folder_rgb_and_grayscale(tmp_path):
    _write_image(tmp_path / "a.png")
    _write_image(tmp_path / "sub" / "b.jpg", seed=1)
    rgb = ImageFolderDataset(tmp_path, resolution=8)
    assert len(rgb) == 2 and rgb.num_classes == 0 and rgb.classes == []
    for index in range(2):
        image, label = rgb[index]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == -1
        assert image.min() >= -1 and image.max() <= 1
    gray = ImageFolderDataset(tmp_path, resolution=8, channels=1)
    assert gray[0][0].shape == (1, 8, 8)
    rgb.verify()


def test_image_folder_center_crop_of_non_square(tmp_path):
    left, middle, right = (np.full((10, 10, 3), value, np.uint8) for value in (0, 255, 0))
    Image.fromarray(np.concatenate([left, middle, right], axis=1)).save(tmp_path / "wide.png")
    image, _ = ImageFolderDataset(tmp_path, resolution=10)[0]
    assert image.shape == (3, 10, 10)
    assert torch.allclose(image, torch.ones_like(image), atol=1e-6)  # only the white middle survives
    for size in [(37, 23), (23, 37)]:
        _write_image(tmp_path / "odd" / f"{size[0]}x{size[1]}.png", size=size)
    odd = ImageFolderDataset(tmp_path / "odd", resolution=8, channels=1)
    assert [odd[i][0].shape for i in range(2)] == [(1, 8, 8), (1, 8, 8)]


def test_image_folder_class_subfolders(tmp_path):
    for name, seed in [("cat", 0), ("dog", 1), ("cat", 2)]:
        _write_image(tmp_path / name / f"{seed}.png", seed=seed)
    dataset = ImageFolderDataset(tmp_path, resolution=4)
    assert dataset.classes == ["cat", "dog"] and dataset.num_classes == 2
    assert sorted(dataset[i][1] for i in range(len(dataset))) == [0, 0, 1]
    unlabelled = ImageFolderDataset(tmp_path, resolution=4, class_subfolders=False)
    assert unlabelled.num_classes == 0 and {unlabelled[i][1] for i in range(3)} == {-1}


def test_image_folder_single_subfolder_is_unlabelled(tmp_path):
    _write_image(tmp_path / "only" / "a.png")
    assert ImageFolderDataset(tmp_path, resolution=4).num_classes == 0


def test_image_folder_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", resolution=8)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no images .*\.png"):
        ImageFolderDataset(tmp_path, resolution=8)


def test_image_folder_truncated_png(tmp_path):
    _write_image(tmp_path / "good.png")
    _write_image(tmp_path / "broken.png", size=(64, 64))
    data = (tmp_path / "broken.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    broken = [p.name for p in dataset.paths].index("broken.png")
    with pytest.raises(DataError, match="broken.png") as info:
        dataset[broken]
    assert "\n" not in str(info.value) and "remove or replace" in str(info.value)
    with pytest.raises(DataError, match="broken.png"):
        dataset.verify()


def test_image_folder_non_image_file(tmp_path):
    (tmp_path / "x.png").write_text("this is not a png")
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    with pytest.raises(DataError, match="x.png"):
        dataset[0]
    with pytest.raises(DataError, match="x.png"):
        dataset.verify()


def test_make_dataloader_is_deterministic():
    dataset = DigitsDataset("test", 8)
    first = [labels for _, labels in make_dataloader(dataset, batch_size=32, seed=3)]
    second = [labels for _, labels in make_dataloader(dataset, batch_size=32, seed=3)]
    other = [labels for _, labels in make_dataloader(dataset, batch_size=32, seed=4)]
    assert len(first) == 360 // 32
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_infinite_batches_cycles_epochs():
    loader = make_dataloader(DigitsDataset("test", 8), batch_size=100)
    stream = infinite_batches(loader)
    batches = [next(stream) for _ in range(7)]  # 3 batches per epoch
    assert all(images.shape == (100, 1, 8, 8) for images, _ in batches)


def test_infinite_batches_with_no_batches():
    loader = make_dataloader(DigitsDataset("test", 8), batch_size=1000)
    with pytest.raises(DataError, match="no batches"):
        next(infinite_batches(loader))
