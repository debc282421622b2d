"""Typed configs: nested dataclasses loaded from YAML, with ``key=value`` overrides.

A config is a plain ``@dataclass`` whose fields all have defaults; sections are nested dataclasses.
Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Optional[X]`` / ``X | None`` (and other
unions), ``Literal[...]``, ``list[X]``, ``tuple[X, ...]``, fixed ``tuple[X, Y]``, ``dict[str, X]``,
``Any`` and nested dataclasses. Declare ranges and help text with :func:`option`; put cross-field
checks in a ``validate(self)`` method that raises ``ValueError`` (or :class:`ConfigError`) with a
message saying what is wrong and how to fix it. Every problem raises :class:`ConfigError` with one line
naming the file (or override) and the dotted key.

Values from YAML must already have the field's type (ints are accepted for floats; quoted strings
are never converted), except that a comma-separated string such as ``1,2,4`` is read as a list.
Override values are text, parsed by the target field's type: ``model.channels=64``,
``train.lr=1e-4``, ``sample.steps=1,2,4``, ``sample.steps=[1, 2]``, ``ema.decay=none``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import reprlib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError

T = TypeVar("T")

_UNIONS = (Union, types.UnionType)
_NONE = type(None)
_NULLS = ("null", "none", "~")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_SCALARS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` and ``1.0e5`` as floats (YAML 1.1 reads strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def option(default: Any, *, min: float | None = None, max: float | None = None, help: str = "") -> Any:
    """A dataclass field with a default, an optional inclusive ``[min, max]`` range and help text.

    Mutable defaults (list, dict, set, dataclass instance) become a ``default_factory`` that copies
    them, so instances never share them. The range applies to a number or to each item of a list,
    tuple or dict value.
    """
    metadata = {"min": min, "max": max, "help": help}
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<dict>") -> T:
    """Build the dataclass ``cls`` from nested plain data, validating keys, types and ranges.

    Missing keys keep their defaults (a partial section keeps the parent's default for the rest).
    ``source`` names where the data came from in error messages.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"top level of {source} must be a mapping of config keys, got "
                          f"{type(data).__name__}; write 'key: value' lines")
    return _build(cls, data, "", source, None)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dicts, lists and scalars for a config instance (safe for JSON and YAML)."""
    if isinstance(obj, type) or not dataclasses.is_dataclass(obj):
        raise TypeError(f"to_dict needs a dataclass instance, got {obj!r}")
    return _plain(obj)


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (``None``: defaults only), then apply ``key=value`` overrides."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        _apply_override(cls, raw, item)
    origins = ([str(path)] if path is not None else []) + (["overrides"] if overrides else [])
    return from_dict(cls, raw, source=" + ".join(origins) or "defaults")


def config_to_yaml(obj: Any) -> str:
    """The config as YAML text, fields in declaration order; :func:`load_config` reads it back."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)


def save_config(obj: Any, path: str | Path) -> None:
    """Write the config as YAML to ``path``, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(obj), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Building and checking values


@functools.cache
def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """``name -> (field, resolved type)`` for the init fields of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field) -> Any:
    """The field's default value (a fresh one from its factory), or ``MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, source: str, base: Any) -> T:
    """Construct ``cls`` from ``data``; keys not given come from ``base`` (an instance) or defaults."""
    fields = _fields(cls)
    for name in data:
        if name not in fields:
            raise _unknown_key(str(name), list(fields), prefix, source)
    kwargs = {}
    for name, (f, tp) in fields.items():
        default = getattr(base, name) if base is not None else _default(f)
        if name in data:
            kwargs[name] = _check(tp, data[name], prefix + name, source, f.metadata, default)
        elif default is dataclasses.MISSING:
            raise ConfigError(f"missing config key '{prefix}{name}' in {source}; add it, it has no default")
        else:
            kwargs[name] = default
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except (ConfigError, ValueError) as exc:
            where = f"config section '{prefix[:-1]}'" if prefix else "config"
            raise ConfigError(f"invalid {where} in {source}: {' '.join(str(exc).split())}") from exc
    return obj


def _check(tp: Any, value: Any, key: str, source: str, metadata: Mapping[str, Any], base: Any = None) -> Any:
    """``value`` converted to ``tp`` and checked against the field's ``min``/``max``."""
    value = _coerce(tp, value, key, source, base)
    low, high = metadata.get("min"), metadata.get("max")
    if low is None and high is None:
        return value
    items = value.values() if isinstance(value, dict) else (
        value if isinstance(value, (list, tuple)) else [value])
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if (low is not None and item < low) or (high is not None and item > high):
            allowed = f"in [{low}, {high}]" if low is not None and high is not None else (
                f">= {low}" if low is not None else f"<= {high}")
            raise ConfigError(f"config key '{key}' in {source} is {item!r}, out of range; "
                              f"use a value {allowed}")
    return value


