"""A small CNN classifier for the scikit-learn digits, used as the FID feature extractor on digits.

:class:`DigitsClassifier` maps ``(N, 1, R, R)`` images in ``[-1, 1]`` to 10 logits; its penultimate
activations (:meth:`DigitsClassifier.features`) are the features that digits FID compares. It has no
batch normalisation, so features of an image do not depend on the rest of its batch.

:func:`train_digits_classifier` trains one from scratch in about a minute on a CPU (with augmentation, so
it also reads generated digits). The package ships a trained copy in
``diffdistill/assets/digits_classifier.safetensors`` (made by ``python scripts/make_assets.py
--classifier``) that :func:`load_digits_classifier` loads.
"""

from __future__ import annotations

import json
import math
import time
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..data import load_digits
from ..errors import ModelLoadError

SHIPPED_CLASSIFIER = "digits_classifier.safetensors"
"""File name of the trained classifier inside ``diffdistill/assets``."""

_MAKE_HINT = "run `python scripts/make_assets.py --classifier` to create it"


class DigitsClassifier(nn.Module):
    """Two 3x3 convs, pool, two convs, pool, one conv, pool, linear to ``feature_dim`` features, linear head.

    Every conv is followed by GroupNorm (batch-independent) and GELU; pools halve the resolution, which
    must therefore be divisible by 8. ``width`` is the channel count of the first stage (then doubled).
    """

    def __init__(self, resolution: int = 16, width: int = 32, feature_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        if resolution % 8:
            raise ValueError(f"DigitsClassifier resolution must be divisible by 8, got {resolution}")
        self.config = {"resolution": resolution, "width": width, "feature_dim": feature_dim,
                       "num_classes": num_classes}

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.GELU()]

        self.body = nn.Sequential(
            *block(1, width), *block(width, width), nn.AvgPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.AvgPool2d(2),
            *block(2 * width, 2 * width), nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (resolution // 8) ** 2, feature_dim), nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``(N, feature_dim)`` (after the nonlinearity)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)``."""
        return self.head(self.features(x))


def _augment(x: torch.Tensor, generator: torch.Generator, max_shift_px: float = 1.5,
             max_rotation_deg: float = 10.0, max_scale: float = 0.1, noise_std: float = 0.05) -> torch.Tensor:
    """Random small shift, rotation and scaling (background stays -1) plus Gaussian noise."""
    n, _, _, size = x.shape

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(max_rotation_deg))
    scale = 1 + uniform(max_scale)
    shift_x, shift_y = uniform(2 * max_shift_px / size), uniform(2 * max_shift_px / size)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    return warped + noise_std * torch.randn(warped.shape, generator=generator)


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` that ``model`` labels correctly (one batch, eval mode)."""
    was_training = model.training
    model.eval()
    predictions = model(images).argmax(dim=1)
    model.train(was_training)
    return (predictions == labels).double().mean().item()


def train_digits_classifier(resolution: int = 16, steps: int = 500, batch_size: int = 128, seed: int = 0,
                            progress: bool = True) -> tuple[DigitsClassifier, float]:
    """Train a :class:`DigitsClassifier` on the digits ``"train"`` split; return it and its test accuracy.

    AdamW with a short linear warmup and cosine decay, augmented batches (see :func:`_augment`) and
    label smoothing 0.05. Deterministic given ``seed`` on one machine and thread count.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits("train", resolution)
    model = DigitsClassifier(resolution)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        index = torch.randint(len(labels), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(_augment(images[index], generator)), labels[index], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress and (step % 250 == 0 or step == steps):
            print(f"step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    test_images, test_labels = load_digits("test", resolution)
    model.eval()
    return model, classifier_accuracy(model, test_images, test_labels)


def save_digits_classifier(model: DigitsClassifier, path: str | Path, test_accuracy: float) -> None:
    """Write ``model`` to one safetensors file; its metadata holds the config and the test accuracy."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": "diffdistill.digits_classifier", "config": json.dumps(model.config),
                "test_accuracy": repr(float(test_accuracy))}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)


def _read(path: str | Path | None, tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and (when ``tensors``) the state dict from ``path`` (None: the shipped file)."""
    if path is None:
        with as_file(files("diffdistill") / "assets" / SHIPPED_CLASSIFIER) as shipped:
            return _read(shipped, tensors)
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"digits classifier file {path} does not exist; {_MAKE_HINT}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path)) if tensors else {}
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"digits classifier file {path} is not a readable safetensors file ({exc}); "
                             f"{_MAKE_HINT}") from exc
    if metadata.get("format") != "diffdistill.digits_classifier":
        raise ModelLoadError(f"{path} is not a diffdistill digits classifier (metadata format "
                             f"{metadata.get('format')!r}); {_MAKE_HINT}")
    return metadata, state


def classifier_metadata(path: str | Path | None = None) -> dict[str, Any]:
    """The saved classifier's ``config`` (dict) and ``test_accuracy`` (float); None: the shipped file."""
    metadata, _ = _read(path, tensors=False)
    return {"config": json.loads(metadata["config"]), "test_accuracy": float(metadata["test_accuracy"])}


def load_digits_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitsClassifier:
    """Load a saved :class:`DigitsClassifier` (None: the shipped one), frozen and in eval mode."""
    metadata, state = _read(path, tensors=True)
    model = DigitsClassifier(**json.loads(metadata["config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first_line = str(exc).splitlines()[0]
        raise ModelLoadError(f"digits classifier file {path or SHIPPED_CLASSIFIER} does not match its config "
                             f"({first_line}); {_MAKE_HINT}") from exc
    model.requires_grad_(False)
    return model.eval().to(device)
