"""The generic loop: resume is bit-identical, checkpoints are atomic and verified, the CLI is strict."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffdistill.cli import main
from diffdistill.errors import DiffDistillError
from diffdistill.trainers.checkpoint import latest_checkpoint, list_checkpoints
from diffdistill.trainers.loop import Trainer, distill
from diffdistill.trainers.method import load_distill_config


def pd_config(teacher_dir, *extra):
    return load_distill_config(None, ["method=progressive", f"teacher={teacher_dir}", "data.resolution=8",
                                      "train.max_steps=20", "train.batch_size=8", "train.sample_every=0",
                                      "train.checkpoint_every=10", "train.keep_checkpoints=2",
                                      "train.ema_decays=0.9,0.99", "progressive.initial_steps=8",
                                      "progressive.steps_per_round=7", *extra])


def test_resume_is_bit_identical(tiny_teacher_dir, tmp_path):
    """20 steps straight vs 10 steps, stop, resume, 10 more: identical student, EMAs, round teacher and
    optimizer state (CPU, float32)."""
    cfg = pd_config(tiny_teacher_dir)
    distill(cfg, tmp_path / "straight", progress=False)
    distill(cfg, tmp_path / "resumed", max_steps=10, progress=False)
    assert latest_checkpoint(tmp_path / "resumed").name == "step_0000010"
    distill(cfg, tmp_path / "resumed", resume=True, progress=False)
    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "resumed")
    assert a.name == b.name == "step_0000020"
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files == ["ema_0.9.safetensors", "ema_0.99.safetensors", "round_teacher.safetensors",
                     "student.safetensors"]  # the frozen teacher is never written
    for name in files:
        sa, sb = load_file(a / name), load_file(b / name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    oa, ob = (torch.load(p / "state.pt", weights_only=True) for p in (a, b))
    assert oa["method"] == ob["method"] == {"round": 2}
    for k, v in oa["optimizers"]["student"]["state"].items():
        assert all(torch.equal(v[n], ob["optimizers"]["student"]["state"][k][n]) for n in v)
    assert torch.equal(oa["generator"], ob["generator"])
    logs = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert logs == straight


def test_cycled_schedule_restarts_warmup_and_decay_every_cycle():
    """``cycle_steps`` (progressive distillation's per-round anneal): every cycle is the same schedule."""
    from diffdistill.trainers.loop import lr_factor
    from diffdistill.trainers.method import OptimConfig

    f = lr_factor(OptimConfig(schedule="linear", warmup_steps=2, cycle_steps=10), 30)
    one = [f(k) for k in range(10)]
    assert one[:3] == [0.5, pytest.approx(0.9), pytest.approx(0.8)] and one[-1] == pytest.approx(0.1)
    assert [f(k) for k in range(10, 20)] == one == [f(k) for k in range(20, 30)]
    held = lr_factor(OptimConfig(schedule="cosine", decay_steps=4, cycle_steps=10), 30)
    assert [held(k) for k in (10, 15, 16)] == [1.0, 1.0, 1.0] and held(18) == pytest.approx(0.5)


def test_warmup_stable_decay_schedule_and_resuming_into_it(tiny_teacher_dir, tmp_path):
    """``decay_steps`` holds the rate then decays it over the last steps; a constant run resumed into that
    tail equals the straight warmup-stable-decay run bit for bit; a cosine over all steps cannot be stretched."""
    from diffdistill.trainers.loop import lr_factor
    from diffdistill.trainers.method import OptimConfig

    f = lr_factor(OptimConfig(schedule="cosine", decay_steps=10), 20)
    assert [f(k) for k in (0, 5, 10)] == [1.0, 1.0, 1.0] and f(15) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)
    g = lr_factor(OptimConfig(schedule="cosine"), 20)
    assert g(10) == pytest.approx(0.5) and g(0) == 1.0
    lin = lr_factor(OptimConfig(schedule="linear", decay_steps=10), 20)
    assert lin(5) == 1.0 and lin(15) == pytest.approx(0.5) and lin(20) == pytest.approx(0.0)
    wsd = pd_config(tiny_teacher_dir, "student_optim.schedule=cosine", "student_optim.decay_steps=10",
                    "student_optim.lr=3e-3")
    distill(wsd, tmp_path / "straight", progress=False)
    distill(pd_config(tiny_teacher_dir, "train.max_steps=10", "student_optim.lr=3e-3"), tmp_path / "resumed",
            progress=False)
    distill(wsd, tmp_path / "resumed", resume=True, progress=False)
    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "resumed")
    assert a.name == b.name == "step_0000020"
    for name in ("student.safetensors", "ema_0.9.safetensors"):
        sa, sb = load_file(a / name), load_file(b / name)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    distill(pd_config(tiny_teacher_dir, "train.max_steps=10", "student_optim.schedule=cosine"), tmp_path / "cos",
            progress=False)
    with pytest.raises(DiffDistillError, match="student_optim's learning rate at step 1 would be"):
        distill(pd_config(tiny_teacher_dir, "student_optim.schedule=cosine"), tmp_path / "cos", resume=True,
                progress=False)


