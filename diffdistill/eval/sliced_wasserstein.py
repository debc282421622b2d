"""Sliced Wasserstein-2 distance between two point clouds (Rabin et al. 2011; Bonneel et al. 2015).

``SW2(X, Y)² = E_θ [ W2(θᵀX, θᵀY)² ]`` over uniformly random unit directions θ; each 1-D W2 is the
L2 distance between sorted projections (equal sample sizes) or between quantile functions.
"""

from __future__ import annotations

import torch


def _unit_directions(num_projections: int, dim: int, generator: torch.Generator | None) -> torch.Tensor:
    """``(num_projections, dim)`` directions uniform on the unit sphere (float64), drawn from ``generator``."""
    theta = torch.randn(num_projections, dim, generator=generator, dtype=torch.float64)
    return theta / theta.norm(dim=1, keepdim=True)


def sliced_wasserstein2(x: torch.Tensor, y: torch.Tensor, num_projections: int = 512,
                        generator: torch.Generator | None = None) -> float:
    """Monte-Carlo sliced W2 between samples ``x`` ``(N, D)`` and ``y`` ``(M, D)`` (float64 maths)."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    theta = _unit_directions(num_projections, x.shape[1], generator)
    # (projections, points): sorting along the contiguous last dim is several times faster
    px, py = (theta @ x.T).sort(dim=1).values, (theta @ y.T).sort(dim=1).values
    if px.shape[1] != py.shape[1]:
        size = max(px.shape[1], py.shape[1])
        levels = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        px, py = torch.quantile(px, levels, dim=1), torch.quantile(py, levels, dim=1)
    return float(((px - py) ** 2).mean().sqrt())


def sliced_wasserstein2_to_mixture(x: torch.Tensor, mixture, num_projections: int = 512,
                                   generator: torch.Generator | None = None, grid_size: int = 200_000) -> float:
    """Sliced W2 between samples ``x`` ``(N, D)`` and a :class:`~diffdistill.analytic.GaussianMixture` itself.

    Each projection ``θᵀX`` of the mixture is the 1-D mixture ``Σ_k π_k N(θᵀμ_k, θᵀS_kθ)``; the sorted
    projected samples are compared with its quantiles at the levels ``(i + ½)/N`` (the semi-discrete 1-D W2),
    the quantiles found by inverting the mixture's CDF on ``grid_size`` points spanning ±9 std of every
    component. No reference sample enters, so none of its scatter does: against a finite reference of ``M``
    points the result also carries that reference's mode-count noise (docs/results.md, "How much the finite
    reference moves the ratio"). Same projections as :func:`sliced_wasserstein2` for the same generator.
    """
    x = x.reshape(x.shape[0], -1).double()
    if x.shape[1] != mixture.dim:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs the mixture's {mixture.dim}")
    theta = _unit_directions(num_projections, x.shape[1], generator)
    px = (theta @ x.T).sort(dim=1).values
    mu = theta @ mixture.means.T                                                     # (P, K)
    sd = torch.einsum("pd,kde,pe->pk", theta, mixture.covs, theta).sqrt()            # (P, K)
    levels = (torch.arange(x.shape[0], dtype=torch.float64) + 0.5) / x.shape[0]
    u = torch.linspace(0.0, 1.0, grid_size, dtype=torch.float64)
    total = 0.0
    for rows in torch.split(torch.arange(num_projections), 8):
        lo, hi = (mu[rows] - 9 * sd[rows]).amin(1, keepdim=True), (mu[rows] + 9 * sd[rows]).amax(1, keepdim=True)
        g = lo + (hi - lo) * u                                                       # (p, G)
        cdf = (mixture.weights * torch.special.ndtr((g[:, :, None] - mu[rows, None]) / sd[rows, None])).sum(-1)
        cdf = torch.cummax(cdf, dim=1).values                                        # monotone despite rounding
        hi_idx = torch.searchsorted(cdf, levels.expand(len(rows), -1).contiguous()).clamp(1, grid_size - 1)
        c0, c1 = cdf.gather(1, hi_idx - 1), cdf.gather(1, hi_idx)
        g0, g1 = g.gather(1, hi_idx - 1), g.gather(1, hi_idx)
        frac = ((levels - c0) / (c1 - c0).clamp_min(1e-300)).clamp(0.0, 1.0)
        quantiles = g0 + frac * (g1 - g0)
        total += float(((px[rows] - quantiles) ** 2).sum())
    return (total / (num_projections * x.shape[0])) ** 0.5
