"""Schedules and parameterisation maths (methods.md §1, §2)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conftest import SCHEDULER_CONFIGS
from diffdistill.schedules import (
    EDMSchedule, FlowSchedule, PREDICTION_KINDS, VPSchedule, canonical_prediction, convert_prediction,
    edm_preconditioning, join_prediction, karras_sigmas, schedule_from_config, split_prediction,
)


def all_schedules():
    yield from ((f"vp-{k}", VPSchedule.from_scheduler_config(c)) for k, c in SCHEDULER_CONFIGS.items())
    yield "edm", EDMSchedule()
    yield "flow", FlowSchedule()
    yield "flow-shift3", FlowSchedule(shift=3.0)


SCHEDULES = dict(all_schedules())


def interior_times(sched, n=16):
    """Times strictly inside the schedule's range (a > 0 and s > 0)."""
    lo, hi = sched.t_min, sched.t_max
    if sched.family == "flow":
        lo, hi = 1e-3, 1 - 1e-3
    return torch.linspace(lo, hi, n, dtype=torch.float64)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("src,dst", list(itertools.permutations(PREDICTION_KINDS, 2)))
def test_conversions_round_trip(name, src, dst):
    sched = SCHEDULES[name]
    gen = torch.Generator().manual_seed(0)
    t = interior_times(sched)
    a, s = sched.alpha_sigma(t)
    x0 = torch.randn(len(t), 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, t)
    pred = join_prediction(x0, eps, src, a, s)
    there = convert_prediction(pred, src, dst, x_t, a, s)
    back = convert_prediction(there, dst, src, x_t, a, s)
    torch.testing.assert_close(back, pred, rtol=1e-10, atol=1e-10)
    # and every kind recovers the true (x0, eps) of the forward process
    rx0, reps = split_prediction(there, dst, x_t, a, s)
    scale = 1 / a.min().item()  # x0 from eps at tiny a amplifies round-off by 1/a
    torch.testing.assert_close(rx0, x0, rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(reps, eps, rtol=1e-10, atol=1e-12 * scale)


def test_prediction_names_and_velocity_matches_diffusers():
    assert canonical_prediction("epsilon") == "eps" and canonical_prediction("v_prediction") == "v"
    assert canonical_prediction("sample") == "x0" and canonical_prediction("flow_prediction") == "flow"
    with pytest.raises(ValueError, match="unknown prediction type"):
        canonical_prediction("score")
    ddpm = DDPMScheduler(**SCHEDULER_CONFIGS["linear"])
    sched = VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"])
    x0, eps = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    t = torch.tensor([0, 10, 500, 900, 999])
    a, s = sched.alpha_sigma(t.double())
    ours = join_prediction(x0, eps, "v", a, s).float()
    torch.testing.assert_close(ours, ddpm.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sched.add_noise(x0, eps, t.double()), ddpm.add_noise(x0, eps, t),
                               rtol=1e-5, atol=1e-5)


def test_flow_conversions_match_rectified_flow_formulas():
    sched = FlowSchedule()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - t[:, None]) * x0 + t[:, None] * eps)
    u = eps - x0
    a, s = sched.alpha_sigma(t)
    torch.testing.assert_close(convert_prediction(u, "flow", "x0", x_t, a, s), x_t - t[:, None] * u)
    torch.testing.assert_close(convert_prediction(u, "flow", "eps", x_t, a, s), x_t + (1 - t[:, None]) * u)


@pytest.mark.parametrize("kind", SCHEDULER_CONFIGS)
def test_vp_schedule_matches_closed_forms(kind):
    cfg = SCHEDULER_CONFIGS[kind]
    sched = VPSchedule.from_scheduler_config(cfg)
    T = 1000
    if kind == "linear":
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], T)
    elif kind == "scaled_linear":
        betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T) ** 2
    else:  # Nichol & Dhariwal 2021 eq. 17, betas capped at 0.999
        f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        betas = np.minimum(1 - f(np.arange(1, T + 1)) / f(np.arange(T)), 0.999)
    abar = np.cumprod(1 - betas)
    a, s = sched.alpha_sigma(torch.arange(T, dtype=torch.float64))
    np.testing.assert_allclose(a.numpy() ** 2, abar, rtol=2e-5)
    np.testing.assert_allclose(a.numpy() ** 2 + s.numpy() ** 2, 1.0, rtol=1e-12)
    assert sched.alpha_sigma(-1.0) == (1.0, 0.0)  # t_clean


