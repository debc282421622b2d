"""LCM (guidance-embedded consistency distillation) and iCT (improved consistency training)."""

from __future__ import annotations

import pytest
import torch

from conftest import SCHEDULER_CONFIGS, tiny_cond_unet, tiny_unet
from diffdistill.adapters import UNet2DDenoiser, add_time_condition
from diffdistill.analytic import GaussianMixture, GaussianMixtureDenoiser
from diffdistill.denoiser import Conditioning, Denoiser
from diffdistill.schedules import EDMSchedule, VPSchedule
from diffdistill.trainers.consistency import (
    consistency_distillation_loss, consistency_grid, lognormal_level_probs, teacher_solver_step,
)
from diffdistill.trainers.ict import ict_num_scales
from diffdistill.trainers.lcm import GuidanceEmbeddedStudent, guidance_scale_embedding

VP = VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"])


def test_guidance_embedding_matches_diffusers_lcm_pipeline():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 7.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(guidance_scale_embedding(w, 256), ref)
    assert guidance_scale_embedding(w, 7).shape == (3, 7)


def test_time_condition_starts_neutral_then_conditions(randomize_weights):
    unet = randomize_weights(tiny_unet(num_class_embeds=3))
    den = UNet2DDenoiser(unet, VP, "epsilon", null_class=2)
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    with torch.no_grad():
        before = den(x, 300.0, Conditioning(class_labels=labels))
        add_time_condition(unet, 16)
        emb = guidance_scale_embedding(torch.tensor([1.0, 3.0]), 16)
        neutral = den(x, 300.0, Conditioning(class_labels=labels, timestep_cond=emb))
        torch.testing.assert_close(neutral, before)  # zero-initialised projection
        unet.time_embedding.cond_proj.weight.normal_()
        moved = den(x, 300.0, Conditioning(class_labels=labels, timestep_cond=emb))
    assert not torch.allclose(moved, before)
    assert not unet.time_embedding._forward_pre_hooks  # the hook lives only during the call


def test_time_condition_on_text_unet_round_trips(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = tiny_cond_unet()
    add_time_condition(unet, 8)
    assert unet.config.time_cond_proj_dim == 8
    unet.save_pretrained(tmp_path / "u")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "u")
    assert again.time_embedding.cond_proj.weight.shape == unet.time_embedding.cond_proj.weight.shape


class CountingDenoiser(Denoiser):
    def __init__(self, schedule):
        super().__init__(None, schedule, "x0")
        self.calls, self.seen = 0, []

    def predict(self, x_t, t, cond):
        self.calls += 1
        self.seen.append(cond.timestep_cond)
        return x_t * 0 + cond.timestep_cond[:, :1].to(x_t)


def test_guidance_embedded_student_runs_once_and_embeds_w_minus_one():
    inner = CountingDenoiser(VP)
    student = GuidanceEmbeddedStudent(inner, 6, default_scale=2.5)
    x = torch.randn(3, 2)
    student(x, 100.0, guidance_scale=torch.tensor([1.0, 4.0, 8.0]))
    assert inner.calls == 1
    torch.testing.assert_close(inner.seen[0], guidance_scale_embedding(torch.tensor([0.0, 3.0, 7.0]), 6))
    student(x, 100.0)  # the default scale
    torch.testing.assert_close(inner.seen[1], guidance_scale_embedding(torch.tensor([1.5] * 3), 6))


def test_guided_teacher_step_with_per_sample_scales_is_exact():
    """LCM's target step: a DDIM step of the exactly guided analytic teacher, each sample at its own w."""
    teacher = GaussianMixtureDenoiser(GaussianMixture.ring(4), VP)
    x = torch.randn(4, 2, dtype=torch.float64)
    cond = Conditioning(class_labels=torch.tensor([0, 1, 2, 3]))
    t, r = torch.tensor([980.0, 700.0, 400.0, 60.0], dtype=torch.float64), torch.tensor([960.0, 680.0, 380.0, 40.0], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 5.0, 9.0], dtype=torch.float64)
    got = teacher_solver_step(teacher, x, t, r, cond, "ddim", w)
    for i in range(4):
        one = teacher_solver_step(teacher, x[i:i + 1], t[i:i + 1], r[i:i + 1], cond[i:i + 1], "ddim", float(w[i]))
        torch.testing.assert_close(got[i:i + 1], one)
        u, c = teacher(x[i:i + 1], t[i]), teacher(x[i:i + 1], t[i], cond[i:i + 1])
        x0 = u + w[i] * (c - u)
        (a_t, s_t), (a_r, s_r) = VP.alpha_sigma(t[i]), VP.alpha_sigma(r[i])
        torch.testing.assert_close(one, a_r * x0 + s_r * (x[i:i + 1] - a_t * x0) / s_t)


class ExactGuidedMap(Denoiser):
    """The consistency function of the discretised, guided teacher ODE, taking w as its input."""

    def __init__(self, teacher, grid):
        super().__init__(None, teacher.schedule, "x0")
        self.teacher, self.grid = teacher, grid

    def forward(self, x_t, t, cond=None, *, guidance_scale=None, output="x0"):
        out = []
        for i in range(len(x_t)):
            x, k = x_t[i:i + 1], int(torch.nonzero(self.grid == t[i])[0, 0])
            for j in range(k, 0, -1):
                x = teacher_solver_step(self.teacher, x, self.grid[j:j + 1], self.grid[j - 1:j], cond[i:i + 1],
                                        "ddim", float(guidance_scale[i]))
            out.append(x[0] / self.schedule.alpha_sigma(self.grid[0])[0])
        return torch.stack(out)


