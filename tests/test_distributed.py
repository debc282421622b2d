"""Multi-process training on accelerate: `accelerate launch --config_file
configs/accelerate/cpu_two_processes.yaml` on this CPU machine (torchrun + a gloo process group) trains the same run as one process with train.grad_accum=2 —
every weight, optimizer state and logged loss equal — and only the main process writes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffdistill.cli import main

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
CASES = {
    "dmd2": ["--config", str(REPO / "configs/digits/dmd2_4step.yaml"), "critic.updates=2"],
    "progressive": ["--config", str(REPO / "configs/digits/progressive.yaml"), "progressive.initial_steps=4",
                    "progressive.steps_per_round=2"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
@pytest.mark.parametrize("method", sorted(CASES))
def test_two_processes_equal_one_process_in_two_micro_batches(method, tiny_teacher_dir, tmp_path):
    common = ["distill", "--quiet", *CASES[method], f"teacher={tiny_teacher_dir}", "data.resolution=8",
              "train.batch_size=8", "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1",
              "train.sample_every=2"]
    launch = [ACCELERATE, "launch", "--config_file", str(REPO / "configs/accelerate/cpu_two_processes.yaml"),
              "--main_process_port", str(free_port()), "-m", "diffdistill.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([*launch, *common, "--output", str(tmp_path / "two")], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run written to") == 1  # the main process speaks, once
    assert main([*common, "train.grad_accum=2", "--output", str(tmp_path / "one")]) == 0, "one process"
    one, two = tmp_path / "one", tmp_path / "two"
    # the same files, written once: checkpoints, one log line per step, grids, one tensorboard file
    listing = {r: sorted(str(p.relative_to(r)) for p in r.rglob("*") if p.is_file() and "tb" not in p.parts)
               for r in (one, two)}
    assert listing[one] == listing[two]
    assert len(list((two / "tb").iterdir())) == 1
    logs = {r: [json.loads(line) for line in (r / "log.jsonl").read_text().splitlines()] for r in (one, two)}
    assert [e["step"] for e in logs[two]] == [1, 2, 3, 4]
    for a, b in zip(logs[one], logs[two]):
        assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7) for k in a)
    for ckpt in sorted((one / "checkpoints").iterdir()):
        for f in ckpt.glob("*.safetensors"):
            sa, sb = load_file(f), load_file(two / "checkpoints" / ckpt.name / f.name)
            for k in sa:  # float tolerance: the gloo all-reduce may sum in another order than accumulation
                assert torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6), (ckpt.name, f.name, k)
        sa, sb = (torch.load(r / "checkpoints" / ckpt.name / "state.pt", weights_only=True) for r in (one, two))
        assert torch.equal(sa["generator"], sb["generator"]) and sa["step"] == sb["step"]
        for role, opt in sa["optimizers"].items():
            for i, st in opt["state"].items():
                for name, v in st.items():
                    assert torch.allclose(v, sb["optimizers"][role]["state"][i][name], rtol=1e-5, atol=1e-7)


def test_batch_that_does_not_split_is_refused(tiny_teacher_dir, tmp_path, capsys):
    assert main(["distill", "--quiet", "--output", str(tmp_path / "r"), *CASES["dmd2"], f"teacher={tiny_teacher_dir}",
                 "data.resolution=8", "train.batch_size=6", "train.grad_accum=4"]) == 2
    assert "multiple of 4" in capsys.readouterr().err