def test_vp_fractional_times_interpolate_log_sigma_and_invert():
    sched = VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"])
    t = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.9, 999.0], dtype=torch.float64)
    sig = sched.sigma(t)
    lo, hi = sched.sigma(t.floor()), sched.sigma(torch.clamp(t.floor() + 1, max=999))
    w = t - t.floor()
    torch.testing.assert_close(torch.log(sig), torch.log(lo) + w * (torch.log(hi) - torch.log(lo)))
    torch.testing.assert_close(sched.t_from_sigma(sig), t, rtol=0, atol=1e-9)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 4, 10, 50])
def test_vp_grids_match_diffusers(spacing, n):
    cfg = SCHEDULER_CONFIGS["scaled_linear"]
    sched = VPSchedule.from_scheduler_config(cfg)
    ddim = DDIMScheduler(**cfg, timestep_spacing=spacing)
    ddim.set_timesteps(n)
    grid = sched.grid(n, spacing)
    assert grid[-1] == sched.t_clean and len(grid) == n + 1
    np.testing.assert_array_equal(grid[:-1].numpy(), ddim.timesteps.numpy().astype(np.float64))


def test_karras_grid_formula_and_vp_karras():
    sig = karras_sigmas(5, 0.002, 80.0, 7.0)
    i = torch.arange(5, dtype=torch.float64)
    expect = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(sig, expect)
    edm = EDMSchedule()
    torch.testing.assert_close(edm.grid(5), torch.cat([expect, torch.zeros(1, dtype=torch.float64)]))
    vp = VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"])
    grid = vp.grid(8, "karras")
    torch.testing.assert_close(vp.sigma(grid[:-1]), karras_sigmas(8, float(vp.sigma(0.0)), float(vp.sigma(999.0))))


def test_flow_grid_and_shift():
    sched = FlowSchedule(shift=3.0)
    grid = sched.grid(4)
    u = torch.linspace(1, 0, 5, dtype=torch.float64)
    torch.testing.assert_close(grid, 3 * u / (1 + 2 * u))
    assert grid[0] == 1 and grid[-1] == 0


@pytest.mark.parametrize("name", SCHEDULES)
def test_sample_t_in_range_and_seeded(name):
    sched = SCHEDULES[name]
    t1 = sched.sample_t(1000, generator=torch.Generator().manual_seed(3))
    t2 = sched.sample_t(1000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(t1, t2)
    assert t1.dtype == torch.float64 and (t1 >= 0).all()
    if sched.family != "edm":
        assert (t1 <= sched.t_max).all()
    if sched.family == "vp":
        assert torch.equal(t1, t1.round()) and t1.min() == 0 and t1.max() == 999


def test_edm_sample_t_lognormal_moments():
    t = EDMSchedule().sample_t(200_000, generator=torch.Generator().manual_seed(0))
    assert abs(torch.log(t).mean().item() + 1.2) < 0.01 and abs(torch.log(t).std().item() - 1.2) < 0.01


def test_edm_preconditioning_constants():
    c = edm_preconditioning(torch.tensor([0.5], dtype=torch.float64), 0.5)
    torch.testing.assert_close(c["c_skip"], torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(c["c_out"], torch.tensor([0.25 / 0.5**0.5], dtype=torch.float64))
    torch.testing.assert_close(c["c_in"], torch.tensor([1 / 0.5**0.5], dtype=torch.float64))


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_config_round_trip(name):
    sched = SCHEDULES[name]
    again = schedule_from_config(sched.to_config())
    assert again == sched
    t = interior_times(sched)
    torch.testing.assert_close(torch.stack(again.alpha_sigma(t)), torch.stack(sched.alpha_sigma(t)))