def test_lcm_loss_of_the_exact_guided_map_is_zero():
    teacher = GaussianMixtureDenoiser(GaussianMixture.ring(4), VP)
    grid = consistency_grid(VP, 6, "uniform", float(VP.sigma(0.0)), float(VP.sigma(999.0)))
    exact = ExactGuidedMap(teacher, grid)
    x0, comp = teacher.mixture.sample(16, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(class_labels=comp)
    w = 1 + 4 * torch.rand(16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    terms = consistency_distillation_loss(teacher, exact, exact, x0, cond, grid, solver="ddim", guidance_scale=w,
                                          generator=torch.Generator().manual_seed(1))
    assert abs(terms["loss"].item()) < 1e-12


def test_ict_curriculum_follows_eq_11():
    # K = 1000: K' = floor(1000 / (log2(128) + 1)) = 125
    assert [ict_num_scales(k, 1000) for k in (0, 124, 125, 250, 999)] == [11, 11, 21, 41, 1281]
    assert ict_num_scales(10**6, 1000) == 1281


def test_lognormal_level_probs():
    sig = torch.tensor([0.002, 0.1, 0.5, 1.0, 5.0, 80.0], dtype=torch.float64)
    p = lognormal_level_probs(sig)
    assert abs(p.sum().item() - 1) < 1e-12 and (p > 0).all()
    cdf = torch.erf((torch.log(sig) + 1.1) / (2**0.5 * 2.0))
    torch.testing.assert_close(p, (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0]))


class Identity(Denoiser):
    def __init__(self, schedule):
        super().__init__(None, schedule, "x0")

    def predict(self, x_t, t, cond):
        return x_t


def test_consistency_training_pairs_share_data_and_noise():
    """CT: x_{n+1} = x0 + σ_{n+1}·z and x̂_n = x0 + σ_n·z, so an identity f gives d = (σ_{n+1} − σ_n)²·mean(z²)."""
    sched = EDMSchedule()
    sig = torch.tensor([0.002, 0.5, 2.0, 10.0, 80.0], dtype=torch.float64)
    x0 = torch.randn(8, 3, dtype=torch.float64)
    probs = lognormal_level_probs(sig)
    terms = consistency_distillation_loss(None, Identity(sched), Identity(sched), x0, Conditioning(), sig,
                                          schedule=sched, level_probs=probs, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    n = torch.multinomial(probs, 8, replacement=True, generator=gen)
    z = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    expect = ((sig[n + 1] - sig[n])[:, None] ** 2 * z**2).mean(1).mean()
    torch.testing.assert_close(terms["loss"], expect)


@pytest.mark.parametrize("method", ["lcm", "ict"])
def test_cpu_runs(method, tiny_teacher_dir, tmp_path):
    from diffdistill.trainers.loop import Trainer
    from diffdistill.trainers.method import load_distill_config

    extra = ["lcm.num_scales=10", "lcm.embedding_dim=16"] if method == "lcm" else ["ict.s1=40"]
    cfg = load_distill_config(None, [f"method={method}", f"teacher={tiny_teacher_dir}", "data.resolution=8",
                                     "train.max_steps=3", "train.batch_size=8", "train.sample_every=3", *extra])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    m = trainer.method
    teacher_state = {k: v.clone() for k, v in m.teacher.denoiser.network.state_dict().items()}
    terms = [trainer.train_step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(v)) for t in terms for v in t.values())
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.denoiser.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in m.teacher.denoiser.network.state_dict().items())
    if method == "lcm":
        assert getattr(m.teacher.denoiser.network.time_embedding, "cond_proj", None) is None
        assert m.student.time_embedding.cond_proj.weight.abs().sum() > 0  # the w-embedding trained
        assert 1.0 <= terms[0]["student/w_mean"] <= 4.0
    else:
        assert set(trainer.networks()) == {"student", "ema_0.999"}  # no target network: θ⁻ = sg(θ)
        assert terms[0]["student/num_scales"] == 11
    trainer.sample_grids()
    assert len(list((tmp_path / "run" / "samples").iterdir())) == 3


@pytest.mark.parametrize("method", ["lcm", "ict"])
def test_sample_sigmas_keys_of_lcm_and_ict(method, tiny_teacher_dir):
    from diffdistill.errors import ConfigError
    from diffdistill.trainers.loop import build_method
    from diffdistill.trainers.method import load_distill_config

    base = [f"method={method}", f"teacher={tiny_teacher_dir}", "data.resolution=8"]
    default = build_method(load_distill_config(None, base))
    m = build_method(load_distill_config(None, base + [f"{method}.sample_sigmas.4=10.0,1.0,0.1"]))
    four = m.student_timesteps(4)
    assert four[0] == pytest.approx(default.student_timesteps(4)[0], abs=1e-9) and four != default.student_timesteps(4)
    sigmas = m.teacher.denoiser.schedule.sigma(torch.tensor(four[1:], dtype=torch.float64))
    torch.testing.assert_close(sigmas, torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64), rtol=1e-9, atol=0)
    assert m.student_timesteps(2) == default.student_timesteps(2)
    with pytest.raises(ConfigError, match=f"{method}.sample_sigmas"):
        build_method(load_distill_config(None, base + [f"{method}.sample_sigmas.3=0.1,1.0"]))
