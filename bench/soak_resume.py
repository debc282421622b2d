"""Benchmark: crash safety. SIGKILL a training run at random steps, resume it each time, and compare the
end state with an uninterrupted run.

    python bench/soak_resume.py [--kills 10] [--max-steps 60] [--seed 0] [--config configs/digits/dmd2.yaml]

Both runs are ``diffdistill distill`` subprocesses with one thread each (checkpoint every 3 steps, two
kept). The soaked run is killed with SIGKILL once its log reaches each of ``--kills`` random steps (or,
for a random half of the kills, after a random delay, wherever it is — inside a checkpoint write
included), then resumed with ``--resume`` (or started again when it was killed before its first
checkpoint). At every resume the checkpoints on disk are verified against their manifests. At the end
every tensor of the final checkpoints — student, EMA copies, critic, GAN head, optimizer states, the
RNG state — is compared bit for bit. The table prints the kills survived, the checkpoints checked,
the tensors compared and the mismatches (goal: 0).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffdistill.trainers.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint  # noqa: E402
from diffdistill.trainers.loop import last_logged_step  # noqa: E402


def command(config: str, run: Path, max_steps: int, resume: bool, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "diffdistill.cli", "distill", "--config", config, "--output", str(run), "--quiet",
            *(["--resume"] if resume else ["--overwrite"]), f"train.max_steps={max_steps}", "train.log_every=1",
            "train.checkpoint_every=3", "train.keep_checkpoints=2", "train.sample_every=0", *overrides]


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(f).items()})
    state = torch.load(ckpt / "state.pt", weights_only=True)
    out["rng/generator"] = state["generator"]
    for role, opt in state["optimizers"].items():
        for i, st in opt["state"].items():
            out.update({f"optimizer/{role}/{i}/{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/digits/dmd2.yaml"))
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/bench_soak")
    parser.add_argument("overrides", nargs="*", default=["train.batch_size=8", "critic.updates=1"])
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(args.runs)
    straight, soaked = root / "straight", root / "soaked"
    start = time.perf_counter()
    subprocess.run(command(args.config, straight, args.max_steps, False, args.overrides), env=env, check=True,
                   stdout=subprocess.DEVNULL)
    targets = sorted(rng.sample(range(1, args.max_steps), args.kills))
    kills = checked = 0
    resume = False
    for target in targets:
        proc = subprocess.Popen(command(args.config, soaked, args.max_steps, resume, args.overrides), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        by_time = rng.random() < 0.5
        deadline = time.perf_counter() + rng.uniform(2.0, 12.0)
        while proc.poll() is None:
            if (time.perf_counter() >= deadline) if by_time else (last_logged_step(soaked) >= target):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                break
            time.sleep(0.05)
        for ckpt in list_checkpoints(soaked):
            checked += 1
            assert verify_checkpoint(ckpt), f"{ckpt} does not match its manifest"
        resume = latest_checkpoint(soaked) is not None
    subprocess.run(command(args.config, soaked, args.max_steps, resume, args.overrides), env=env, check=True,
                   stdout=subprocess.DEVNULL)
    a, b = tensors(latest_checkpoint(straight)), tensors(latest_checkpoint(soaked))
    assert latest_checkpoint(straight).name == latest_checkpoint(soaked).name
    mismatches = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
    print(f"{args.config}, {args.max_steps} steps, checkpoint every 3, one thread; "
          f"{time.perf_counter() - start:.0f} s in all\n")
    print("| kills survived | checkpoints verified at resumes | tensors compared | mismatches |")
    print("|---|---|---|---|")
    print(f"| {kills} | {checked} | {len(a)} | {len(mismatches)} |")
    if mismatches:
        print("mismatched:", ", ".join(mismatches[:10]))


if __name__ == "__main__":
    main()
