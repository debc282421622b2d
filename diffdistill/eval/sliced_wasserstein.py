"""Sliced Wasserstein-2 distance between two point clouds (Rabin et al. 2011; Bonneel et al. 2015).

``SW2(X, Y)² = E_θ [ W2(θᵀX, θᵀY)² ]`` over uniformly random unit directions θ; each 1-D W2 is the
L2 distance between sorted projections (equal sample sizes) or between quantile functions.
"""

from __future__ import annotations

import torch


def sliced_wasserstein2(x: torch.Tensor, y: torch.Tensor, num_projections: int = 512,
                        generator: torch.Generator | None = None) -> float:
    """Monte-Carlo sliced W2 between samples ``x`` ``(N, D)`` and ``y`` ``(M, D)`` (float64 maths)."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    theta = torch.randn(num_projections, x.shape[1], generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    # (projections, points): sorting along the contiguous last dim is several times faster
    px, py = (theta @ x.T).sort(dim=1).values, (theta @ y.T).sort(dim=1).values
    if px.shape[1] != py.shape[1]:
        size = max(px.shape[1], py.shape[1])
        levels = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        px, py = torch.quantile(px, levels, dim=1), torch.quantile(py, levels, dim=1)
    return float(((px - py) ** 2).mean().sqrt())
