"""The distribution-matching family: DMD, DMD2, VSD, SiD, the fake-score critic and the GAN heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SCHEDULER_CONFIGS
from diffdistill.analytic import GaussianMixture, GaussianMixtureDenoiser
from diffdistill.denoiser import Conditioning
from diffdistill.schedules import VPSchedule
from diffdistill.trainers.distribution_matching import dmd_direction, dmd_loss, sid_loss, vsd_direction, vsd_loss
from diffdistill.trainers.loop import Trainer
from diffdistill.trainers.method import load_distill_config

REPO = Path(__file__).resolve().parent.parent
VP = VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"])


def tiny(method, teacher_dir, *extra):
    return load_distill_config(None, [f"method={method}", f"teacher={teacher_dir}", "data.resolution=8",
                                      "train.max_steps=2", "train.batch_size=4", "train.sample_every=0",
                                      "critic.lora_rank=2", *extra])


def counting(trainer):
    counts = {r: 0 for r in trainer.optimizers}
    for role, opt in trainer.optimizers.items():
        original = opt.step

        def step(*a, _role=role, _orig=original, **k):
            counts[_role] += 1
            return _orig(*a, **k)
        opt.step = step
    return counts


CASES = [
    ("dmd", ["dmd.num_pairs=8", "dmd.pair_steps=2"]),
    ("dmd2", ["critic.updates=3"]),
    ("dmd2", ["critic.updates=2", "gan.features=teacher", "gan.penalty=r1", "generator.student_steps=2",
              "generator.student_inputs=noised_data"]),
    ("dmd2", ["critic.updates=1", "gan.penalty=approx_r1", "generator.student_steps=4", "critic.kind=lora"]),
    ("dmd2", ["critic.updates=2", "generator.student_steps=2", "critic.per_step=true"]),
    ("dmd2", ["critic.updates=2", "generator.student_steps=2", "critic.step_embedding=true", "critic.kind=lora"]),
    ("vsd", []),
    ("sid", []),
]


@pytest.mark.parametrize("method,extra", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_cpu_runs_step_the_right_roles(method, extra, tiny_teacher_dir, tmp_path):
    trainer = Trainer(tiny(method, tiny_teacher_dir, *extra), tmp_path / "run", progress=False)
    m, cfg = trainer.method, trainer.cfg
    teacher_state = {k: v.clone() for k, v in m.teacher.denoiser.network.state_dict().items()}
    counts = counting(trainer)
    student_before = [p.clone() for p in m.student.parameters()]
    terms = [trainer.train_step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(v)) for t in terms for v in t.values())
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.denoiser.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in m.teacher.denoiser.network.state_dict().items())
    updates = cfg.critic.updates
    expected = {"student": 2, "fake_score": 2 * updates} | ({"discriminator": 2 * updates} if cfg.gan.enabled else {})
    assert counts == expected
    assert any(not torch.equal(a, b) for a, b in zip(student_before, m.student.parameters()))
    names = set(terms[0])
    assert {"critic/score_matching", "generator/loss"} <= names
    assert ("critic/gan_discriminator" in names) == cfg.gan.enabled == ("generator/gan_generator" in names)
    assert ("critic/fake_realism" in names) == cfg.gan.enabled == ("critic/real_realism" in names)
    if cfg.gan.enabled and cfg.gan.penalty != "none":
        assert "critic/gan_penalty" in names
    if method == "dmd":
        assert "generator/regression" in names


def test_lora_critic_trains_adapters_only_and_is_checkpointed_without_the_teacher(tiny_teacher_dir, tmp_path):
    from safetensors.torch import load_file

    from diffdistill.trainers.checkpoint import latest_checkpoint

    cfg = tiny("vsd", tiny_teacher_dir, "train.checkpoint_every=2")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    critic, teacher = trainer.method.critic, trainer.method.teacher.denoiser.network
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.clone() for n, p in critic.named_parameters() if "lora_" not in n}
    lora_before = {n: p.clone() for n, p in critic.named_parameters() if "lora_" in n}
    trainer.run()
    assert all(torch.equal(p, frozen_before[n]) for n, p in critic.named_parameters() if "lora_" not in n)
    assert any(not torch.equal(p, lora_before[n]) for n, p in critic.named_parameters() if "lora_" in n)
    teacher_ids = {p.data_ptr() for p in teacher.parameters()}
    assert all(p.data_ptr() in teacher_ids for n, p in critic.named_parameters() if "lora_" not in n)  # shared
    saved = load_file(latest_checkpoint(tmp_path / "run") / "fake_score.safetensors")
    assert set(saved) and all("lora_" in k for k in saved)  # the frozen teacher is never written
    resumed = Trainer(cfg, tmp_path / "run", progress=False)
    resumed.load(latest_checkpoint(tmp_path / "run"))
    for (n, p), q in zip(critic.named_parameters(), resumed.method.critic.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("critic_switch", ["critic.per_step=false", "critic.per_step=true", "critic.step_embedding=true"])
def test_score_distillation_resume_is_bit_identical(critic_switch, tiny_teacher_dir, tmp_path):
    from diffdistill.trainers.loop import distill

    extra = ["train.max_steps=4", "train.checkpoint_every=2", "critic.updates=2", "generator.student_steps=2",
             critic_switch]
    straight = Trainer(tiny("dmd2", tiny_teacher_dir, *extra), tmp_path / "a", progress=False)
    straight.run()
    distill(tiny("dmd2", tiny_teacher_dir, *extra), tmp_path / "b", max_steps=2, progress=False)
    resumed = Trainer(tiny("dmd2", tiny_teacher_dir, *extra), tmp_path / "b", progress=False)
    resumed.run(resume=True)
    for stem, net in straight.networks().items():
        for (k, v), w in zip(net.state_dict().items(), resumed.networks()[stem].state_dict().values()):
            assert torch.equal(v, w), (stem, k)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_per_step_critics_each_see_only_their_own_step(kind, tmp_path, monkeypatch):
    """``critic.per_step``: K critics; when an update trains student step k, only critic k is queried (critic
    phase and generator phase alike) and only critic k's weights move. Off, or with K = 1, one critic."""
    from diffdistill import toy

    monkeypatch.setattr(toy, "FIT_STEPS", 20)
    base = [f"critic.kind={kind}", "critic.lora_targets=[trunk.2,head]", "train.batch_size=16", "critic.updates=2", "gan.enabled=true",
            "gan.features=critic"]
    cfg = load_distill_config(str(REPO / "configs/toy/dmd2.yaml"),
                              [*base, "generator.student_steps=4", "critic.per_step=true"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    m = trainer.method
    assert isinstance(m.critic, torch.nn.ModuleList) and len(m.critic) == 4
    assert len({id(c) for c in m.critic}) == 4 and m.critic_denoiser(3).network is m.critic[3]
    calls = []
    for k, critic in enumerate(m.critic):
        critic.register_forward_hook(lambda mod, args, out, _k=k: calls.append(_k))
    monkeypatch.setattr(m, "draw_step", lambda generator: 2)
    before = [[p.detach().clone() for p in c.parameters() if p.requires_grad] for c in m.critic]
    terms = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    assert calls and set(calls) == {2}
    for k, (critic, old) in enumerate(zip(m.critic, before)):
        moved = any(not torch.equal(p, q) for p, q in zip((p for p in critic.parameters() if p.requires_grad), old))
        assert moved == (k == 2), k
    for extra in (["generator.student_steps=4", "critic.per_step=false"], ["critic.per_step=true"]):
        one = Trainer(load_distill_config(str(REPO / "configs/toy/dmd2.yaml"), [*base, *extra]), tmp_path / "one",
                      progress=False).method
        assert not isinstance(one.critic, torch.nn.ModuleList)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_step_embedded_critic_starts_as_one_critic_and_learns_per_step(kind, tiny_teacher_dir, tmp_path, monkeypatch):
    """``critic.step_embedding``: one critic network, told the step through a zero-initialised projection of
    the step's one-hot code into its time embedding. At initialisation every step's critic is the plain one;
    an update that trains step k moves only column k of that projection (and the critic's other weights)."""
    extra = ["critic.updates=1", "generator.student_steps=4", f"critic.kind={kind}", "gan.enabled=true",
             "gan.features=critic", "student.lora_rank=0"]
    trainer = Trainer(tiny("dmd2", tiny_teacher_dir, *extra, "critic.step_embedding=true"), tmp_path / "a",
                      progress=False)
    plain = Trainer(tiny("dmd2", tiny_teacher_dir, *extra), tmp_path / "b", progress=False).method
    m = trainer.method
    proj = m.critic.time_embedding.cond_proj
    assert proj.weight.shape[1] == 4 and proj.weight.requires_grad and not proj.weight.any()
    assert m.teacher.denoiser.network.time_embedding.cond_proj is None
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = m.teacher.cycled_conditioning(3, None)
    t = torch.tensor([100.0, 500.0, 900.0], dtype=torch.float64)
    with torch.no_grad():
        reference = plain.critic_denoiser()(x, t, cond)
        for k in range(4):
            torch.testing.assert_close(m.critic_denoiser(k)(x, t, cond), reference)
            torch.testing.assert_close(m.gan_source(k).features(x, t, cond), plain.gan_source().features(x, t, cond))
    monkeypatch.setattr(m, "draw_step", lambda generator: 2)
    terms = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    moved = proj.weight.detach().abs().sum(0)
    assert moved[2] > 0 and not moved[[0, 1, 3]].any()
    with torch.no_grad():
        assert not torch.equal(m.critic_denoiser(2)(x, t, cond), m.critic_denoiser(0)(x, t, cond))


def test_step_embedding_refusals(tiny_teacher_dir, tmp_path, monkeypatch):
    from diffdistill import toy
    from diffdistill.adapters import add_time_condition
    from diffdistill.errors import ConfigError
    from diffdistill.trainers.critic import add_step_input

    with pytest.raises(ConfigError, match="two alternatives"):
        tiny("dmd2", tiny_teacher_dir, "generator.student_steps=2", "critic.per_step=true", "critic.step_embedding=true")
    monkeypatch.setattr(toy, "FIT_STEPS", 5)
    cfg = load_distill_config(str(REPO / "configs/toy/dmd2.yaml"), ["generator.student_steps=2",
                                                                    "critic.step_embedding=true"])
    with pytest.raises(ConfigError, match="time embedding.*critic.per_step"):
        Trainer(cfg, tmp_path / "toy", progress=False)
    lcm_like = Trainer(tiny("dmd2", tiny_teacher_dir), tmp_path / "lcm", progress=False).method.critic
    add_time_condition(lcm_like, 16)
    with pytest.raises(ConfigError, match="already takes a condition"):
        add_step_input(lcm_like, 4)


def test_data_free_methods_refuse_data_switches(tiny_teacher_dir, tmp_path):
    from diffdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="data-free"):
        Trainer(tiny("sid", tiny_teacher_dir, "generator.student_inputs=noised_data"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="data-free"):
        Trainer(tiny("vsd", tiny_teacher_dir, "gan.enabled=true"), tmp_path / "b", progress=False)


# --- closed forms on Gaussians -------------------------------------------------------------------

def gaussian(mean, var, dim=3):
    return GaussianMixtureDenoiser(GaussianMixture([1.0], torch.full((1, dim), float(mean), dtype=torch.float64), [float(var)]), VP)


def analytic_x0(x_t, a, s, mean, var):
    return mean + a * var / (a**2 * var + s**2) * (x_t - a * mean)


@pytest.mark.parametrize("t", [50.0, 400.0, 900.0])
def test_dmd_and_vsd_directions_are_the_analytic_score_difference(t):
    mu, v, m, u = 1.5, 0.3, -0.5, 2.0  # teacher N(mu, v I); student N(m, u I) with an exact fake score
    teacher, fake = gaussian(mu, v), gaussian(m, u)
    gen = torch.Generator().manual_seed(0)
    x = m + u**0.5 * torch.randn(16, 3, generator=gen, dtype=torch.float64)
    a, s = (c.item() for c in VP.alpha_sigma(torch.tensor(t)))
    x_t = VP.add_noise(x, torch.randn(16, 3, generator=gen, dtype=torch.float64), torch.full((16,), t))
    real, fake_x0 = teacher(x_t, t), fake(x_t, t)
    exact = analytic_x0(x_t, a, s, m, u) - analytic_x0(x_t, a, s, mu, v)  # methods.md §5
    torch.testing.assert_close(fake_x0 - real, exact, rtol=1e-10, atol=1e-12)
    norm = (x - analytic_x0(x_t, a, s, mu, v)).abs().mean(1, keepdim=True)
    torch.testing.assert_close(dmd_direction(x, real, fake_x0), exact / norm, rtol=1e-10, atol=1e-12)
    # autograd of the surrogate loss gives the direction (divided by numel)
    xg = x.clone().requires_grad_(True)
    dmd_loss(xg, real, fake_x0).backward()
    torch.testing.assert_close(xg.grad * x.numel(), exact / norm, rtol=1e-10, atol=1e-12)
    xg.grad = None
    vsd_loss(xg, real, fake_x0, torch.tensor(a, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)).backward()
    eps_gap = (x_t - a * analytic_x0(x_t, a, s, mu, v)) / s - (x_t - a * analytic_x0(x_t, a, s, m, u)) / s
    torch.testing.assert_close(xg.grad * x.numel(), s**2 * eps_gap, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(vsd_direction(real, fake_x0, torch.tensor(a, dtype=torch.float64), torch.tensor(s, dtype=torch.float64), "uniform"), eps_gap,
                               rtol=1e-9, atol=1e-12)


def test_dmd_gradient_moves_a_gaussian_generator_toward_the_teacher():
    """G(z) = m + sqrt(u)·z with an exact fake score: descending the expected DMD loss moves m toward μ
    (at u = v) and u toward v (at m = μ) (methods.md §5)."""
    mu, v = 1.0, 0.25
    for m0, u0 in [(-1.0, v), (2.5, v), (mu, 1.0), (mu, 0.05)]:
        m = torch.tensor(m0, dtype=torch.float64, requires_grad=True)
        log_u = torch.tensor(u0, dtype=torch.float64).log().requires_grad_(True)
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(4096, 2, generator=gen, dtype=torch.float64)
        x = m + log_u.exp().sqrt() * z
        t = torch.randint(20, 980, (4096,), generator=gen).double()
        x_t = VP.add_noise(x.detach(), torch.randn(4096, 2, generator=gen, dtype=torch.float64), t)
        teacher, fake = gaussian(mu, v, 2), gaussian(m0, u0, 2)
        dmd_loss(x, teacher(x_t, t), fake(x_t, t)).backward()
        if m0 != mu:
            assert torch.sign(-m.grad) == torch.sign(torch.tensor(mu - m0))
        else:
            assert torch.sign(-log_u.grad) == torch.sign(torch.tensor(v - u0))


def test_sid_loss_matches_its_formula_and_gradient():
    mu, v, m, u, alpha = 0.7, 0.4, -0.2, 1.3, 1.2
    teacher, fake = gaussian(mu, v), gaussian(m, u)
    gen = torch.Generator().manual_seed(1)
    x = (m + u**0.5 * torch.randn(8, 3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    t = torch.full((8,), 300.0)
    eps = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    a, s = (c.item() for c in VP.alpha_sigma(torch.tensor(300.0)))
    x_t = VP.add_noise(x, eps, t)
    loss = sid_loss(x, teacher(x_t, t), fake(x_t, t), alpha)
    # the formula, by hand (Zhou et al. 2024, eq. 23; official SID_EDMLoss), in closed form
    xd = x.detach()
    xt_d = a * xd + s * eps
    fr, ff = analytic_x0(xt_d, a, s, mu, v), analytic_x0(xt_d, a, s, m, u)
    norm = (xd - fr).abs().mean(1, keepdim=True)
    by_hand = ((fr - ff) * ((fr - xd) - alpha * (fr - ff)) / norm).mean()
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-12, atol=1e-14)
    loss.backward()
    # d/dx through x_t = a·x + s·ε: both predictions are linear in x_t with slopes k_r, k_f
    k_r, k_f = a * v / (a**2 * v + s**2), a * u / (a**2 * u + s**2)
    d_fr, d_ff = a * k_r, a * k_f
    gap = fr - ff
    grad = ((d_fr - d_ff) * ((fr - xd) - alpha * gap) + gap * ((d_fr - 1) - alpha * (d_fr - d_ff))) / norm / x.numel()
    torch.testing.assert_close(x.grad, grad, rtol=1e-10, atol=1e-14)


def test_pairs_command_makes_teacher_ode_pairs_that_dmd_reads(tiny_teacher_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from diffdistill.cli import main
    from diffdistill.pretrained import load_pretrained
    from diffdistill.samplers import get_sampler, sampling_grid
    from diffdistill.denoiser import Conditioning

    out = tmp_path / "pairs.safetensors"
    args = ["pairs", "--teacher", str(tiny_teacher_dir), "--output", str(out), "--num", "6", "--steps", "3",
            "--sampler", "ddim"]
    assert main(args) == 0
    pairs = load_file(out)
    teacher = load_pretrained(tiny_teacher_dir)
    ts = sampling_grid(teacher.denoiser, sampler="ddim", num_steps=3)
    again = get_sampler("ddim")(teacher.denoiser, pairs["noise"], ts, Conditioning(class_labels=pairs["labels"]))
    torch.testing.assert_close(again, pairs["images"])  # each image is the teacher's ODE map of its noise
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never overwritten silently
    trainer = Trainer(tiny("dmd", tiny_teacher_dir, f"dmd.pairs={out}"), tmp_path / "run", progress=False)
    assert torch.equal(trainer.method.pairs["noise"], pairs["noise"])


def test_analytic_teacher_runs_through_the_loop(tmp_path, monkeypatch):
    """``teacher: analytic:ring8``: the exact mixture denoiser is the teacher, an MLP fitted to it seeds the
    student and critic, and the data are exact mixture samples."""
    from diffdistill import toy
    from diffdistill.analytic import GaussianMixtureDenoiser

    monkeypatch.setattr(toy, "FIT_STEPS", 20)
    cfg = load_distill_config(str(REPO / "configs/toy/dmd2.yaml"), [
        "train.max_steps=2", "train.batch_size=16", "gan.enabled=true", "critic.updates=2"])  # the MLP head too
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    m = trainer.method
    assert isinstance(m.teacher.denoiser, GaussianMixtureDenoiser) and m.teacher.sample_shape == (2,)
    assert type(m.student).__name__ == "ToyMLP" and m.head is not None
    terms = [trainer.train_step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(v)) for t in terms for v in t.values())
    x = m.sample_student((torch.zeros(5, 2), Conditioning()), torch.Generator().manual_seed(0), grad=False)[0]
    assert x.shape == (5, 2)


def test_toy_network_fit_is_shared_however_it_is_called(monkeypatch):
    """The run's teacher loading and bench/toy_gmm.py's pre-fit (outside its timer) must hit one cache entry:
    ``fit_toy_network(name)`` and ``fit_toy_network(name, FIT_STEPS)`` are the same fit, and the default
    follows ``FIT_STEPS`` at call time."""
    from diffdistill import toy

    monkeypatch.setattr(toy, "FIT_STEPS", 7)
    net = toy.fit_toy_network("ring8")
    assert toy.fit_toy_network("ring8", 7) is net and toy.fit_toy_network("ring8", steps=7, seed=0) is net
    assert toy.load_toy_teacher("ring8").init_network is net
    assert toy.fit_toy_network("ring8", 8) is not net


def test_toy_network_fit_is_kept_on_disk(monkeypatch, tmp_path):
    """A later process loads the fit from ``$DIFFDISTILL_CACHE/toy`` instead of fitting again: same weights,
    no fitting; another step count is another file."""
    from diffdistill import toy

    monkeypatch.setenv("DIFFDISTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(toy, "FIT_STEPS", 6)
    fitted = toy.fit_toy_network("ring8")
    assert toy.fit_cache_path("ring8", 6, 512, 0).is_file()
    toy._fit_toy_network.cache_clear()  # a new process

    def no_fit(*args):
        raise AssertionError("fitted again despite the cached file")

    monkeypatch.setattr(toy, "_fit", no_fit)
    loaded = toy.fit_toy_network("ring8")
    assert loaded is not fitted and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(fitted.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(AssertionError, match="fitted again"):
        toy.fit_toy_network("ring8", 7)
    toy._fit_toy_network.cache_clear()


@pytest.mark.parametrize("inputs", ["backward_simulation", "noised_data"])
def test_student_inputs_switch(inputs, tiny_teacher_dir, tmp_path, monkeypatch):
    """Training the last of K = 4 student steps: backward simulation runs the student's own chain from noise
    (3 re-noised denoising steps without gradient, then the trained step); noised data noises real images
    to t_3 and needs one student call."""
    trainer = Trainer(tiny("dmd2", tiny_teacher_dir, "generator.student_steps=4", f"generator.student_inputs={inputs}"),
                      tmp_path / "run", progress=False)
    m = trainer.method
    assert m.timesteps.tolist() == m.student_timesteps(4) and len(m.timesteps) == 4
    calls = []
    m.student.register_forward_hook(lambda mod, args, out: calls.append(torch.is_grad_enabled()))
    real = torch.randn(3, *m.teacher.sample_shape)
    monkeypatch.setattr(torch, "randint", lambda high, size, generator=None, **kw: torch.tensor(high - 1))
    cond = Conditioning(class_labels=torch.tensor([0, 1, 2]))
    x, _ = m.sample_student((real, cond), torch.Generator().manual_seed(0), grad=True)
    assert x.requires_grad and x.shape == real.shape
    assert calls == ([False, False, False, True] if inputs == "backward_simulation" else [True])


def test_exact_residual_critic_starts_as_the_analytic_teacher_and_trains_its_correction(tiny_teacher_dir, tmp_path,
                                                                                        monkeypatch):
    """``critic.start=exact_residual`` on ``analytic:NAME``: at initialisation the critic's x0 is the exact
    denoiser's (while a copy of the fitted MLP's is not); only the correction has parameters, a critic update
    moves them, and a resumed run gets them back. A real teacher refuses the switch in one line."""
    from diffdistill import toy
    from diffdistill.errors import ConfigError
    from diffdistill.trainers.checkpoint import latest_checkpoint

    monkeypatch.setattr(toy, "FIT_STEPS", 20)
    cfg = load_distill_config(str(REPO / "configs/toy/dmd2.yaml"),
                              ["critic.start=exact_residual", "train.batch_size=16", "critic.updates=2"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    m = trainer.method
    assert isinstance(m.critic, toy.ResidualToyMLP)
    names = [n for n, _ in m.critic.named_parameters()]
    assert names and all(n.startswith("correction.") for n in names)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float() * 1.5
    t = torch.linspace(20, 980, 64, dtype=torch.float64)
    cond = Conditioning()
    with torch.no_grad():
        exact = m.teacher.denoiser(x, t, cond)
        torch.testing.assert_close(m.critic_denoiser()(x, t, cond), exact, atol=1e-5, rtol=0)
        fitted_copy = m.like_teacher(m.student)(x, t, cond)
    assert (fitted_copy - exact).abs().max() > 1e-2
    head_before = m.critic.correction.head.weight.detach().clone()
    trainer.train_step()
    assert m.critic.correction.head.weight.detach().abs().sum() > 0 and not head_before.any()
    trainer.save()
    resumed = Trainer(cfg, tmp_path / "run", progress=False)
    resumed.load(latest_checkpoint(tmp_path / "run"))
    saved = m.critic.state_dict()
    assert saved and all(k.startswith("correction.") for k in saved)
    for (k, v), w in zip(saved.items(), resumed.method.critic.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(ConfigError, match="needs an analytic teacher"):
        Trainer(tiny("dmd2", tiny_teacher_dir, "critic.start=exact_residual"), tmp_path / "real", progress=False)


def test_toy_dmd_config_is_the_dmd2_config_plus_the_regression_on_exact_ode_pairs(tmp_path, monkeypatch):
    """``configs/toy/dmd.yaml`` differs from ``configs/toy/dmd2.yaml`` by the method, its regression section
    and DMD2's GAN head, which DMD does not have (docs/results.md compares the two as "DMD2 plus DMD's regression
    loss"); its pairs are the exact teacher's Heun ODE map of their noise, and one training step has a finite
    regression term."""
    from diffdistill import toy
    from diffdistill.config import to_dict
    from diffdistill.samplers import get_sampler, sampling_grid

    dmd = to_dict(load_distill_config(str(REPO / "configs/toy/dmd.yaml")))
    dmd2 = to_dict(load_distill_config(str(REPO / "configs/toy/dmd2.yaml")))
    assert dmd.pop("method") == "dmd" and dmd2.pop("method") == "dmd2"
    assert dmd.pop("dmd")["regression_weight"] == 0.25
    assert dmd.pop("gan")["enabled"] is False
    dmd2.pop("gan")
    assert dmd == dmd2

    monkeypatch.setattr(toy, "FIT_STEPS", 20)
    cfg = load_distill_config(str(REPO / "configs/toy/dmd.yaml"),
                              ["train.batch_size=16", "critic.updates=1", "dmd.num_pairs=32", "dmd.pair_steps=4"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    pairs, teacher = trainer.method.pairs, trainer.method.teacher
    ts = sampling_grid(teacher.denoiser, sampler="heun", num_steps=4)
    ode = get_sampler("heun")(teacher.denoiser, pairs["noise"], ts, None, guidance_scale=None)
    torch.testing.assert_close(ode.float(), pairs["images"])
    terms = trainer.train_step()
    assert terms["generator/regression"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in terms.values())


def test_toy_bench_scores_mode_weights_and_subsamples_to_them(monkeypatch):
    """bench/toy_gmm.py's figures on a draw built by hand: 3/4 of it at mode 0 and 1/4 at mode 1 of an even
    2-mode mixture; the weight errors are ±1/4, nothing is off-mode, and the subsample at the mixture's
    weights keeps every point of the scarce mode and as many of the other."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("toy_gmm_bench", Path(__file__).parent.parent / "bench/toy_gmm.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    mix = GaussianMixture([0.5, 0.5], [[-4.0, 0.0], [4.0, 0.0]], torch.eye(2).expand(2, 2, 2) * 0.01)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([mix.means[0] + 0.03 * torch.randn(300, 2, generator=gen, dtype=torch.float64),
                   mix.means[1] + 0.03 * torch.randn(100, 2, generator=gen, dtype=torch.float64)]).float()
    nearest = torch.cdist(x.double(), mix.means).argmin(1)
    sub = bench.at_mixture_weights(x, nearest, mix.weights)
    assert torch.equal(torch.bincount(torch.cdist(sub.double(), mix.means).argmin(1)), torch.tensor([100, 100]))
    ref = mix.sample(400, generator=gen)[0].float()
    result = bench.score([x], mix, ref)
    assert result.deviation == (0.25, -0.25) and result.weight_error == pytest.approx(0.25)
    assert result.off_mode == 0.0 and result.fewest == 100
    assert result.sw2_at_weights < result.sw2  # the draw's excess is its weights
