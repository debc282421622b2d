"""Run by tests/test_distributed.py (one process, or several under `accelerate launch`): trains every digits
config that test_distributed.py does not launch on its own for a few steps, one run directory per config.

    python tests/distributed_all_methods.py TEACHER_DIR OUTPUT_DIR [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffdistill.trainers.loop import Trainer
from diffdistill.trainers.method import load_distill_config

REPO = Path(__file__).resolve().parent.parent
#: launched on their own in test_distributed.py
OWN_TEST = {"dmd2", "dmd2_4step", "progressive"}
#: keeps each method's share of the test small
TINY = {"dmd": ["dmd.num_pairs=16", "dmd.pair_steps=2"]}


def configs() -> list[Path]:
    return [p for p in sorted((REPO / "configs/digits").glob("*.yaml")) if p.stem not in OWN_TEST]


def main(teacher: str, output: str, *overrides: str) -> None:
    for path in configs():
        cfg = load_distill_config(path, [f"teacher={teacher}", "data.resolution=8", "train.batch_size=4",
                                         "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1",
                                         "train.sample_every=0", *TINY.get(path.stem, []), *overrides])
        Trainer(cfg, Path(output) / path.stem, progress=False).run()


if __name__ == "__main__":
    main(*sys.argv[1:])
