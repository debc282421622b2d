"""Typed configs: YAML loading, key=value overrides, validation messages and round trips."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal, Optional

import pytest

from diffdistill.config import config_to_yaml, from_dict, load_config, option, save_config, to_dict
from diffdistill.errors import ConfigError


@dataclasses.dataclass
class ModelConfig:
    channels: int = option(32, min=1, help="base channel count")
    kind: Literal["unet", "dit"] = "unet"
    dropout: float = option(0.0, min=0.0, max=1.0)


@dataclasses.dataclass
class SampleConfig:
    steps: list[int] = option([1, 2, 4], min=1)
    sigmas: tuple[float, ...] = (80.0, 0.002)
    guidance: Optional[float] = None
    size: tuple[int, int] = (8, 8)


@dataclasses.dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    lr: float = option(1e-4, min=0.0)
    ema: bool = True
    max_steps: int | None = 100
    warmup: int = 0
    loss_weights: dict[str, float] = option({"mse": 1.0, "lpips": 0.5}, min=0.0)
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(channels=64))
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    def validate(self) -> None:
        if self.max_steps is not None and self.warmup > self.max_steps:
            raise ValueError(f"warmup ({self.warmup}) exceeds max_steps ({self.max_steps}); "
                             f"lower warmup or raise max_steps")


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "run.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


def error(func, *args, **kwargs) -> str:
    """The message of the ConfigError ``func`` raises; it must be a single line."""
    with pytest.raises(ConfigError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults():
    cfg = load_config(RunConfig, None)
    assert cfg == RunConfig()
    assert cfg.model.channels == 64 and cfg.sample.steps == [1, 2, 4]
    assert RunConfig().sample.steps is not RunConfig().sample.steps  # mutable defaults are not shared
    assert dataclasses.fields(ModelConfig)[0].metadata["help"] == "base channel count"


def test_yaml_load(write):
    path = write("name: big\nlr: 2.0e-4\nmodel:\n  kind: dit\nsample:\n  steps: [1, 2]\n"
                 "  sigmas: [10, 1]\nloss_weights: {mse: 2}\n")
    cfg = load_config(RunConfig, path)
    assert cfg.name == "big" and cfg.lr == 2e-4
    assert cfg.model == ModelConfig(channels=64, kind="dit")  # partial section keeps the parent default
    assert cfg.sample.steps == [1, 2] and cfg.sample.sigmas == (10.0, 1.0)
    assert isinstance(cfg.sample.sigmas[0], float)  # int accepted for float
    assert cfg.loss_weights == {"mse": 2.0}


def test_yaml_exponent_without_dot_is_a_float(write):
    assert load_config(RunConfig, write("lr: 1e-5\n")).lr == 1e-5


def test_yaml_comma_separated_list(write):
    assert load_config(RunConfig, write("sample:\n  steps: 1,2,4,8\n")).sample.steps == [1, 2, 4, 8]


def test_overrides_of_every_type(write):
    path = write("seed: 3\nsample:\n  guidance: 2.0\n")
    cfg = load_config(RunConfig, path, [
        "name=small", "seed=7", "lr=1e-3", "ema=false", "max_steps=none", "model.channels=16",
        "model.kind=dit", "sample.steps=1,2,4", "sample.sigmas=[5, 0.5]", "sample.guidance=null",
        "sample.size=16,32", "loss_weights.lpips=0.25",
    ])
    assert cfg.name == "small" and cfg.seed == 7 and cfg.lr == 1e-3 and cfg.ema is False
    assert cfg.max_steps is None
    assert cfg.model == ModelConfig(channels=16, kind="dit")
    assert cfg.sample == SampleConfig(steps=[1, 2, 4], sigmas=(5.0, 0.5), guidance=None, size=(16, 32))
    assert cfg.loss_weights == {"mse": 1.0, "lpips": 0.25}  # a dotted dict override keeps other entries


@pytest.mark.parametrize("text, expected", [("true", True), ("0", False), ("YES", True), ("no", False)])
def test_bool_override_spellings(text, expected):
    assert load_config(RunConfig, None, [f"ema={text}"]).ema is expected


def test_string_override_is_not_parsed():
    assert load_config(RunConfig, None, ["name=1e-4"]).name == "1e-4"
    assert load_config(RunConfig, None, ["loss_weights={a: 1, b: 0.5}"]).loss_weights == {"a": 1.0, "b": 0.5}


def test_override_beats_file_and_later_override_wins(write):
    cfg = load_config(RunConfig, write("seed: 3\n"), ["seed=4", "seed=5"])
    assert cfg.seed == 5


def test_unknown_top_level_key(write):
    message = error(load_config, RunConfig, write("nmae: x\n"))
    assert "unknown config key 'nmae'" in message and "run.yaml" in message
    assert "did you mean 'name'?" in message and "valid keys: name, seed" in message


def test_unknown_nested_key_in_file_and_override(write):
    message = error(load_config, RunConfig, write("model:\n  chanels: 3\n"))
    assert "'model.chanels'" in message and "did you mean 'model.channels'?" in message
    assert "valid keys: channels, kind, dropout" in message
    message = error(load_config, RunConfig, None, ["sample.stpes=2"])
    assert "'sample.stpes'" in message and "did you mean 'sample.steps'?" in message
    assert "override 'sample.stpes=2'" in message


def test_unknown_key_without_close_match():
    message = error(from_dict, RunConfig, {"zzz": 1}, source="cfg.yaml")
    assert "unknown config key 'zzz' in cfg.yaml; remove it" in message


def test_wrong_type(write):
    message = error(load_config, RunConfig, write("lr: fast\n"))
    assert "'lr'" in message and "expects float" in message and "'fast'" in message
    message = error(load_config, RunConfig, write("seed: '3'\n"))  # quoted strings are not converted
    assert "'seed'" in message and "expects int" in message and "remove the quotes" in message
    message = error(load_config, RunConfig, write("model: 3\n"))
    assert "'model'" in message and "ModelConfig" in message
    message = error(load_config, RunConfig, write("sample:\n  size: [1, 2, 3]\n"))
    assert "'sample.size'" in message and "tuple[int, int]" in message
    message = error(load_config, RunConfig, write("sample:\n  steps: [1, two]\n"))
    assert "'sample.steps[1]'" in message


def test_bool_rejected_for_int_and_int_accepted_for_float():
    assert "expects int" in error(from_dict, RunConfig, {"seed": True})
    cfg = from_dict(RunConfig, {"lr": 1, "sample": {"guidance": 3}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and isinstance(cfg.sample.guidance, float)


def test_out_of_range():
    message = error(from_dict, RunConfig, {"model": {"dropout": 1.5}}, source="x.yaml")
    assert "'model.dropout' in x.yaml is 1.5, out of range; use a value in [0.0, 1.0]" in message
    assert "use a value >= 1" in error(load_config, RunConfig, None, ["model.channels=0"])
    assert "'sample.steps'" in error(load_config, RunConfig, None, ["sample.steps=1,0"])
    assert "'loss_weights.mse'" in error(load_config, RunConfig, None, ["loss_weights.mse=-1"])


def test_literal_lists_options():
    message = error(load_config, RunConfig, None, ["model.kind=vit"])
    assert "'model.kind'" in message and "'unet'" in message and "'dit'" in message
    message = error(from_dict, RunConfig, {"model": {"kind": "vit"}})
    assert "choose one of 'unet', 'dit'" in message


def test_missing_file(tmp_path):
    message = error(load_config, RunConfig, tmp_path / "nope.yaml")
    assert "nope.yaml does not exist" in message


def test_yaml_syntax_error(write):
    message = error(load_config, RunConfig, write("name: a\nmodel: [1, 2\nseed: 3\n"))
    assert "invalid YAML in" in message and "run.yaml" in message and "line " in message


def test_non_mapping_top_level(write):
    message = error(load_config, RunConfig, write("- 1\n- 2\n"))
    assert "top level of" in message and "must be a mapping" in message and "list" in message


def test_empty_file_gives_defaults(write):
    assert load_config(RunConfig, write("")) == RunConfig()


@pytest.mark.parametrize("item", ["seed", "=3", "model..channels=3"])
def test_malformed_override(item):
    assert "malformed override" in error(load_config, RunConfig, None, [item])


def test_bad_override_values():
    message = error(load_config, RunConfig, None, ["seed=abc"])
    assert "'seed' expects int" in message and "'abc'" in message
    assert "expects bool" in error(load_config, RunConfig, None, ["ema=maybe"])
    assert "expects int" in error(load_config, RunConfig, None, ["seed=none"])  # not Optional
    assert "set its keys instead" in error(load_config, RunConfig, None, ["model=3"])
    assert "has no keys" in error(load_config, RunConfig, None, ["seed.x=3"])


def test_validate_failure(write):
    message = error(load_config, RunConfig, write("warmup: 500\n"))
    assert "invalid config in " in message and "run.yaml: warmup (500) exceeds max_steps (100)" in message
    assert load_config(RunConfig, write("warmup: 500\n"), ["max_steps=none"]).warmup == 500


def test_save_load_round_trip(tmp_path):
    cfg = load_config(RunConfig, None, ["lr=3e-7", "name=null", "sample.guidance=1.5",
                                        "sample.sigmas=1,2.5", "model.kind=dit", "max_steps=none"])
    path = tmp_path / "out" / "cfg.yaml"
    save_config(cfg, path)
    assert load_config(RunConfig, path) == cfg
    assert config_to_yaml(cfg).startswith("name: 'null'\nseed: 0\n")  # declaration order


def test_to_dict_is_plain():
    data = to_dict(RunConfig())
    assert data["sample"]["sigmas"] == [80.0, 0.002] and isinstance(data["sample"]["size"], list)
    assert data["model"] == {"channels": 64, "kind": "unet", "dropout": 0.0}
    assert json.loads(json.dumps(data)) == data
    assert from_dict(RunConfig, data) == RunConfig()
