"""Samplers: agreement with diffusers' schedulers and with the exact Gaussian-mixture teacher."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from conftest import SCHEDULER_CONFIGS, tiny_unet
from diffdistill.adapters import UNet2DDenoiser
from diffdistill.analytic import GaussianMixture, GaussianMixtureDenoiser
from diffdistill.denoiser import Conditioning
from diffdistill.eval.sliced_wasserstein import sliced_wasserstein2
from diffdistill.samplers import SAMPLERS, batch_generator, batch_share, generate, get_sampler, sampling_grid
from diffdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule


def tiny_vp_denoiser(prediction_type, randomize_weights, beta="scaled_linear"):
    cfg = {**SCHEDULER_CONFIGS[beta], "prediction_type": prediction_type}
    unet = randomize_weights(tiny_unet())
    return unet, cfg, UNet2DDenoiser(unet, VPSchedule.from_scheduler_config(cfg), prediction_type)


def diffusers_loop(unet, scheduler, x, extra_step_kwargs=None):
    for t in scheduler.timesteps:
        x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x, **(extra_step_kwargs or {})).prev_sample
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_reproduces_diffusers_ddim_loop(prediction_type, spacing, dtype, randomize_weights):
    """Same tiny UNet, noise and timesteps: max |ours − diffusers| ≤ 1e-5 (float64 run), and ≤ 1e-5 of
    the image's scale in float32 (a random UNet's x0 reaches |x| ≈ 30, where float32 spacing is 2e-6)."""
    unet, cfg, den = tiny_vp_denoiser(prediction_type, randomize_weights)
    unet.to(dtype)
    sched = DDIMScheduler(**cfg, timestep_spacing=spacing, set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(10)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    with torch.no_grad():
        ref = diffusers_loop(unet, sched, x_T.clone(), {"eta": 0.0})
        ours = get_sampler("ddim")(den, x_T.clone(), den.schedule.grid(10, spacing))
    assert ours.dtype == dtype
    assert (ours - ref).abs().max().item() <= 1e-5 * (1 if dtype == torch.float64 else ref.abs().max().item())


def test_dpmpp_2m_reproduces_diffusers(randomize_weights):
    unet, cfg, den = tiny_vp_denoiser("epsilon", randomize_weights)
    sched = DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2,
                                        timestep_spacing="trailing", lower_order_final=True,
                                        final_sigmas_type="zero")
    sched.set_timesteps(8)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = diffusers_loop(unet, sched, x_T.clone())
        ours = get_sampler("dpmpp_2m")(den, x_T.clone(), den.schedule.grid(8, "trailing"))
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("sched", [VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"]), EDMSchedule(),
                                   FlowSchedule()], ids=["vp", "edm", "flow"])
def test_euler_is_ddim_on_the_same_grid(sched):
    den = GaussianMixtureDenoiser(GaussianMixture.ring(3), sched)
    x = sched.prior_sample((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = sched.grid(12) if sched.family == "flow" else sched.grid(12, "karras")
    torch.testing.assert_close(get_sampler("euler")(den, x, grid), get_sampler("ddim")(den, x, grid))


def test_all_samplers_share_one_signature():
    names = ["denoiser", "x", "ts", "cond", "guidance_scale", "generator", "progress"]
    for name, fn in SAMPLERS.items():
        assert list(inspect.signature(fn).parameters) == names, name


MIXTURE_N = 10_000


@functools.lru_cache(maxsize=1)
def mixture_and_bound():
    """A 2-D mixture with uneven weights and anisotropic components, and the sampling-error bound: the
    largest sliced W2 between two independent mixture draws of ``MIXTURE_N`` points over 20 pairs
    (measured: 0.023 to 0.122, so the bound is about 0.12)."""
    mix = GaussianMixture([0.1, 0.2, 0.3, 0.4], [[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]],
                          [[0.05, 0.02], [0.02, 0.1], [0.1, 0.1], [0.03, 0.08]])
    gen = torch.Generator().manual_seed(123)
    pairs = [sliced_wasserstein2(mix.sample(MIXTURE_N, generator=gen)[0], mix.sample(MIXTURE_N, generator=gen)[0],
                                 generator=torch.Generator().manual_seed(i)) for i in range(20)]
    return mix, MIXTURE_N, max(pairs)


@pytest.mark.parametrize("sched", [VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"]), EDMSchedule(),
                                   FlowSchedule()], ids=["vp", "edm", "flow"])
def test_heun_100_steps_lands_on_the_mixture(sched):
    mix, n, bound = mixture_and_bound()
    den = GaussianMixtureDenoiser(mix, sched)
    x = generate(den, (2,), n, sampler="heun", num_steps=100, seed=7, batch_size=n).double()
    ref = mix.sample(n, generator=torch.Generator().manual_seed(99))[0]
    sw = sliced_wasserstein2(x, ref, generator=torch.Generator().manual_seed(0))
    assert sw <= bound, (sw, bound)
    nearest = torch.cdist(x, mix.means).argmin(1)
    weights = torch.bincount(nearest, minlength=4).double() / n
    assert (weights - mix.weights).abs().max() <= 0.03, weights


def test_one_step_from_noise_is_the_posterior_mean_and_far_from_the_mixture():
    """A guard that the SW2 check can fail: a 1-step DDIM sample is E[x0 | x_T], far from the data."""
    mix, n, bound = mixture_and_bound()
    sched = VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"])
    den = GaussianMixtureDenoiser(mix, sched)
    x = generate(den, (2,), n, sampler="ddim", num_steps=1, seed=7, batch_size=n).double()
    ref = mix.sample(n, generator=torch.Generator().manual_seed(99))[0]
    assert sliced_wasserstein2(x, ref, generator=torch.Generator().manual_seed(0)) > 10 * bound


def test_conditional_sampling_and_guidance_on_the_analytic_teacher():
    """w = 1 samples the labelled component exactly; w = 3 pushes samples away from the other components
    (further out along their own direction, with less spread along it: measured 1.44 ± 0.19 vs 1.00 ± 0.30);
    w = 0 is the unconditional mixture, where the label says nothing."""
    mix = GaussianMixture([1, 1, 1, 1], [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], [0.09] * 4)
    den = GaussianMixtureDenoiser(mix, EDMSchedule())
    labels = torch.arange(4).repeat(500)

    def stats(w):
        x = generate(den, (2,), 2000, sampler="heun", num_steps=40, cond=Conditioning(class_labels=labels),
                     guidance_scale=w, seed=0, batch_size=2000).double()
        along = (x * mix.means[labels]).sum(1)  # the means are unit vectors
        hit = (torch.cdist(x, mix.means).argmin(1) == labels).double().mean().item()
        return along.mean().item(), along.std().item(), hit

    (m1, s1, hit1), (m3, s3, hit3), (m0, _, hit0) = stats(1.0), stats(3.0), stats(0.0)
    assert abs(m1 - 1.0) < 0.03 and abs(s1 - 0.3) < 0.02 and hit1 > 0.96  # N(μ, 0.3²): ~2 % nearest-mean errors
    assert m3 > 1.3 and s3 < 0.8 * s1 and hit3 > hit1
    assert abs(m0) < 0.1 and hit0 < 0.35


def test_ddim_step_with_per_sample_times():
    """Trainers step each sample from its own t: equals the one-sample-at-a-time result (B = D = 2)."""
    from diffdistill.samplers.base import ddim_step

    sched = VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"])
    den = GaussianMixtureDenoiser(GaussianMixture.ring(3), sched)
    x = torch.randn(2, 2, dtype=torch.float64)
    t, r = torch.tensor([900.0, 300.0], dtype=torch.float64), torch.tensor([500.0, 100.0], dtype=torch.float64)
    batch = ddim_step(den, x, den(x, t), t, r)
    for i in range(2):
        one = ddim_step(den, x[i:i + 1], den(x[i:i + 1], t[i]), t[i], r[i])
        torch.testing.assert_close(batch[i:i + 1], one)


def test_zero_terminal_snr_schedule_samples_without_nan():
    """ᾱ_T = 0 (Lin et al. 2024): Karras grids start at T − 1 and Heun integrates in flow variables."""
    cfg = {**SCHEDULER_CONFIGS["scaled_linear"], "rescale_betas_zero_snr": True}
    sched = VPSchedule.from_scheduler_config(cfg)
    assert sched.alpha_sigma(999.0)[0] == 0 and sched.alpha_sigma(998.5)[0] > 0
    mix, n, bound = mixture_and_bound()
    den = GaussianMixtureDenoiser(mix, sched)
    for name in ["heun", "euler", "ddim", "dpmpp_2m"]:
        x = generate(den, (2,), n, sampler=name, num_steps=100, seed=7, batch_size=n).double()
        assert torch.isfinite(x).all(), name
    ref = mix.sample(n, generator=torch.Generator().manual_seed(99))[0]
    assert sliced_wasserstein2(x, ref, generator=torch.Generator().manual_seed(0)) <= bound


def test_unknown_sampler_is_a_config_error():
    from diffdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown sampler 'rk45'"):
        get_sampler("rk45")


def test_sde_sampler_is_seeded_and_ends_on_the_last_prediction():
    mix = GaussianMixture.ring(4)
    sched = VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"])
    den = GaussianMixtureDenoiser(mix, sched)
    ts = [999, 749, 499, 249]
    a = generate(den, (2,), 32, sampler="sde", timesteps=ts, seed=1)
    b = generate(den, (2,), 32, sampler="sde", timesteps=ts, seed=1)
    c = generate(den, (2,), 32, sampler="sde", timesteps=ts, seed=2)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    grid = sampling_grid(den, sampler="sde", timesteps=ts)
    assert grid.tolist() == [999, 749, 499, 249, -1]
    # one step of "sde" and of "ode" both return x0 = D(x_T, T)
    x = torch.randn(5, 2, dtype=torch.float64)
    one = torch.tensor([999.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(get_sampler("sde")(den, x, one), den(x, 999.0))
    torch.testing.assert_close(get_sampler("ode")(den, x, one), den(x, 999.0))


def test_generate_is_independent_of_batch_size_for_deterministic_samplers():
    den = GaussianMixtureDenoiser(GaussianMixture.ring(4), EDMSchedule())
    a = generate(den, (2,), 50, sampler="dpmpp_2m", num_steps=10, seed=3, batch_size=50)
    b = generate(den, (2,), 50, sampler="dpmpp_2m", num_steps=10, seed=3, batch_size=7)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_sharded_generate_concatenates_to_the_single_process_draw(world):
    """Each process's share of the batches, in rank order, is the one-process result — also for the "sde"
    sampler, whose fresh noise per batch comes from a generator of (seed, batch) — and batch 0 alone (a
    single-batch call) still draws its fresh noise from the seed's own generator after the initial noise."""
    den = GaussianMixtureDenoiser(GaussianMixture.ring(4), VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"]))
    ts = [999, 749, 499, 249]
    whole = generate(den, (2,), 53, sampler="sde", timesteps=ts, seed=4, batch_size=10)
    shares = [batch_share(53, 10, r, world) for r in range(world)]
    assert [i for share in shares for i in share] == list(range(53))
    assert all(len(share) % 10 == 0 for share in shares[:-1])  # whole batches
    parts = [generate(den, (2,), 53, sampler="sde", timesteps=ts, seed=4, batch_size=10, shard=(r, world))
             for r in range(world)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(4)
    noise = den.schedule.prior_sample((53, 2), generator=gen)
    first = get_sampler("sde")(den, noise[:10], sampling_grid(den, sampler="sde", timesteps=ts), generator=gen)
    torch.testing.assert_close(whole[:10], first.float(), rtol=0, atol=0)
    second = get_sampler("sde")(den, noise[10:20], sampling_grid(den, sampler="sde", timesteps=ts),
                                generator=batch_generator(4, 1))
    torch.testing.assert_close(whole[10:20], second.float(), rtol=0, atol=0)
