"""Feature extractors for FID, KID and precision/recall, behind one interface.

An extractor maps a batch of images ``(N, C, H, W)`` in ``[-1, 1]`` to features ``(N, D)`` (float32 on
the CPU). Every extractor first rounds the images to 8 bits (``to_uint8``): generated and real images
are scored as the PNG files a user would save, so a metric never rewards sub-quantisation detail.

- ``digits``: the shipped digits classifier's penultimate features (128-d). Offline, and the default for
  the digits data.
- ``inception-clean``, ``inception-legacy_tensorflow``: InceptionV3 pool features (2048-d) through
  clean-fid (Parmar et al. 2022): ``clean`` resizes to 299 with PIL bicubic in float, ``legacy_tensorflow``
  resizes inside the TF-ported network as the original TTUR code did (the numbers most papers quote).
  The weights are not bundled: clean-fid's TorchScript file (``inception-2015-12-05.pt``) must exist
  locally (clean-fid's own download folder, or ``--inception-weights PATH``); a missing file is one error
  line saying where to put it. clean-fid's ``legacy_pytorch`` mode is not offered: its loader unpickles a
  ``.pth`` with ``weights_only=False``, which diffdistill never does.

Grey images are repeated to three channels for Inception; colour images are averaged to one channel for
the digits classifier.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, ModelLoadError

CLEANFID_INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                          "inception-2015-12-05.pt")
CLEANFID_INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_MODES = ("clean", "legacy_tensorflow")


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` images → float values in ``{0, …, 255}`` (the 8-bit image a PNG would hold)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256 (what a reference cache is keyed on, beside the name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class FeatureExtractor:
    """``extractor(images) → (N, dim)`` features; ``name`` labels metrics.json, ``name`` and ``weights_digest``
    (the hash of the network's weights file) key the cached reference statistics."""

    name: str
    dim: int
    weights_digest: str = ""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DigitsFeatures(FeatureExtractor):
    """Penultimate features of a :class:`~diffdistill.eval.digits_classifier.DigitsClassifier`."""

    def __init__(self, classifier_path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        from importlib.resources import as_file, files

        from .digits_classifier import SHIPPED_CLASSIFIER, load_digits_classifier

        self.model = load_digits_classifier(classifier_path, device=device)
        with as_file(files("diffdistill") / "assets" / SHIPPED_CLASSIFIER) as shipped:
            self.weights_digest = file_digest(classifier_path or shipped)
        self.device = device
        self.resolution = self.model.config["resolution"]
        self.dim = self.model.config["feature_dim"]
        self.name = "digits" if classifier_path is None else f"digits:{Path(classifier_path).name}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8_levels(images) / 127.5 - 1
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.resolution)
        return self.model.features(x.to(self.device)).float().cpu()


def _cleanfid_weights(weights: str | Path | None) -> Path:
    """The clean-fid TorchScript Inception file: ``weights`` (a file or its folder), else clean-fid's own
    download location; one error line when it is absent."""
    default_dir = Path("./" if os.name == "nt" else "/tmp")  # clean-fid's hard-coded download folder
    path = Path(weights) if weights else default_dir / CLEANFID_INCEPTION_FILE
    if path.is_dir():
        path = path / CLEANFID_INCEPTION_FILE
    if not path.is_file():
        raise ModelLoadError(f"InceptionV3 weights for FID not found at {path}: download {CLEANFID_INCEPTION_URL} "
                             f"there (or pass --inception-weights PATH to a local copy), or use --features digits")
    if path.name != CLEANFID_INCEPTION_FILE:
        raise ModelLoadError(f"clean-fid loads the Inception file only under its own name: rename {path} to "
                             f"{CLEANFID_INCEPTION_FILE}")
    return path


class InceptionFeatures(FeatureExtractor):
    """clean-fid's InceptionV3 in one of :data:`INCEPTION_MODES` (see the module docstring)."""

    dim = 2048

    def __init__(self, mode: str = "clean", weights: str | Path | None = None,
                 device: str | torch.device = "cpu") -> None:
        if mode not in INCEPTION_MODES:
            raise ConfigError(f"unknown clean-fid mode {mode!r}; choose one of {', '.join(INCEPTION_MODES)}")
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.mode, self.device, self.name = mode, torch.device(device), f"inception-{mode}"
        path = _cleanfid_weights(weights)
        self.weights_digest = file_digest(path)
        try:
            net = InceptionV3W(str(path.parent), download=False, resize_inside=mode == "legacy_tensorflow")
        except RuntimeError as exc:
            raise ModelLoadError(f"{path} is not clean-fid's TorchScript Inception ({str(exc).splitlines()[0]}); "
                                 f"download it again from {CLEANFID_INCEPTION_URL}") from exc
        self.model = net.to(self.device).eval()
        self.resize = build_resizer(mode)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8_levels(images)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.mode != "legacy_tensorflow":  # clean-fid resizes per image, channels last, in numpy
            x = torch.stack([torch.from_numpy(np.ascontiguousarray(self.resize(img.permute(1, 2, 0).numpy())))
                             .permute(2, 0, 1) for img in x]).float()
        return self.model(x.to(self.device)).float().cpu()


FEATURE_EXTRACTORS = ("digits", *(f"inception-{m}" for m in INCEPTION_MODES))


def get_feature_extractor(name: str, *, weights: str | Path | None = None,
                          device: str | torch.device = "cpu") -> FeatureExtractor:
    """The extractor called ``name`` (one of :data:`FEATURE_EXTRACTORS`); ``weights`` overrides where its
    network comes from (a digits classifier file, or a local Inception file)."""
    if name == "digits":
        return DigitsFeatures(weights, device=device)
    if name.startswith("inception-") and name.removeprefix("inception-") in INCEPTION_MODES:
        return InceptionFeatures(name.removeprefix("inception-"), weights, device=device)
    raise ConfigError(f"unknown feature extractor {name!r}; choose one of {', '.join(FEATURE_EXTRACTORS)}")
