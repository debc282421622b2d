"""Build the model files that ship inside the package (``diffdistill/assets``).

    python scripts/make_assets.py --classifier      # the digits FID feature classifier

Each part trains from scratch on the CPU and writes one safetensors file into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from diffdistill.eval.digits_classifier import (  # noqa: E402
    SHIPPED_CLASSIFIER,
    save_digits_classifier,
    train_digits_classifier,
)

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", action="store_true", help="train the digits FID feature classifier")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help=f"where to write the files (default: {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    args = parser.parse_args(argv)
    if not args.classifier:
        parser.error("choose what to build: --classifier")
    if args.classifier:
        make_classifier(args.output_dir, args.seed)
    # Further parts (e.g. the digits teacher) are added here, each behind its own flag.


if __name__ == "__main__":
    main()
