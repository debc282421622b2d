"""Multi-process training on accelerate: `accelerate launch --config_file
configs/accelerate/cpu_two_processes.yaml` on this CPU machine (torchrun + a gloo process group) trains the same run as one process with train.grad_accum=2 —
every weight, optimizer state and logged loss equal — and only the main process writes."""

from __future__ import annotations

import json
import os
import re
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
    # the same DMD2 run launched with configs/accelerate/fsdp.yaml: the frozen teacher sharded over the processes
    "dmd2_sharded_teacher": ["--config", str(REPO / "configs/digits/dmd2_4step.yaml"), "critic.updates=2"],
}
LAUNCH_CONFIG = {"dmd2_sharded_teacher": ["fsdp.yaml", "--num_processes", "2"]}


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
    config, *launch_options = LAUNCH_CONFIG.get(method, ["cpu_two_processes.yaml"])
    launch = [ACCELERATE, "launch", "--config_file", str(REPO / "configs/accelerate" / config), *launch_options,
              "--main_process_port", str(free_port()), "-m", "diffdistill.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([*launch, *common, "--output", str(tmp_path / "two")], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run written to") == 1  # the main process speaks, once
    sharded = re.search(r"teacher sharded over 2 processes: ([\d,]+) of its ([\d,]+) weights", result.stdout)
    assert (sharded is not None) == (method in LAUNCH_CONFIG)
    if sharded:  # about half the teacher's weights on each process
        here, whole = (int(g.replace(",", "")) for g in sharded.groups())
        assert 0.45 < here / whole < 0.55
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


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_every_other_method_trains_under_two_processes(tiny_teacher_dir, tmp_path):
    """Every digits config not launched above (consistency, DMD, iCT, LCM, SiD, VSD), 2 steps under one
    two-process launch, equals one process with train.grad_accum=2 (same tolerance as above)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import distributed_all_methods as worker

    launch = [ACCELERATE, "launch", "--config_file", str(REPO / "configs/accelerate/cpu_two_processes.yaml"),
              "--main_process_port", str(free_port()), str(Path(worker.__file__))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([*launch, str(tiny_teacher_dir), str(tmp_path / "two")], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    worker.main(str(tiny_teacher_dir), str(tmp_path / "one"), "train.grad_accum=2")
    names = [p.stem for p in worker.configs()]
    assert {"consistency", "dmd", "ict", "lcm", "sid", "vsd"} <= set(names)
    for name in names:
        one, two = (tmp_path / r / name / "checkpoints" / "step_0000002" for r in ("one", "two"))
        files = sorted(f.name for f in one.glob("*.safetensors"))
        assert files and files == sorted(f.name for f in two.glob("*.safetensors")), name
        for f in files:
            sa, sb = load_file(one / f), load_file(two / f)
            for k in sa:
                assert torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6), (name, f, k)


def test_batch_that_does_not_split_is_refused(tiny_teacher_dir, tmp_path, capsys):
    assert main(["distill", "--quiet", "--output", str(tmp_path / "r"), *CASES["dmd2"], f"teacher={tiny_teacher_dir}",
                 "data.resolution=8", "train.batch_size=6", "train.grad_accum=4"]) == 2
    assert "multiple of 4" in capsys.readouterr().err


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_eval_across_two_processes_equals_one_process(tmp_path):
    """`accelerate launch … diffdistill eval`: each process samples its share of the batches (a multi-step
    "sde" student draws fresh noise per batch), the main process gathers the features and writes — the
    same metrics, per seed, and the same grids as one process."""
    run = tmp_path / "run"
    assert main(["distill", "--config", str(REPO / "configs/digits/dmd2_4step.yaml"), "--output", str(run), "--quiet",
                 "train.max_steps=2", "train.batch_size=4", "critic.updates=1", "train.sample_every=0"]) == 0
    common = ["eval", "--run", str(run), "--steps", "1,4", "--teacher-steps", "2", "--num", "150", "--seeds", "2",
              "--batch-size", "40", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DIFFDISTILL_CACHE": str(tmp_path / "cache")}
    launch = [ACCELERATE, "launch", "--config_file", str(REPO / "configs/accelerate/cpu_two_processes.yaml"),
              "--main_process_port", str(free_port()), "-m", "diffdistill.cli"]
    result = subprocess.run([*launch, *common, "--output", str(tmp_path / "two")], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("student FID") == 1  # the main process speaks, once
    one = subprocess.run([sys.executable, "-m", "diffdistill.cli", *common, "--output", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    for who in ("student", "teacher"):
        assert a[who]["per_seed"] == b[who]["per_seed"] and a[who]["timesteps"] == b[who]["timesteps"]
    assert sorted(p.name for p in (tmp_path / "two" / "grids").iterdir()) == [
        "student_1step.png", "student_4step.png", "teacher_2step.png"]
    for grid in (tmp_path / "one" / "grids").iterdir():
        assert grid.read_bytes() == (tmp_path / "two" / "grids" / grid.name).read_bytes(), grid.name


def test_teacher_sharding_units_and_refusal_of_weight_sharing_roles():
    """The sharded units are the outermost ModuleLists' items; a LoRA student (adapters on the teacher's
    own tensors) is refused before any process group is touched."""
    from conftest import tiny_unet
    from diffdistill.errors import ConfigError
    from diffdistill.trainers.lora import add_lora
    from diffdistill.trainers.sharding import shard_blocks, shard_frozen_teacher

    teacher = tiny_unet()
    blocks = shard_blocks(teacher)
    expected = [*teacher.down_blocks, *teacher.up_blocks, *teacher.mid_block.attentions, *teacher.mid_block.resnets]
    assert sorted(map(id, blocks)) == sorted(map(id, expected))  # not the lists nested inside a down block
    student = add_lora(teacher, 2, 2.0, ["to_q", "to_k", "to_v", "conv1", "conv2"], "student", 0)
    with pytest.raises(ConfigError, match="student shares the teacher's weights"):
        shard_frozen_teacher(teacher, {"student": student}, 2, torch.device("cpu"))


def test_eval_refuses_a_draw_with_fewer_batches_than_processes():
    """Checked before any collective: 300 samples in batches of 100 leave one of 4 processes idle."""
    from types import SimpleNamespace

    from diffdistill.errors import DiffDistillError
    from diffdistill.eval.evaluate import EvalOptions, evaluate
    from diffdistill.processes import Processes

    opts = EvalOptions(num=300, batch_size=100, processes=Processes(rank=0, world=4))
    extractor = SimpleNamespace(dim=64, name="digits")
    with pytest.raises(DiffDistillError, match="leaves 1 of 4 processes without a batch; use --batch-size 75"):
        evaluate([], None, extractor, None, opts)