def test_checkpoints_keep_last_k_and_skip_corrupt(tiny_teacher_dir, tmp_path):
    cfg = pd_config(tiny_teacher_dir, "train.max_steps=30")
    distill(cfg, tmp_path / "run", progress=False)
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["step_0000020", "step_0000030"]
    newest = tmp_path / "run" / "checkpoints" / "step_0000030" / "student.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated: its manifest no longer matches
    assert latest_checkpoint(tmp_path / "run").name == "step_0000020"


def test_distill_cli_dry_run_errors_and_resume_checks(tiny_teacher_dir, tmp_path, capsys):
    assert main(["distill", "--config", "configs/digits/progressive.yaml", "--dry-run", "train.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert "method: progressive" in out and "max_steps: 5" in out
    assert main(["distill", "--dry-run", "method=progresive"]) == 2
    assert "did you mean 'progressive'" in capsys.readouterr().err
    assert main(["distill", "--output", str(tmp_path / "r"), "--resume", "method=progressive"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    run = tmp_path / "run"
    args = ["distill", "--output", str(run), "--quiet", "method=progressive", f"teacher={tiny_teacher_dir}",
            "data.resolution=8", "train.batch_size=4", "train.sample_every=0", "progressive.initial_steps=4"]
    assert main([*args, "train.max_steps=2"]) == 0
    assert main([*args, "train.max_steps=2"]) == 2  # non-empty output without --resume
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "train.max_steps=4", "train.batch_size=8", "--resume"]) == 2
    assert "train.batch_size=4, this one 8" in capsys.readouterr().err
    assert main([*args, "train.max_steps=4", "--resume"]) == 0
    assert latest_checkpoint(run).name == "step_0000004"


def test_phases_step_the_right_optimizer_the_right_number_of_times(tiny_teacher_dir, tmp_path):
    """A two-role method with 3 critic updates per student update: the loop steps each role's own
    optimizer exactly as the phases say, and only that role's weights move in its phase."""
    import copy

    from torch import nn

    from diffdistill.trainers.loop import Trainer
    from diffdistill.trainers.method import METHODS, Method, Phase
    from diffdistill.trainers.progressive import ProgressiveConfig

    class TwoRoles(Method):
        name = "two_roles_test"
        config_class = ProgressiveConfig

        def __init__(self, cfg, teacher):
            super().__init__(cfg, teacher)
            self.student = copy.deepcopy(teacher.denoiser.network).requires_grad_(True)
            self.critic = nn.Linear(4, 1)
            self.order = []

        def trainable_roles(self):
            return {"student": self.student, "critic": self.critic}

        def phases(self, step):
            return [Phase("critic", "critic", repeat=3), Phase("student", "student")]

        def loss(self, phase, batch, step, generator):
            self.order.append(phase)
            net = self.critic if phase == "critic" else self.student
            return {"loss": sum((p.float() ** 2).mean() for p in net.parameters())}

        def student_denoiser(self, network):
            return self.like_teacher(network)

    METHODS[TwoRoles.name] = TwoRoles
    try:
        cfg = pd_config(tiny_teacher_dir, "train.max_steps=2")
        trainer = Trainer(cfg, tmp_path / "run", progress=False)
        trainer.method = TwoRoles(cfg, trainer.method.teacher)
        trainer.roles = trainer.method.trainable_roles()
        trainer.optimizers = {r: torch.optim.SGD(m.parameters(), lr=0.1) for r, m in trainer.roles.items()}
        trainer.schedulers = {r: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for r, o in trainer.optimizers.items()}
        steps = {r: 0 for r in trainer.optimizers}
        for role, opt in trainer.optimizers.items():
            opt.register_step_post_hook(lambda *_, role=role: steps.__setitem__(role, steps[role] + 1))
        critic_before = {k: v.clone() for k, v in trainer.method.critic.state_dict().items()}
        student_before = {k: v.clone() for k, v in trainer.method.student.state_dict().items()}
        trainer.train_step()
        assert steps == {"critic": 3, "student": 1}
        assert trainer.method.order == ["critic", "critic", "critic", "student"]
        trainer.train_step()
        assert steps == {"critic": 6, "student": 2}
        assert any(not torch.equal(v, critic_before[k]) for k, v in trainer.method.critic.state_dict().items())
        assert any(not torch.equal(v, student_before[k]) for k, v in trainer.method.student.state_dict().items())
    finally:
        METHODS.pop(TwoRoles.name)


def test_bf16_mixed_precision_runs(tiny_teacher_dir, tmp_path):
    """In its own process: accelerate fixes the precision once per process."""
    import subprocess
    import sys

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "diffdistill.cli", "distill", "--output", str(run), "--quiet",
                           "method=progressive", f"teacher={tiny_teacher_dir}", "data.resolution=8",
                           "train.batch_size=4", "train.max_steps=2", "train.log_every=1", "train.sample_every=0",
                           "train.mixed_precision=bf16", "progressive.initial_steps=4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(v)) for row in log for v in row.values())


def test_ema_rampup_follows_the_edm_half_life_rule():
    from diffdistill.trainers.ema import ema_decay

    assert ema_decay(0.999, 5, 0.0) == 0.999  # ramp-up off: the plain decay
    assert ema_decay(0.999, 1, 0.05) < 1e-5  # the first update all but copies the student
    assert ema_decay(0.999, 10**6, 0.05) == pytest.approx(0.999, abs=1e-15)  # past the ramp: the plain decay
    for n in (20, 100, 600):  # during the ramp the half-life is rampup × n steps
        assert ema_decay(0.999, n, 0.05) ** (0.05 * n) == pytest.approx(0.5, rel=1e-12)
    decays = [ema_decay(0.999, n, 0.05) for n in range(1, 20000, 97)]
    assert decays == sorted(decays)


def test_ema_average_restarts_its_rampup_with_each_round(tiny_teacher_dir, tmp_path):
    cfg = pd_config(tiny_teacher_dir, "train.max_steps=9")  # rounds of 7 steps
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run()
    assert trainer.ema_start == 7
    resumed = Trainer(cfg, tmp_path / "run", progress=False)
    resumed.load(latest_checkpoint(tmp_path / "run"))
    assert resumed.ema_start == 7


def test_each_kept_ema_copy_can_be_chosen_for_sample_eval_and_export(tiny_teacher_dir, tmp_path, capsys):
    """A run keeping several EMA decays: ``ema=True`` is the first copy, a decay picks its own, ``False`` the
    raw weights, an unkept decay is refused; the CLI's ``--ema-decay`` reaches the same weights."""
    from diffdistill.trainers.saved_run import SavedRun

    distill(pd_config(tiny_teacher_dir, "train.max_steps=6", "train.ema_rampup=0"), tmp_path / "run", progress=False)
    run = SavedRun(tmp_path / "run")
    stored = {k: load_file(run.checkpoint / f"{k}.safetensors") for k in ("ema_0.9", "ema_0.99", "student")}
    for ema, stem in ((True, "ema_0.9"), (0.99, "ema_0.99"), (0.9, "ema_0.9"), (False, "student")):
        network, weights = run.student_network(ema)
        assert weights == stem
        state = network.state_dict()
        assert all(torch.equal(state[k], v) for k, v in stored[stem].items())
    assert not all(torch.equal(stored["ema_0.9"][k], v) for k, v in stored["ema_0.99"].items())
    with pytest.raises(DiffDistillError, match="no EMA copy at decay 0.5.*0.9, 0.99"):
        run.student_network(0.5)
    images = {}
    for flag in ([], ["--ema-decay", "0.9"], ["--ema-decay", "0.99"], ["--no-ema"]):
        out = tmp_path / f"{len(images)}.safetensors"
        assert main(["sample", "--run", str(tmp_path / "run"), *flag, "--num", "4", "--quiet",
                     "--output", str(tmp_path / "g.png"), "--save-tensors", str(out)]) == 0
        images[" ".join(flag)] = load_file(out)["images"]
    assert torch.equal(images[""], images["--ema-decay 0.9"])  # the default is the first copy
    assert not torch.equal(images["--ema-decay 0.9"], images["--ema-decay 0.99"])
    assert not torch.equal(images["--ema-decay 0.99"], images["--no-ema"])
    assert main(["sample", "--run", str(tmp_path / "run"), "--ema-decay", "0.9", "--no-ema", "--num", "4",
                 "--quiet", "--output", str(tmp_path / "g.png")]) == 2
    assert "contradict" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path / "run"), "--ema-decay", "0.5", "--output", str(tmp_path / "x")]) == 2
    assert "keeps no EMA copy at decay 0.5" in capsys.readouterr().err