def _coerce(tp: Any, value: Any, key: str, source: str, base: Any = None) -> Any:
    """``value`` as type ``tp``; only lossless conversions (int to float, list to tuple, "1,2" to list)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in _UNIONS:
        if value is None and _NONE in args:
            return None
        members = [a for a in args if a is not _NONE]
        if len(members) == 1:
            return _coerce(members[0], value, key, source, base)
        for member in members:
            try:
                return _coerce(member, value, key, source, base)
            except ConfigError:
                continue
    elif origin is Literal:
        if any(value == o and type(value) is type(o) for o in args):
            return value
        raise ConfigError(f"config key '{key}' in {source} is {reprlib.repr(value)}; "
                          f"choose one of {', '.join(map(repr, args))}")
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, key + ".", source, base if isinstance(base, tp) else None)
    elif origin in (list, tuple):
        if isinstance(value, str):
            try:
                value = _parse_text(tp, value)
            except ValueError:
                raise _wrong_type(tp, value, key, source) from None
        if isinstance(value, (list, tuple)) and _fits_length(tp, len(value)):
            return origin(_coerce(_item_type(tp, i), v, f"{key}[{i}]", source) for i, v in enumerate(value))
    elif origin is dict:
        if args[0] is not str:
            raise TypeError(f"config field '{key}' has type {tp}; only dict[str, X] is supported")
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return {k: _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    elif tp in _SCALARS:
        if _SCALARS[tp](value):
            return float(value) if tp is float else value
    else:
        raise TypeError(f"config field '{key}' has unsupported type {tp!r}")
    raise _wrong_type(tp, value, key, source)


def _item_type(tp: Any, index: int) -> Any:
    """Type of item ``index`` of a ``list[X]``, ``tuple[X, ...]`` or fixed ``tuple[X, Y]``."""
    args = get_args(tp)
    if get_origin(tp) is list or args[-1] is Ellipsis:
        return args[0]
    return args[index] if index < len(args) else Any


def _fits_length(tp: Any, n: int) -> bool:
    """Whether ``n`` items fit the sequence type (fixed tuples need exactly their length)."""
    args = get_args(tp)
    return get_origin(tp) is list or args[-1] is Ellipsis or n == len(args)


def _type_name(tp: Any) -> str:
    """Readable name of a field type for error messages."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in _UNIONS:
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if dataclasses.is_dataclass(tp):
        return f"{tp.__name__} section"
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return "None" if tp is _NONE else getattr(tp, "__name__", repr(tp))


def _wrong_type(tp: Any, value: Any, key: str, source: str) -> ConfigError:
    section = _optional_member(tp)
    if dataclasses.is_dataclass(section):
        fix = f"write it as a mapping of its keys ({', '.join(_fields(section))})"
    elif isinstance(value, str) and _parses_as(tp, value):
        fix = "remove the quotes, quoted values stay strings"
    else:
        fix = f"set it to a value of type {_type_name(tp)}"
    return ConfigError(f"config key '{key}' in {source} expects {_type_name(tp)}, got {reprlib.repr(value)} "
                       f"({type(value).__name__}); {fix}")


def _parses_as(tp: Any, text: str) -> bool:
    """Whether override text ``text`` would parse as ``tp``."""
    try:
        _parse_text(tp, text)
    except ValueError:
        return False
    return True


