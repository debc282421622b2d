"""An analytic teacher: a Gaussian mixture whose exact denoiser E[x0 | x_t] is known in closed form.

Data ``p(x0) = Σ_k π_k N(μ_k, S_k)``. Under any schedule ``x_t = a·x0 + s·eps`` (methods.md §3)::

    x_t | k ~ N(a·μ_k, C_k),   C_k = a²·S_k + s²·I
    r_k(x_t) ∝ π_k · N(x_t; a·μ_k, C_k)                  (normalised in log space)
    E[x0 | x_t] = Σ_k r_k · (μ_k + a·S_k·C_k⁻¹·(x_t − a·μ_k))

:class:`GaussianMixtureDenoiser` serves this through the :class:`~diffdistill.denoiser.Denoiser`
interface (prediction type ``x0``, float64 maths). Class label ``k`` conditions on component ``k``;
label ``-1`` (the null class) is the whole mixture, so classifier-free guidance is exact too.
It is the project's ground truth for samplers and distillation losses.
"""

from __future__ import annotations

import math

import torch

from .denoiser import Conditioning, Denoiser
from .schedules import NoiseSchedule

NULL_COMPONENT = -1


class GaussianMixture:
    """``Σ_k π_k N(μ_k, S_k)`` in ``R^D`` (float64). ``covs`` may be ``(K, D, D)``, ``(K, D)`` or ``(K,)``."""

    def __init__(self, weights, means, covs):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k, d = self.means.shape
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or (w < 0).any():
            raise ValueError("weights must be K non-negative numbers")
        self.weights = w / w.sum()
        c = torch.as_tensor(covs, dtype=torch.float64)
        if c.ndim == 1:
            c = c[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif c.ndim == 2:
            c = torch.diag_embed(c)
        if c.shape != (k, d, d):
            raise ValueError(f"covs must be (K,), (K, D) or (K, D, D); got {tuple(c.shape)}")
        self.covs = c
        self._chol = torch.linalg.cholesky(c)
        self._evals, self._evecs = torch.linalg.eigh(c)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def ring(cls, num_components: int = 8, radius: float = 2.0, std: float = 0.15,
             weights=None) -> "GaussianMixture":
        """Isotropic components evenly spaced on a circle in 2-D (uneven weights if given)."""
        angles = torch.arange(num_components, dtype=torch.float64) * (2 * math.pi / num_components)
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        w = torch.ones(num_components) if weights is None else torch.as_tensor(weights)
        return cls(w, means, torch.full((num_components,), std**2))

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               component: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples and their component indices (a fixed ``component`` draws from that one only)."""
        if component is None:
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            comp = torch.as_tensor(component).expand(n).clone().long()
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + (self._chol[comp] @ z[:, :, None])[:, :, 0], comp

    def _rotated(self, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """In each component's eigenbasis ``S_k = Q_k Λ_k Q_kᵀ``, ``C_k`` is diagonal:
        returns ``z = Q_kᵀ(x_t − a·μ_k)`` ``(B, K, D)``, ``c = a²·λ_k + s²`` and ``log r_k`` ``(B, K)``."""
        dev = x_t.device
        a, s = a[:, None, None], s[:, None, None]
        z = torch.einsum("kji,bkj->bki", self._evecs.to(dev), x_t[:, None, :] - a * self.means.to(dev)[None])
        c = a**2 * self._evals.to(dev)[None] + s**2
        log_n = -0.5 * (z**2 / c + torch.log(c)).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        log_r = torch.log(self.weights.to(dev))[None] + log_n
        return z, c, log_r - torch.logsumexp(log_r, dim=1, keepdim=True)

    def posterior_mean(self, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                       component: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``E[x0 | x_t]`` (methods.md §3) for ``x_t`` ``(B, D)``; ``component`` ``(B,)`` of indices
        (or ``NULL_COMPONENT``) conditions each sample on one component."""
        x = x_t.double()
        a, s = a.double().expand(x.shape[0]), s.double().expand(x.shape[0])
        z, c, log_r = self._rotated(x, a, s)
        if component is not None:
            comp = component.long().to(x.device)
            one_hot = torch.nn.functional.one_hot(comp.clamp(min=0), self.num_components).bool()
            fixed = torch.where(one_hot, 0.0, -math.inf).double()
            log_r = torch.where((comp >= 0)[:, None], fixed, log_r)
        # μ_k + a·S_k·C_k⁻¹·(x_t − a·μ_k), evaluated in the eigenbasis
        evals, evecs, means = self._evals.to(x.device), self._evecs.to(x.device), self.means.to(x.device)
        shift = torch.einsum("kij,bkj->bki", evecs, evals[None] * z / c)
        comp_mean = means[None] + a[:, None, None] * shift
        return (log_r.exp()[..., None] * comp_mean).sum(1)


class GaussianMixtureDenoiser(Denoiser):
    """The exact denoiser of a :class:`GaussianMixture` under ``schedule`` (prediction type ``x0``).

    Inputs may have any shape ``(B, *data_shape)`` whose trailing size equals the mixture's ``D``.
    ``cond.class_labels`` selects a component; ``-1`` (the null class) means the whole mixture.
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule, guidance_scale: float = 1.0):
        super().__init__(None, schedule, "x0", guidance_scale=guidance_scale)
        self.mixture = mixture

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        a, s = self.schedule.alpha_sigma(t)
        flat = x_t.reshape(x_t.shape[0], -1)
        x0 = self.mixture.posterior_mean(flat, a.to(flat.device), s.to(flat.device), cond.class_labels)
        return x0.reshape(x_t.shape).to(x_t.dtype)

    def null_condition(self, cond: Conditioning) -> Conditioning:
        labels = cond.class_labels
        if labels is None:
            return cond
        return Conditioning(class_labels=torch.full_like(labels, NULL_COMPONENT))
