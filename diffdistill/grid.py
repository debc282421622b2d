"""Sample grids as PNG files, optionally with a label per row."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] → ``(N, H, W, C)`` uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path: str | Path, *, ncols: int | None = None,
              row_labels: Sequence[str] | None = None, scale: int | None = None, pad: int = 2) -> Path:
    """Tile ``images`` row by row into one PNG; small images are enlarged ``scale``× (nearest neighbour).

    ``row_labels`` writes one label in a left margin per row (e.g. the class of that row).
    """
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    scale = scale or max(1, 64 // max(h, w))
    h, w = h * scale, w * scale
    margin = 28 if row_labels else 0
    canvas = Image.new("RGB", (margin + ncols * (w + pad) + pad, nrows * (h + pad) + pad), "white")
    for i in range(n):
        tile = Image.fromarray(arr[i, :, :, 0] if c == 1 else arr[i], "L" if c == 1 else "RGB")
        tile = tile.resize((w, h), Image.NEAREST).convert("RGB")
        r, col = divmod(i, ncols)
        canvas.paste(tile, (margin + pad + col * (w + pad), pad + r * (h + pad)))
    if row_labels:
        draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
        for r, label in enumerate(row_labels[:nrows]):
            draw.text((4, pad + r * (h + pad) + h // 2 - 6), str(label), fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