def _unknown_key(name: str, valid: list[str], prefix: str, source: str) -> ConfigError:
    match = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{prefix}{match[0]}'?" if match else "remove it or use a valid key"
    return ConfigError(f"unknown config key '{prefix}{name}' in {source}; {hint} "
                       f"(valid keys: {', '.join(valid)})")


def _plain(value: Any) -> Any:
    """Recursively turn dataclasses into dicts and tuples into lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# YAML files and key=value overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (an empty file is an empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the path or pass none "
                          f"to use the defaults") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}; pass a readable UTF-8 YAML file") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML in {path}{where}: {' '.join(problem.split())}; "
                          f"fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level of {path} must be a mapping of config keys, got "
                          f"{type(data).__name__}; write 'key: value' lines")
    return data


def _optional_member(tp: Any) -> Any:
    """``X`` for ``Optional[X]``; ``tp`` itself otherwise."""
    if get_origin(tp) in _UNIONS:
        members = [a for a in get_args(tp) if a is not _NONE]
        if len(members) == 1:
            return members[0]
    return tp


def _apply_override(cls: type, raw: dict[str, Any], item: str) -> None:
    """Set the dotted key of a ``key=value`` override in the raw nested dict, parsing by field type."""
    source = f"override '{item}'"
    key, sep, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key or "" in key.split("."):
        raise ConfigError(f"malformed override '{item}'; write key=value with a dotted key, "
                          f"e.g. model.channels=64")
    parts = key.split(".")
    tp, node, default, metadata = cls, raw, None, {}
    for depth, part in enumerate(parts):
        prefix = "".join(p + "." for p in parts[:depth])
        section = _optional_member(tp)
        if dataclasses.is_dataclass(section):
            fields = _fields(section)
            if part not in fields:
                raise _unknown_key(part, list(fields), prefix, source)
            field, tp = fields[part]
            metadata = field.metadata
            default = getattr(default, part) if isinstance(default, section) else _default(field)
        elif get_origin(section) is dict:
            tp = get_args(section)[1]
            default = default.get(part) if isinstance(default, dict) else None
        else:
            raise ConfigError(f"{source}: '{prefix[:-1]}' is {_type_name(tp)} and has no keys; "
                              f"set it directly, e.g. {prefix[:-1]}=...")
        if depth < len(parts) - 1:
            if not isinstance(node.get(part), dict):
                node[part] = _plain(default) if isinstance(default, dict) else {}
            node = node[part]
    try:
        value = _parse_text(tp, text)
    except ValueError:
        if dataclasses.is_dataclass(_optional_member(tp)):
            first = next(iter(_fields(_optional_member(tp))), "name")
            raise ConfigError(f"{source} sets the section '{key}' to a value; set its keys instead, "
                              f"e.g. {key}.{first}=...") from None
        raise ConfigError(f"cannot parse {source}: '{key}' expects {_type_name(tp)}, got {text!r}; "
                          f"give a value of that type") from None
    node[parts[-1]] = _check(tp, value, key, source, metadata)


def _parse_text(tp: Any, text: str) -> Any:
    """Parse override text as type ``tp``; raise ``ValueError`` when it does not fit."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return _flow(text)
    if origin in _UNIONS:
        if _NONE in args and text.lower() in _NULLS:
            return None
        for member in args:
            if member is not _NONE:
                try:
                    return _parse_text(member, text)
                except ValueError:
                    continue
    elif origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
    elif origin in (list, tuple):
        if text.startswith("["):
            items = _flow(text)
        else:
            items = [part.strip() for part in text.split(",")] if text else []
        if isinstance(items, list):
            return [_parse_text(_item_type(tp, i), v) if isinstance(v, str) else v
                    for i, v in enumerate(items)]
    elif origin is dict:
        mapping = _flow(text) if text.startswith("{") else None
        if isinstance(mapping, dict):
            return {k: _parse_text(args[1], v) if isinstance(v, str) else v for k, v in mapping.items()}
    elif tp is bool:
        if text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
    elif tp in (int, float, str):
        return tp(text)
    raise ValueError(f"cannot read {text!r} as {_type_name(tp)}")


def _flow(text: str) -> Any:
    """YAML value of ``text`` (flow syntax such as ``[1, 2]`` or ``{a: 1}``)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None