class _Payload:
    """Unpickling this would run ``os.system``: a checkpoint must never get that far."""

    def __reduce__(self):
        import os

        return os.system, ("echo pwned > /dev/null",)


def test_pickle_bearing_checkpoint_is_refused(tmp_path):
    import hashlib

    from diffdistill.trainers.checkpoint import MANIFEST, STATE_FILE, load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path, 1, {"student": {"w": torch.zeros(2)}}, {"step": 1}, keep=1)
    torch.save({"step": 1, "evil": _Payload()}, path / STATE_FILE)
    manifest = json.loads((path / MANIFEST).read_text())  # a forged checkpoint: its manifest matches its files
    manifest["files"][STATE_FILE] = hashlib.sha256((path / STATE_FILE).read_bytes()).hexdigest()
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DiffDistillError, match="never unpickles"):
        load_checkpoint(path)


def _nan_on(steps):
    """Wrap a trainer's method.loss so the listed steps' losses are NaN."""
    def wrap(trainer):
        original = trainer.method.loss

        def loss(phase, batch, step, generator):
            terms = original(phase, batch, step, generator)
            if step in steps:
                terms["loss"] = terms["loss"] * float("nan")
            return terms
        trainer.method.loss = loss
        return trainer
    return wrap


def test_nonfinite_steps_are_skipped_and_counted(tiny_teacher_dir, tmp_path):
    trainer = _nan_on({3, 4})(Trainer(pd_config(tiny_teacher_dir, "train.max_steps=6"), tmp_path / "r", progress=False))
    for _ in range(3):
        trainer.train_step()
    before = {k: v.clone() for k, v in trainer.roles["student"].state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema[0.9].state_dict().items()}
    for _ in range(2):  # steps 3 and 4: skipped
        logged = trainer.train_step()
    assert logged["train/nonfinite_steps"] == 2.0 and trainer.nonfinite_streak == 2
    assert all(torch.equal(before[k], v) for k, v in trainer.roles["student"].state_dict().items())
    assert all(torch.equal(ema_before[k], v) for k, v in trainer.ema[0.9].state_dict().items())
    trainer.train_step()  # step 5 is finite again: training resumes, the streak resets
    assert trainer.nonfinite_streak == 0 and trainer.nonfinite_total == 2
    assert any(not torch.equal(before[k], v) for k, v in trainer.roles["student"].state_dict().items())


