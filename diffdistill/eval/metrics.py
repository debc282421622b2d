"""Sample-quality metrics on feature sets ``(N, D)``: FID, KID and precision/recall, plus torchmetrics as
an independent second backend for FID and KID.

- FID: the Fréchet distance of Gaussian fits (Heusel et al. 2017, eq. 6), :mod:`.frechet`.
- KID: the unbiased MMD² with the cubic polynomial kernel ``k(x, y) = (xᵀy / D + 1)³`` (Bińkowski et al.
  2018, eq. 3 and §3), averaged over random subsets as clean-fid and torchmetrics do.
- Precision / recall: Kynkäänniemi et al. (2019), §3: each set's manifold is the union of balls around
  its points with radius the distance to the point's k-th nearest neighbour (k = 3); precision is the
  share of generated points inside the real manifold, recall the share of real points inside the
  generated manifold.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DiffDistillError
from .frechet import feature_statistics, frechet_distance


def _array(features: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)


def fid_from_features(generated: torch.Tensor | np.ndarray,
                      reference: torch.Tensor | np.ndarray | tuple[np.ndarray, np.ndarray]) -> float:
    """FID of ``generated`` features against ``reference`` features (or its ``(mu, sigma)``)."""
    generated = _array(generated)
    if generated.shape[0] <= generated.shape[1]:
        raise DiffDistillError(f"FID needs more samples than feature dimensions ({generated.shape[0]} samples of "
                               f"{generated.shape[1]}-d features give a singular covariance): raise --num above "
                               f"{generated.shape[1]}")
    ref = reference if isinstance(reference, tuple) else feature_statistics(_array(reference))
    return frechet_distance(*feature_statistics(generated), *ref)


def kid(generated: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray, *, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation over ``subsets`` random subsets (of ``min(subset_size, N, M)`` points,
    drawn without replacement with a ``seed``-ed generator) of the unbiased polynomial-kernel MMD²."""
    x, y = _array(generated), _array(reference)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise DiffDistillError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        a, b = x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
        values.append(_mmd2_unbiased(a, b))
    return float(np.mean(values)), float(np.std(values))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between equal-size sets under the kernel ``(xᵀy / D + 1)³``."""
    m, d = x.shape
    k_xx, k_yy, k_xy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_diagonal - 2 * k_xy.mean())


def _kth_neighbour_radii(points: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each point to its ``k``-th nearest other point (row chunks: memory O(chunk·N))."""
    # the 1st smallest distance is the point itself (0)
    return torch.cat([torch.cdist(q, points).kthvalue(k + 1, dim=1).values for q in points.split(chunk)])


def _inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per query: is it within ``radii[j]`` of some ``centres[j]``?"""
    return torch.cat([(torch.cdist(q, centres) <= radii).any(dim=1) for q in queries.split(chunk)])


def precision_recall(generated: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray, *,
                     k: int = 3, seed: int = 0) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with ``k``-NN radii, float64.

    The radii depend on how densely a set is sampled, so, as in the paper, both sets have the same size:
    the larger one is subsampled (without replacement, ``seed``-ed) to the size of the smaller."""
    gen, ref = torch.from_numpy(_array(generated)), torch.from_numpy(_array(reference))
    size = min(len(gen), len(ref))
    rng = torch.Generator().manual_seed(seed)
    gen, ref = (s[torch.randperm(len(s), generator=rng)[:size]] if len(s) > size else s for s in (gen, ref))
    if min(len(gen), len(ref)) <= k:
        raise DiffDistillError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _inside(gen, ref, _kth_neighbour_radii(ref, k)).double().mean()
    recall = _inside(ref, gen, _kth_neighbour_radii(gen, k)).double().mean()
    return float(precision), float(recall)


class _Passthrough(torch.nn.Module):
    """A torchmetrics "feature network" that returns its input: lets torchmetrics score given features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def torchmetrics_fid(generated: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """FID by torchmetrics' ``FrechetInceptionDistance`` on the same features (float64 states)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    gen, ref = torch.from_numpy(_array(generated)), torch.from_numpy(_array(reference))
    metric = FrechetInceptionDistance(feature=_Passthrough(gen.shape[1])).set_dtype(torch.float64)
    metric.update(ref, real=True)
    metric.update(gen, real=False)
    return float(metric.compute())


def torchmetrics_kid(generated: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray, *,
                     subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID by torchmetrics' ``KernelInceptionDistance`` (its subsets come from torch's global RNG, seeded
    here with ``seed``)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    gen, ref = torch.from_numpy(_array(generated)), torch.from_numpy(_array(reference))
    size = min(subset_size, len(gen), len(ref))
    metric = KernelInceptionDistance(feature=_Passthrough(gen.shape[1]), subsets=subsets, subset_size=size)
    metric.set_dtype(torch.float64)
    metric.update(ref, real=True)
    metric.update(gen, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
