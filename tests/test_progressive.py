"""Progressive distillation: the closed-form target on the analytic teacher, and a CPU run."""

from __future__ import annotations

import pytest
import torch

from conftest import SCHEDULER_CONFIGS
from diffdistill.analytic import GaussianMixture, GaussianMixtureDenoiser
from diffdistill.denoiser import Conditioning, Denoiser
from diffdistill.samplers.base import ddim_step
from diffdistill.schedules import FlowSchedule, VPSchedule
from diffdistill.trainers.progressive import progressive_grid, progressive_loss, progressive_target

SCHEDULES = {"vp": VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["squaredcos_cap_v2"]), "flow": FlowSchedule()}


def two_teacher_steps(teacher, z_t, t, mid, r):
    z_mid = ddim_step(teacher, z_t, teacher(z_t, t), t, mid)
    return ddim_step(teacher, z_mid, teacher(z_mid, mid), mid, r)


@pytest.mark.parametrize("name", SCHEDULES)
def test_target_reproduces_two_exact_teacher_steps(name):
    """One student DDIM step with x0 = x̃ from z_t lands on the teacher's two-step z_r (float64)."""
    sched = SCHEDULES[name]
    teacher = GaussianMixtureDenoiser(GaussianMixture.ring(5), sched)
    grid = progressive_grid(sched, 8)
    i = torch.arange(4)  # every student step, the last one ending at clean data
    t, mid, r = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    z_t = sched.add_noise(torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), t)
    z_r = two_teacher_steps(teacher, z_t, t, mid, r)
    target = progressive_target(sched, z_t, z_r, t, r)
    torch.testing.assert_close(ddim_step(teacher, z_t, target, t, r), z_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(target[-1], z_r[-1])  # a step to clean data: x̃ is z_r itself


def test_grids_nest():
    sched = SCHEDULES["vp"]
    assert progressive_grid(sched, 4).tolist() == [999, 749, 499, 249, -1]
    torch.testing.assert_close(progressive_grid(sched, 16)[::2], progressive_grid(sched, 8))


class ExactTwoStepStudent(Denoiser):
    """The perfect N-step student: the x0 whose DDIM step equals two exact teacher steps."""

    def __init__(self, teacher, n):
        super().__init__(None, teacher.schedule, "x0")
        self.teacher, self.grid = teacher, progressive_grid(teacher.schedule, 2 * n)

    def predict(self, x_t, t, cond):
        k = torch.stack([torch.nonzero(self.grid == ti)[0, 0] for ti in t])
        mid, r = self.grid[k + 1], self.grid[k + 2]
        return progressive_target(self.schedule, x_t, two_teacher_steps(self.teacher, x_t, t, mid, r), t, r)


@pytest.mark.parametrize("name", SCHEDULES)
def test_loss_of_the_perfect_student_is_zero(name):
    teacher = GaussianMixtureDenoiser(GaussianMixture.ring(5), SCHEDULES[name])
    x0, _ = teacher.mixture.sample(64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    terms = progressive_loss(teacher, ExactTwoStepStudent(teacher, 4), x0, Conditioning(), 4, "truncated_snr", gen)
    assert terms["loss"].item() < 1e-20
    imperfect = progressive_loss(teacher, teacher, x0, Conditioning(), 4, "truncated_snr",
                                 torch.Generator().manual_seed(1))
    assert imperfect["loss"].item() > 1e-4  # the one-step teacher is not its own two-step map


def test_cpu_run_trains_student_only_and_advances_rounds(tiny_teacher_dir, tmp_path):
    from diffdistill.trainers.loop import Trainer
    from diffdistill.trainers.method import load_distill_config

    cfg = load_distill_config(None, ["method=progressive", f"teacher={tiny_teacher_dir}", "data.resolution=8",
                                     "train.max_steps=6", "train.batch_size=8", "train.grad_accum=2",
                                     "train.sample_every=6", "train.checkpoint_every=3",
                                     "progressive.initial_steps=8", "progressive.steps_per_round=3"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    method = trainer.method
    teacher_before = {k: v.clone() for k, v in method.teacher.denoiser.network.state_dict().items()}
    student_before = {k: v.clone() for k, v in method.student.state_dict().items()}
    terms = [trainer.train_step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(v)) for t in terms for v in t.values())
    assert set(terms[0]) == {"student/loss", "student/mse_x0"}
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.denoiser.parameters())
    for k, v in method.teacher.denoiser.network.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    assert any(not torch.equal(v, student_before[k]) for k, v in method.student.state_dict().items())
    # round 0 ended after 3 steps: the student became the teacher and N halved (8 -> 4 -> 2 steps)
    assert method.round == 1 and method.student_steps == 2
    for k, v in method.round_teacher.state_dict().items():
        assert torch.equal(v, method.student.state_dict()[k])
    ema = next(iter(trainer.ema.values()))
    for k, v in ema.state_dict().items():  # EMA restarted from the new round's student
        assert torch.equal(v, method.student.state_dict()[k])
    trainer.run()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        f"step_0000006_{n}step.png" for n in (1, 2, 4)]