def test_too_many_nonfinite_steps_stop_with_the_last_checkpoint_intact(tiny_teacher_dir, tmp_path):
    cfg = pd_config(tiny_teacher_dir, "train.max_nonfinite_steps=3", "train.checkpoint_every=2")
    trainer = _nan_on(set(range(4, 100)))(Trainer(cfg, tmp_path / "r", progress=False))
    with pytest.raises(DiffDistillError, match="3 training steps in a row .* step_0000006"):
        trainer.run()
    assert latest_checkpoint(tmp_path / "r").name == "step_0000006"  # written during the streak: weights of step 4


LORA_STUDENT_CASES = {
    "progressive": ["method=progressive", "progressive.initial_steps=8", "progressive.steps_per_round=3"],
    "consistency": ["method=consistency", "consistency.num_scales=10"],
    "dmd2": ["method=dmd2", "critic.updates=2", "generator.student_steps=2"],
}


@pytest.mark.parametrize("case", sorted(LORA_STUDENT_CASES))
def test_lora_student_trains_adapters_only_and_resumes_bit_identically(case, tiny_teacher_dir, tmp_path):
    """student.lora_rank > 0: only the adapters train; the student's base weights, its EMA copies' and its
    consistency target's / round teacher's are the frozen teacher's own tensors, never checkpointed; a
    resumed run equals an uninterrupted one bit for bit."""
    overrides = [*LORA_STUDENT_CASES[case], f"teacher={tiny_teacher_dir}", "data.resolution=8",
                 "train.max_steps=6", "train.batch_size=4", "train.sample_every=0", "train.checkpoint_every=3",
                 "train.ema_decays=0.9", "student.lora_rank=2", "student_optim.lr=0.01"]
    cfg = load_distill_config(None, overrides)
    straight = Trainer(cfg, tmp_path / "a", progress=False)
    student, teacher = straight.roles["student"], straight.method.teacher.network
    teacher_before = {n: p.clone() for n, p in teacher.named_parameters()}
    lora_before = {n: p.clone() for n, p in student.named_parameters() if "lora_" in n}
    assert lora_before and {n for n, p in student.named_parameters() if p.requires_grad} == set(lora_before)
    straight.run()
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    assert any(not torch.equal(p, lora_before[n]) for n, p in student.named_parameters() if "lora_" in n)
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    for stem, net in straight.networks().items():
        if stem == "student" or stem.startswith("ema") or stem in ("target", "round_teacher"):
            base = [p for n, p in net.named_parameters() if "lora_" not in n]
            assert base and all(p.data_ptr() in teacher_ptrs for p in base), stem
            saved = load_file(latest_checkpoint(tmp_path / "a") / f"{stem}.safetensors")
            assert saved and all(".lora_" in k for k in saved), stem
    distill(cfg, tmp_path / "b", max_steps=3, progress=False)
    resumed = Trainer(cfg, tmp_path / "b", progress=False)
    resumed.run(resume=True)
    assert set(straight.networks()) == set(resumed.networks())
    for stem, net in straight.networks().items():
        other = resumed.networks()[stem].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in net.state_dict().items()), stem


