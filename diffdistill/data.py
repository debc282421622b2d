"""Datasets and data loaders.

* :func:`load_digits` / :class:`DigitsDataset` — scikit-learn's 8x8 handwritten digits (ships offline),
  scaled to ``[-1, 1]`` and resized to any resolution, with a fixed train/test split.
* :class:`ImageFolderDataset` — any folder of images, optionally labelled by class subfolder.
* :func:`make_dataloader` / :func:`infinite_batches` — seeded loading and an endless batch stream.

Images are always float32 tensors of shape ``(C, R, R)`` in ``[-1, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .config import option
from .errors import ConfigError, DataError

DIGITS_TEST_SIZE = 360
"""Number of digits (out of 1797) in the fixed ``"test"`` split."""

IMAGE_EXTENSIONS = (".png", ".jpeg", ".jpg", ".webp", ".bmp")
"""File suffixes (case-insensitive) that :class:`ImageFolderDataset` treats as images."""

_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, UnidentifiedImageError, Image.DecompressionBombError)
"""What PIL raises on corrupt, truncated, unsupported or oversized files."""


def _digits_split_indices(split: str, total: int) -> np.ndarray:
    """Indices (ascending) of the digits in ``split``: a fixed permutation's last 360 are ``"test"``."""
    if split == "all":
        return np.arange(total)
    permutation = np.random.default_rng(0).permutation(total)
    if split == "train":
        return np.sort(permutation[:-DIGITS_TEST_SIZE])
    if split == "test":
        return np.sort(permutation[-DIGITS_TEST_SIZE:])
    raise DataError(f"unknown digits split {split!r} in diffdistill.data.load_digits; use 'train', 'test' or 'all'")


def load_digits(split: str = "train", resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The scikit-learn digits as ``(images, labels)``.

    ``images`` is float32 ``(N, 1, R, R)`` in ``[-1, 1]`` (``x / 8 - 1`` on the 8x8 grid, then bilinear
    resize, antialiased when shrinking); ``labels`` is int64 ``(N,)``. ``split`` is ``"train"`` (1437),
    ``"test"`` (360) or ``"all"`` (1797, in the original order).
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    if resolution < 1:
        raise DataError(f"digits resolution must be a positive integer, got {resolution} in diffdistill.data.load_digits")
    digits = sklearn_load_digits()
    index = _digits_split_indices(split, len(digits.target))
    images = torch.from_numpy(digits.images[index]).to(torch.float32).unsqueeze(1) / 8.0 - 1.0
    if resolution != images.shape[-1]:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear",
                               align_corners=False, antialias=resolution < images.shape[-1])
    labels = torch.from_numpy(digits.target[index]).to(torch.int64)
    return images.contiguous(), labels


class DigitsDataset(Dataset):
    """The scikit-learn digits (see :func:`load_digits`) as a dataset of ``(image, label)`` pairs."""

    num_classes = 10
    channels = 1

    def __init__(self, split: str = "train", resolution: int = 16) -> None:
        self.resolution = resolution
        self.images, self.labels = load_digits(split, resolution)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def _load_image(path: Path, mode: str) -> Image.Image:
    """Fully decode ``path`` in PIL ``mode``; a corrupt or truncated file raises :class:`DataError`."""
    allow_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except _IMAGE_ERRORS as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"corrupt or unreadable image {path} ({reason}); remove or replace the file") from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated


