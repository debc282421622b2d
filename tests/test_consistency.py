"""Consistency distillation: boundary condition, the teacher solver step, zero loss for the exact map."""

from __future__ import annotations

import pytest
import torch

from conftest import SCHEDULER_CONFIGS
from diffdistill.analytic import GaussianMixture, GaussianMixtureDenoiser
from diffdistill.denoiser import Conditioning, Denoiser
from diffdistill.samplers import get_sampler
from diffdistill.schedules import EDMSchedule, VPSchedule
from diffdistill.trainers.consistency import (
    ConsistencyDenoiser, consistency_distillation_loss, consistency_grid, pseudo_huber, teacher_solver_step,
)

VP = VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"])


def analytic(schedule=VP):
    return GaussianMixtureDenoiser(GaussianMixture.ring(4, weights=[1, 2, 3, 4]), schedule)


def test_cm_boundary_is_identity_at_sigma_min_and_denoiser_far_from_it():
    teacher = analytic()
    sigma_min = float(VP.sigma(0.0))
    f = ConsistencyDenoiser(teacher, sigma_min, boundary="cm")
    x = torch.randn(8, 2, dtype=torch.float64)
    a0 = VP.alpha_sigma(0.0)[0]
    torch.testing.assert_close(f(x, 0.0), x / a0, rtol=1e-12, atol=1e-12)
    # at σ = 157 the CM coefficients match EDM's up to σ_min/σ ≈ 6e-5, so f ≈ D
    torch.testing.assert_close(f(x, 999.0), teacher(x, 999.0), rtol=1e-3, atol=1e-3)
    lcm = ConsistencyDenoiser(teacher, sigma_min, boundary="lcm")
    torch.testing.assert_close(lcm(x, 0.0), x)
    torch.testing.assert_close(lcm(x, 999.0), teacher(x, 999.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", ["heun", "euler", "ddim"])
def test_per_sample_solver_step_equals_the_samplers(solver):
    teacher = analytic(EDMSchedule())
    grid = consistency_grid(teacher.schedule, 10, "karras", 0.002, 80.0)
    x = torch.randn(6, 2, dtype=torch.float64) * 5
    n = torch.tensor([0, 1, 3, 5, 7, 8])
    got = teacher_solver_step(teacher, x, grid[n + 1], grid[n], Conditioning(), solver)
    for i in range(6):
        one = get_sampler(solver)(teacher, x[i:i + 1], torch.stack([grid[n[i] + 1], grid[n[i]]]))
        torch.testing.assert_close(got[i:i + 1], one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["heun", "ddim"])
def test_substeps_are_steps_at_log_spaced_levels_and_approach_the_exact_ode(solver):
    teacher = analytic(EDMSchedule())
    x = torch.randn(4, 2, dtype=torch.float64) * 3
    t = torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    r = torch.tensor([1.0, 0.2, 0.1, 0.02], dtype=torch.float64)
    got = teacher_solver_step(teacher, x, t, r, Conditioning(), solver, substeps=3)
    for i in range(4):  # EDM: t = σ, so the levels are t·(r/t)^(k/3)
        levels = torch.stack([t[i] * (r[i] / t[i]) ** (k / 3) for k in range(4)])
        want = get_sampler(solver)(teacher, x[i:i + 1], levels)
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-10, atol=1e-10)
    fine = teacher_solver_step(teacher, x, t, r, Conditioning(), "heun", substeps=200)
    errors = [(teacher_solver_step(teacher, x, t, r, Conditioning(), solver, substeps=k) - fine).abs().max()
              for k in (1, 4)]
    assert errors[1] < errors[0] / 4, errors


class ExactConsistencyMap(Denoiser):
    """The consistency function of the discretised teacher ODE: solver steps down to grid[0], then f = x/a."""

    def __init__(self, teacher, grid, solver):
        super().__init__(None, teacher.schedule, "x0")
        self.teacher, self.grid, self.solver = teacher, grid, solver

    def predict(self, x_t, t, cond):
        out = []
        for xi, ti in zip(x_t, t):
            x, k = xi[None], int(torch.nonzero(self.grid == ti)[0, 0])
            for j in range(k, 0, -1):
                x = teacher_solver_step(self.teacher, x, self.grid[j], self.grid[j - 1], Conditioning(), self.solver)
            out.append(x[0] / self.schedule.alpha_sigma(self.grid[0])[0])
        return torch.stack(out)


@pytest.mark.parametrize("solver", ["heun", "ddim"])
def test_loss_of_the_exact_consistency_map_is_zero(solver):
    teacher = analytic()
    grid = consistency_grid(VP, 8, "karras", float(VP.sigma(0.0)), 80.0)
    exact = ExactConsistencyMap(teacher, grid, solver)
    x0, _ = teacher.mixture.sample(32, generator=torch.Generator().manual_seed(0))
    for distance in ["l2", "pseudo_huber"]:
        terms = consistency_distillation_loss(teacher, exact, exact, x0, Conditioning(), grid, solver=solver,
                                              distance=distance, generator=torch.Generator().manual_seed(1))
        assert abs(terms["loss"].item()) < 1e-12, (distance, terms["loss"].item())
    wrong = consistency_distillation_loss(teacher, teacher, teacher, x0, Conditioning(), grid, solver=solver,
                                          generator=torch.Generator().manual_seed(1))
    assert wrong["loss"].item() > 1e-4


def test_pseudo_huber_formula():
    x, y = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    c = 0.00054 * 48**0.5
    torch.testing.assert_close(pseudo_huber(x, y), torch.full((2,), (48 + c * c) ** 0.5 - c))


def test_grids():
    g = consistency_grid(VP, 5, "karras", float(VP.sigma(0.0)), float(VP.sigma(999.0)))
    assert torch.all(g[1:] > g[:-1]) and abs(g[0].item()) < 1e-9 and abs(g[-1].item() - 999) < 1e-9
    u = consistency_grid(VP, 5, "uniform", float(VP.sigma(0.0)), float(VP.sigma(999.0)))
    torch.testing.assert_close(u, torch.linspace(0, 999, 5, dtype=torch.float64), atol=1e-9, rtol=0)


def test_cpu_run_updates_student_and_target_not_teacher(tiny_teacher_dir, tmp_path):
    from diffdistill.trainers.loop import Trainer
    from diffdistill.trainers.method import load_distill_config

    cfg = load_distill_config(None, ["method=consistency", f"teacher={tiny_teacher_dir}", "data.resolution=8",
                                     "train.max_steps=3", "train.batch_size=8", "train.sample_every=3",
                                     "consistency.num_scales=6", "consistency.distance=pseudo_huber"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    m = trainer.method
    teacher_before = {k: v.clone() for k, v in m.teacher.denoiser.network.state_dict().items()}
    target_before = {k: v.clone() for k, v in m.target.state_dict().items()}
    trainer.run()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.denoiser.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in m.teacher.denoiser.network.state_dict().items())
    assert any(not torch.equal(v, target_before[k]) for k, v in m.target.state_dict().items())
    assert any(not torch.equal(v, m.student.state_dict()[k]) for k, v in m.target.state_dict().items())
    assert (tmp_path / "run" / "samples" / "step_0000003_4step.png").is_file()


def test_sample_sigmas_set_the_multistep_levels_and_bad_lists_are_refused(tiny_teacher_dir):
    from diffdistill.errors import ConfigError
    from diffdistill.trainers.loop import build_method
    from diffdistill.trainers.method import load_distill_config

    base = ["method=consistency", f"teacher={tiny_teacher_dir}", "data.resolution=8", "consistency.num_scales=6"]
    m = build_method(load_distill_config(None, base + ["consistency.sample_sigmas.3=2.0,0.5"]))
    schedule = m.teacher.denoiser.schedule
    three = m.student_timesteps(3)
    assert three[0] == float(m.grid[-1]) and len(three) == 3
    torch.testing.assert_close(schedule.sigma(torch.tensor(three[1:], dtype=torch.float64)),
                               torch.tensor([2.0, 0.5], dtype=torch.float64), rtol=1e-9, atol=0)
    default = build_method(load_distill_config(None, base))
    assert m.student_timesteps(2) == default.student_timesteps(2) and three != default.student_timesteps(3)
    for bad in ["consistency.sample_sigmas.3=0.5,2.0", "consistency.sample_sigmas.3=2.0",
                "consistency.sample_sigmas.2=1e9"]:
        with pytest.raises(ConfigError, match="sample_sigmas"):
            build_method(load_distill_config(None, base + [bad]))