@pytest.mark.parametrize("method", [["method=lcm"], ["method=ict", "ict.init=scratch"]])
def test_methods_that_add_layers_refuse_lora_students(method, tiny_teacher_dir, tmp_path):
    from diffdistill.errors import ConfigError

    cfg = load_distill_config(None, [*method, f"teacher={tiny_teacher_dir}", "data.resolution=8", "student.lora_rank=2"])
    with pytest.raises(ConfigError, match="LoRA students"):
        Trainer(cfg, tmp_path / "run", progress=False)


def test_gradient_checkpointing_changes_memory_not_the_result(tiny_teacher_dir, tmp_path):
    """train.gradient_checkpointing recomputes activations in backward: the trained weights stay the same."""
    base = ["method=dmd2", f"teacher={tiny_teacher_dir}", "data.resolution=8", "train.max_steps=2",
            "train.batch_size=4", "train.sample_every=0", "critic.updates=1"]
    plain = Trainer(load_distill_config(None, base), tmp_path / "a", progress=False)
    plain.run()
    ckpt = Trainer(load_distill_config(None, [*base, "train.gradient_checkpointing=true"]), tmp_path / "b",
                   progress=False)
    assert all(m.is_gradient_checkpointing for r, m in ckpt.roles.items() if r in ("student", "fake_score"))
    ckpt.run()
    for role in ("student", "fake_score"):
        a, b = plain.roles[role].state_dict(), ckpt.roles[role].state_dict()
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a), role


def test_attention_switch(tmp_path):
    from types import SimpleNamespace

    from conftest import tiny_text_pipeline
    from diffdistill.errors import ConfigError
    from diffdistill.pretrained import load_pretrained
    from diffdistill.trainers.loop import configure_networks

    net = load_pretrained(tiny_text_pipeline(tmp_path / "t")).network
    args = SimpleNamespace(attention="auto", gradient_checkpointing=False)
    if not torch.cuda.is_available():
        assert configure_networks([net], [], args) == {"attention": "sdpa"}
        assert {type(p).__name__ for p in net.attn_processors.values()} == {"AttnProcessor2_0"}
        with pytest.raises(ConfigError, match="xformers"):
            configure_networks([net], [], SimpleNamespace(attention="xformers", gradient_checkpointing=False))


def test_overwrite_starts_clean(tiny_teacher_dir, tmp_path):
    """`distill --overwrite` into an old run directory keeps no stale checkpoint, log line or grid, so a
    later eval or export can never pick the old student."""
    run = tmp_path / "run"
    args = ["distill", "--output", str(run), "--quiet", "method=progressive", f"teacher={tiny_teacher_dir}",
            "data.resolution=8", "train.batch_size=4", "train.sample_every=2", "progressive.initial_steps=4",
            "train.checkpoint_every=2"]
    assert main([*args, "train.max_steps=4"]) == 0
    assert main([*args, "train.max_steps=2", "--overwrite"]) == 0
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002"]
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [2]
    assert sorted(p.name.split("_")[1] for p in (run / "samples").iterdir()) == ["0000002"] * len(list((run / "samples").iterdir()))
