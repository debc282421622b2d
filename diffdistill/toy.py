"""Analytic toy teachers: a Gaussian mixture whose exact denoiser is the teacher (``teacher: analytic:NAME``).

Every method runs on them through the normal loop, so its result can be compared with the exact
distribution (sliced Wasserstein-2, mode coverage). Students and critics need a network to start from,
as they start from a real teacher's network elsewhere: :func:`fit_toy_network` fits a small MLP
(:class:`ToyMLP`, v-prediction) to the exact mixture by denoising score matching, once per machine
(kept under ``$DIFFDISTILL_CACHE/toy``, see :func:`fit_cache_path`).
The exact denoiser remains the teacher every loss queries.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .adapters import DiffusersDenoiser, register_adapter
from .denoiser import Conditioning
from .analytic import GaussianMixture, GaussianMixtureDenoiser
from .errors import ModelLoadError
from .schedules import VPSchedule, convert_prediction

#: named mixtures (2-D) a run can use as ``teacher: analytic:NAME`` and ``data.mixture: NAME``
MIXTURES = {
    "ring8": lambda: GaussianMixture.ring(8, radius=2.0, std=0.15),
    "ring8_uneven": lambda: GaussianMixture.ring(8, radius=2.0, std=0.15, weights=[4, 1, 2, 1, 3, 1, 2, 1]),
}
#: the toy teachers' schedule: DDPM's linear betas over 1000 steps
TOY_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def mixture(name: str) -> GaussianMixture:
    if name not in MIXTURES:
        raise ModelLoadError(f"unknown analytic mixture '{name}'; available: {', '.join(sorted(MIXTURES))}")
    return MIXTURES[name]()


class ToyMLP(ModelMixin, ConfigMixin):
    """``(x_t, t) → v`` for low-dimensional data: sinusoidal time features, a SiLU MLP trunk, a linear head."""

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_features: int = 16,
                 num_train_timesteps: int = 1000, prediction_type: str = "v"):
        super().__init__()
        layers, width = [], dim + time_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, dim)
        freqs = torch.exp(torch.linspace(0, math.log(200.0), time_features // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        tau = (timestep.float() / self.config.num_train_timesteps)[:, None] * self.freqs[None]
        return self.head(self.trunk(torch.cat([x, tau.sin(), tau.cos()], dim=1)))


@register_adapter("ToyMLP")
class ToyMLPDenoiser(DiffusersDenoiser):
    """:class:`ToyMLP` as a denoiser; it predicts what its config says; features: the trunk's output."""

    def __init__(self, network: ToyMLP, schedule, prediction_type: str, **kwargs):
        super().__init__(network, schedule, network.config.prediction_type, **kwargs)

    @property
    def feature_module(self) -> nn.Module:
        return self.network.trunk

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        x, tt = self._inputs(x_t, t)
        return self.network(x, tt)


class ResidualToyMLP(ModelMixin, ConfigMixin):
    """``(x_t, t) → v``: the exact v of mixture ``mixture`` plus a learned :class:`ToyMLP` correction whose
    head starts at zero, so the network starts as the analytic teacher itself (``critic.start:
    exact_residual``). Only the correction has parameters; the exact part is float64 maths."""

    @register_to_config
    def __init__(self, mixture: str = "ring8", dim: int = 2, hidden: int = 128, depth: int = 3,
                 time_features: int = 16, num_train_timesteps: int = 1000, prediction_type: str = "v"):
        super().__init__()
        self.correction = ToyMLP(dim, hidden, depth, time_features, num_train_timesteps, "v")
        nn.init.zeros_(self.correction.head.weight)
        nn.init.zeros_(self.correction.head.bias)
        self.exact = GaussianMixtureDenoiser(MIXTURES[mixture](), VPSchedule.from_scheduler_config(TOY_SCHEDULER_CONFIG))

    @classmethod
    def from_fitted(cls, name: str, fitted: ToyMLP) -> "ResidualToyMLP":
        """The residual network whose correction trunk is ``fitted``'s (head zeroed): no random draws."""
        c = fitted.config
        net = cls(name, c.dim, c.hidden, c.depth, c.time_features, c.num_train_timesteps)
        net.correction.trunk.load_state_dict(fitted.trunk.state_dict())
        return net

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = timestep.double()
        a, s = (c.to(x.device)[:, None] for c in self.exact.schedule.alpha_sigma(t.cpu()))
        x0 = self.exact.predict(x, t, Conditioning())
        return convert_prediction(x0, "x0", "v", x, a, s) + self.correction(x, timestep)


@register_adapter("ResidualToyMLP")
class ResidualToyMLPDenoiser(ToyMLPDenoiser):
    """:class:`ResidualToyMLP` as a denoiser; features: its correction's trunk."""

    @property
    def feature_module(self) -> nn.Module:
        return self.network.correction.trunk


