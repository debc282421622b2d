"""The generic loop: resume is bit-identical, checkpoints are atomic and verified, the CLI is strict."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from diffdistill.cli import main
from diffdistill.trainers.checkpoint import latest_checkpoint, list_checkpoints
from diffdistill.trainers.loop import distill
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
    assert "differs in 'train'" in capsys.readouterr().err
    assert main([*args, "train.max_steps=4", "--resume"]) == 0
    assert latest_checkpoint(run).name == "step_0000004"
