"""Atomic, verified checkpoints.

A checkpoint is a directory ``checkpoints/step_XXXXXXX/`` holding one safetensors file per network
(trainable roles, buffer roles, EMA copies — never the frozen teacher), ``state.pt`` (optimizer and
LR-scheduler states, RNG state, step, the method's own state; loaded with ``weights_only=True``) and
``manifest.json`` with the SHA-256 of every file. It is written into a temporary directory that is
renamed into place only when complete, so a crash never leaves a half-written ``step_*``; a directory
whose files do not match its manifest is never used for resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import DiffDistillError

MANIFEST = "manifest.json"
STATE_FILE = "state.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, networks: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any], keep: int) -> Path:
    """Write ``networks`` (file stem → state dict) and ``state`` as checkpoint ``step``; keep the last ``keep``."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, tensors in networks.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / f"{stem}.safetensors")
    torch.save(state, tmp / STATE_FILE)
    manifest = {"step": step, "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir())}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories (with a manifest), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint directory ``step_XXXXXXX`` was saved at."""
    return int(Path(path).name.rsplit("_", 1)[-1])


def verify_checkpoint(path: Path) -> bool:
    """True when every file listed in the manifest exists with the recorded SHA-256."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all(_sha256(path / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies, or ``None``."""
    for path in reversed(list_checkpoints(run_dir)):
        if verify_checkpoint(path):
            return path
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``(networks, state)`` as :func:`save_checkpoint` wrote them."""
    if not verify_checkpoint(path):
        raise DiffDistillError(f"checkpoint {path} is incomplete or corrupt (manifest mismatch); delete it to "
                               "resume from an older one")
    networks = {p.stem: load_file(p) for p in sorted(path.glob("*.safetensors"))}
    try:
        state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")  # optimizers move it
    except pickle.UnpicklingError as exc:  # anything beyond tensors and plain containers
        reason = (str(exc).splitlines() or ["unpickling refused"])[0][:200]
        raise DiffDistillError(f"refusing {path / STATE_FILE}: it holds objects other than tensors and plain "
                               f"Python values, which diffdistill never unpickles ({reason})") from exc
    return networks, state


def shared_keys(module: nn.Module, frozen: nn.Module) -> set[str]:
    """State keys of ``module`` whose tensors are ``frozen``'s own objects (a LoRA critic's base weights
    are the teacher's): checkpoints leave them out."""
    # parameters and buffers, not frozen.state_dict(): a sharded teacher's state-dict hooks are collective
    ids = {id(t) for t in (*frozen.parameters(), *frozen.buffers())}
    return {k for k, t in module.state_dict(keep_vars=True).items() if id(t) in ids}


def load_network_state(module: nn.Module, state: dict[str, torch.Tensor], frozen: nn.Module, what: str) -> None:
    """Load a checkpointed ``state`` into ``module``; exactly the keys shared with ``frozen`` may be absent."""
    own = module.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise DiffDistillError(f"{what} does not fit this run's network: {len(wrong)} tensor(s) differ in shape, e.g. "
                               f"{k} is {list(state[k].shape)} in the checkpoint and {list(own[k].shape)} here; was "
                               "it made with another teacher or config?")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or set(missing) != shared_keys(module, frozen):
        raise DiffDistillError(f"{what} does not fit this run's network (missing {sorted(set(missing))[:3]}, "
                               f"unexpected {unexpected[:3]}); was it made by another method or config?")