#: the size of the MLP students and critics start from
NETWORK = {"hidden": 256, "depth": 4}
#: optimizer steps of :func:`fit_toy_network` when a run loads ``analytic:NAME`` (about 2.5 min on one core).
#: On ring8 the fitted MLP's 100-step Heun ODE scores SW2 1.10x the exact ODE's at 20 000 steps and 2.38x at
#: 3000 (means over five draws); DMD2 students started from it reach 1.46-1.47x instead of 1.59-2.20x (docs/results.md).
FIT_STEPS = 20000


def fit_toy_network(name: str, steps: int | None = None, batch_size: int = 512, seed: int = 0) -> ToyMLP:
    """A :class:`ToyMLP` fitted to mixture ``name`` by v-prediction score matching on exact samples, for
    ``steps`` optimizer steps (default :data:`FIT_STEPS`, read at call time). Cached per process on the
    resolved arguments, so every spelling of the same fit (``f(name)``, ``f(name, FIT_STEPS)``) shares one,
    and on disk (:func:`fit_cache_path`), so a later process loads it instead of fitting again (about 2.5
    min on one core at the default)."""
    return _fit_toy_network(name, FIT_STEPS if steps is None else steps, batch_size, seed)


def fit_cache_path(name: str, steps: int, batch_size: int, seed: int) -> Path:
    """Where :func:`fit_toy_network` keeps a fit between processes: ``$DIFFDISTILL_CACHE/toy/`` (default
    ``~/.cache/diffdistill/toy/``), named by everything the fit depends on (mixture, steps, batch, seed,
    network size, torch version). Delete the file to fit again."""
    from .pretrained import cache_root

    size = "-".join(f"{k}{v}" for k, v in sorted(NETWORK.items()))
    return cache_root() / "toy" / f"{name}-fit{steps}-batch{batch_size}-seed{seed}-{size}-torch{torch.__version__}.safetensors"


@functools.lru_cache(maxsize=4)
def _fit_toy_network(name: str, steps: int, batch_size: int, seed: int) -> ToyMLP:
    from .pretrained import cached_tensors

    mix = mixture(name)
    state = cached_tensors(fit_cache_path(name, steps, batch_size, seed),
                           lambda: _fit(mix, steps, batch_size, seed).state_dict())
    net = ToyMLP(dim=mix.dim, **NETWORK)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def _fit(mix: GaussianMixture, steps: int, batch_size: int, seed: int) -> ToyMLP:
    schedule = VPSchedule.from_scheduler_config(TOY_SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyMLP(dim=mix.dim, **NETWORK)
    den = ToyMLPDenoiser(net, schedule, "v")
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    for _ in range(steps):
        x0 = mix.sample(batch_size, generator=gen)[0].float()
        t = schedule.sample_t(batch_size, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = schedule.add_noise(x0, eps, t)
        a, s = (c[:, None].float() for c in schedule.alpha_sigma(t))
        loss = ((den.predict(x_t, t, None) - (a * eps - s * x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def residual_critic_network(name: str) -> ResidualToyMLP:
    """What ``critic.start: exact_residual`` copies for ``analytic:NAME``: the exact denoiser plus a zero
    correction on the fitted MLP's trunk."""
    return ResidualToyMLP.from_fitted(name, fit_toy_network(name)).eval().requires_grad_(False)


def load_toy_teacher(name: str, guidance_scale: float | None = None):
    """``analytic:NAME`` → a :class:`~diffdistill.pretrained.Pretrained` whose denoiser is exact."""
    from .pretrained import Pretrained

    mix = mixture(name)
    schedule = VPSchedule.from_scheduler_config(TOY_SCHEDULER_CONFIG)
    denoiser = GaussianMixtureDenoiser(mix, schedule, guidance_scale=1.0 if guidance_scale is None else guidance_scale)
    return Pretrained(denoiser=denoiser, path=Path(f"analytic:{name}"),
                      meta={"num_classes": 0, "sample_shape": [mix.dim], "analytic": name},
                      init_network=fit_toy_network(name))


class MixtureDataset(torch.utils.data.Dataset):
    """``size`` fixed exact samples of mixture ``name`` (float32), with their component as the label.

    The default is large (2^20, 16 MiB with labels) because a GAN head trained on these samples pulls the
    student's mode weights towards this set's component counts: 65 536 samples of ring8 are off 1/8 by up
    to 0.20 percentage points per mode (multinomial scatter), as much as the toy goal can tolerate; 2^20
    samples are off by about 0.03."""

    def __init__(self, name: str, size: int = 2**20, seed: int = 0):
        x, comp = mixture(name).sample(size, generator=torch.Generator().manual_seed(seed))
        self.images, self.labels = x.float(), comp

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])