def _resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` (bicubic), then crop the centre square."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_width, new_height = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - resolution) // 2, (new_height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively), as ``(C, R, R)`` tensors in ``[-1, 1]`` with labels.

    Labels are the indices of the sorted class subfolder names (:attr:`classes`) when
    ``class_subfolders`` is true, or when it is ``None`` and every image lies directly in one of at
    least two subfolders of ``root``; otherwise every label is ``-1`` and :attr:`num_classes` is 0.

    With ``captions``, every image needs a UTF-8 ``.txt`` caption beside it (``cat.png`` → ``cat.txt``),
    kept in :attr:`captions`; an item's label is then its own index, so a batch's captions are
    ``captions[labels]``.
    """

    def __init__(self, root: str | Path, resolution: int, channels: int = 3,
                 class_subfolders: bool | None = None, captions: bool = False) -> None:
        self.root = Path(root)
        if channels not in (1, 3):
            raise DataError(f"image folder {self.root}: channels must be 1 or 3, got {channels}")
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a directory; check the data path")
        self.resolution = resolution
        self.channels = channels
        self.mode = "RGB" if channels == 3 else "L"
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.paths:
            raise DataError(f"image folder {self.root} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                            "add images or point to another folder")
        relative = [p.relative_to(self.root) for p in self.paths]
        folders = sorted({r.parts[0] for r in relative if len(r.parts) > 1})
        if class_subfolders is None:
            class_subfolders = len(folders) >= 2 and all(len(r.parts) == 2 for r in relative)
        if class_subfolders:
            loose = next((p for p, r in zip(self.paths, relative) if len(r.parts) == 1), None)
            if loose is not None:
                raise DataError(f"image {loose} is not inside a class subfolder of {self.root}; "
                                "move it into one or set class_subfolders to false")
            self.classes = folders
            index = {name: i for i, name in enumerate(folders)}
            self.labels = [index[r.parts[0]] for r in relative]
        else:
            self.classes = []
            self.labels = [-1] * len(self.paths)
        self.num_classes = len(self.classes)
        self.captions: list[str] | None = None
        if captions:
            missing = next((p for p in self.paths if not p.with_suffix(".txt").is_file()), None)
            if missing is not None:
                raise DataError(f"image {missing} has no caption file {missing.with_suffix('.txt').name}; write one "
                                "beside every image or set data.captions=false")
            self.captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in self.paths]
            self.classes, self.num_classes, self.labels = [], 0, list(range(len(self.paths)))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = _resize_center_crop(_load_image(self.paths[index], self.mode), self.resolution)
        array = np.asarray(image, dtype=np.float32).reshape(self.resolution, self.resolution, self.channels)
        tensor = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
        return tensor.contiguous(), self.labels[index]

    def verify(self) -> None:
        """Decode every image once; raise :class:`DataError` naming the first corrupt file."""
        for path in self.paths:
            _load_image(path, self.mode)


def make_dataloader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                    drop_last: bool = True, num_workers: int = 0) -> DataLoader:
    """A :class:`DataLoader` whose shuffling order is fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


def infinite_batches(loader: DataLoader) -> Iterator[Any]:
    """Yield batches from ``loader`` forever, starting a new epoch whenever one ends."""
    while True:
        count = 0
        for batch in loader:
            count += 1
            yield batch
        if count == 0:
            raise DataError(f"data loader yields no batches: {len(loader.dataset)} items with batch size "
                            f"{loader.batch_size} and drop_last; use a smaller batch size or more data")


@dataclass
class DataConfig:
    """Training images: the scikit-learn digits (offline) or a folder of images."""

    dataset: Literal["digits", "folder", "analytic"] = "digits"
    path: str | None = option(None, help="image folder (dataset=folder)")
    mixture: str = option("ring8", help="exact samples of this mixture (dataset=analytic; see diffdistill.toy)")
    resolution: int = option(16, min=8, max=1024)
    channels: int = option(1, min=1, max=4)
    captions: bool = option(False, help="read a .txt caption beside each image (dataset=folder): the prompts "
                                        "a text-conditioned teacher is conditioned on")

    def validate(self) -> None:
        if self.dataset == "folder" and not self.path:
            raise ValueError("dataset=folder needs path")


def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The dataset a :class:`DataConfig` names (digits: the ``split``; folders have no split)."""
    if cfg.dataset == "analytic":
        from .toy import MixtureDataset

        return MixtureDataset(cfg.mixture)
    if cfg.dataset == "digits":
        if cfg.channels != 1:
            raise ConfigError("the digits data set has one channel: set data.channels=1")
        return DigitsDataset(split, cfg.resolution)
    return ImageFolderDataset(cfg.path, cfg.resolution, channels=cfg.channels, captions=cfg.captions)


def random_batch(dataset: Dataset, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` items drawn uniformly with replacement; the whole draw is fixed by ``generator``'s
    state, so a training run that saves that state resumes on exactly the same batches."""
    index = torch.randint(len(dataset), (batch_size,), generator=generator)
    if hasattr(dataset, "images"):  # in-memory tensors (digits, mixtures)
        return dataset.images[index], dataset.labels[index]
    items = [dataset[int(i)] for i in index]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)
