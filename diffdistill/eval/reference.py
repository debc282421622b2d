"""Reference (real-data) features, computed once per dataset + split + resolution + extractor and cached.

The cache is an ``.npz`` holding the float32 features (KID and precision/recall need them, not just the
Gaussian fit), their float64 mean and covariance (for FID), and a JSON description of what they were
computed from. Its name spells that description out (e.g. ``digits-train-16px-digits-3f2a9c1e.npz``; the
hash covers the whole data config, an image folder's absolute path, file count and newest modification
time, the feature network's weights hash and the image cap), so two evaluations that should share statistics
do, and two that should not cannot. The cache folder is ``$DIFFDISTILL_CACHE/reference`` (default
``~/.cache/diffdistill/reference``); delete a file (or pass ``refresh=True``) to recompute it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import to_dict
from ..data import DataConfig, build_dataset
from ..pretrained import cache_root
from .features import FeatureExtractor
from .frechet import feature_statistics


def cache_dir() -> Path:
    """Where reference statistics live (``$DIFFDISTILL_CACHE/reference``, else ``~/.cache/diffdistill/reference``)."""
    return cache_root() / "reference"


@dataclass
class Reference:
    """Real-data features and their Gaussian fit."""

    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    description: dict
    path: Path | None = None

    @property
    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma


def _describe(data: DataConfig, split: str, extractor: FeatureExtractor, max_images: int | None) -> dict:
    """What the features depend on: the data config (a folder by absolute path, file count and newest
    modification time), the split, the extractor and its weights' hash, the image cap."""
    description = {"data": to_dict(data), "split": split, "extractor": extractor.name,
                   "weights_digest": extractor.weights_digest, "max_images": max_images}
    if data.dataset == "folder" and data.path:
        root = Path(data.path).resolve()
        files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
        description["data"]["path"] = str(root)
        description["folder"] = {"files": len(files), "newest_mtime": max((p.stat().st_mtime for p in files), default=0)}
    return description


def _path_for(data: DataConfig, split: str, extractor: FeatureExtractor, description: dict) -> Path:
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:8]
    name = Path(data.path).name if data.dataset == "folder" and data.path else data.dataset
    return cache_dir() / f"{name}-{split}-{data.resolution}px-{extractor.name.replace(':', '_')}-{digest}.npz"


def reference_path(data: DataConfig, split: str, extractor: FeatureExtractor, max_images: int | None = None) -> Path:
    """The cache file for this dataset, split, resolution and extractor."""
    return _path_for(data, split, extractor, _describe(data, split, extractor, max_images))


def load_reference(data: DataConfig, extractor: FeatureExtractor, *, split: str = "train",
                   max_images: int | None = None, batch_size: int = 256, refresh: bool = False,
                   progress: bool = True) -> Reference:
    """The cached reference for ``data`` (its ``split``) under ``extractor``, computing and caching it first
    when absent. ``max_images`` caps the images used (a seeded random subset)."""
    description = _describe(data, split, extractor, max_images)  # walks an image folder once
    path = _path_for(data, split, extractor, description)
    if path.is_file() and not refresh:
        with np.load(path) as f:
            return Reference(f["features"], f["mu"], f["sigma"], json.loads(str(f["description"])), path)
    dataset = build_dataset(data, split)
    index = torch.arange(len(dataset))
    if max_images is not None and max_images < len(dataset):
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:max_images].sort().values
    chunks = []
    for batch in tqdm(index.split(batch_size), desc=f"reference features ({extractor.name})", disable=not progress,
                      leave=False):
        if hasattr(dataset, "images"):
            images = dataset.images[batch]
        else:
            images = torch.stack([dataset[int(i)][0] for i in batch])
        chunks.append(extractor(images))
    features = torch.cat(chunks).numpy().astype(np.float32)
    mu, sigma = feature_statistics(features)
    description = description | {"num_images": len(features)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, features=features, mu=mu, sigma=sigma, description=json.dumps(description))
    os.replace(tmp, path)
    return Reference(features, mu, sigma, description, path)
