"""Build the model files that ship inside the package (``diffdistill/assets``).

    python scripts/make_assets.py --classifier      # the digits FID feature classifier
    python scripts/make_assets.py --teacher         # the digits teacher (configs/teacher/digits.yaml)

Each part trains from scratch on the CPU and writes into ``--output-dir``. The teacher is exactly what
``diffdistill teacher --config configs/teacher/digits.yaml --output DIR`` makes, plus the measured share
of its 50-step samples that the shipped classifier assigns to the requested class.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

import json  # noqa: E402
import shutil  # noqa: E402

from diffdistill.config import load_config  # noqa: E402
from diffdistill.eval.digits_classifier import (  # noqa: E402
    SHIPPED_CLASSIFIER,
    load_digits_classifier,
    save_digits_classifier,
    train_digits_classifier,
)
from diffdistill.pretrained import META_FILE, load_pretrained  # noqa: E402
from diffdistill.teacher import TeacherConfig, class_accuracy, train_teacher  # noqa: E402

DEFAULT_OUTPUT_DIR = REPO_ROOT / "diffdistill" / "assets"


def make_classifier(output_dir: Path, seed: int = 0) -> Path:
    """Train the digits classifier, report its accuracy, size and time, and save it; return the path."""
    start = time.perf_counter()
    model, accuracy = train_digits_classifier(seed=seed)
    seconds = time.perf_counter() - start
    path = output_dir / SHIPPED_CLASSIFIER
    save_digits_classifier(model, path, accuracy)
    params = sum(p.numel() for p in model.parameters())
    print(f"digits classifier: test accuracy {accuracy:.4f}, {params} parameters, trained in {seconds:.0f}s")
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def make_teacher(output_dir: Path, classifier_path: Path) -> Path:
    """Train the digits teacher from its config, then record its class accuracy (Heun, 50 steps, 1000
    samples, with and without guidance) in its ``diffdistill.json``; return the directory."""
    path = output_dir / "digits_teacher"
    if path.exists():
        shutil.rmtree(path)
    cfg = load_config(TeacherConfig, REPO_ROOT / "configs" / "teacher" / "digits.yaml")
    train_teacher(cfg, path)
    teacher, classifier = load_pretrained(path), load_digits_classifier(classifier_path)
    accuracy = {f"heun50_w{w:g}": class_accuracy(teacher, classifier, guidance_scale=w) for w in (1.0, 2.0)}
    meta = json.loads((path / META_FILE).read_text())
    meta["class_accuracy"] = accuracy
    (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"digits teacher: {meta['train_steps']} steps in {meta['train_seconds']:.0f}s; class accuracy {accuracy}")
    print(f"wrote {path} ({size / 1024:.0f} KiB)")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", action="store_true", help="train the digits FID feature classifier")
    parser.add_argument("--teacher", action="store_true", help="train the digits teacher (needs the classifier)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help=f"where to write the files (default: {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    args = parser.parse_args(argv)
    if not (args.classifier or args.teacher):
        parser.error("choose what to build: --classifier and/or --teacher")
    if args.classifier:
        make_classifier(args.output_dir, args.seed)
    if args.teacher:
        make_teacher(args.output_dir, args.output_dir / SHIPPED_CLASSIFIER)


if __name__ == "__main__":
    main()
