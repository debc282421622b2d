"""Every shipped YAML config loads and round-trips; the README's commands are the ones CI runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffdistill.config import load_config, save_config
from diffdistill.teacher import TeacherConfig
from diffdistill.trainers.method import load_distill_config

REPO = Path(__file__).resolve().parent.parent
LOADERS = {"teacher": lambda p: load_config(TeacherConfig, p), "digits": load_distill_config,
           "toy": load_distill_config}  # configs/<kind>/


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*/*.yaml") if p.parent.name in LOADERS),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_and_round_trips(path, tmp_path):
    cfg = LOADERS[path.parent.name](path)
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(type(cfg), tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_in_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.value == ("FSDP" if path.stem == "fsdp" else "MULTI_GPU") and cfg.num_processes >= 2
    assert {p.parent.name for p in (REPO / "configs").glob("*/*.yaml")} <= {*LOADERS, "accelerate"}


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    readme = (REPO / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "diffdistill " in commands[0] and "pytest" in commands[1]
    assert commands[1] in (REPO / ".ci" / "run").read_text()
