"""Loading a config: YAML, `section.key=value` overrides (values parsed as YAML) and type
coercion into the dataclass tree of `pipeline.config.sections`. Unknown keys are errors that
name the key and suggest the nearest valid one."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.sections import Config, ConfigError


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = _hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in valid:
            raise ConfigError(f"unknown key {name!r}{_suggest(str(key), valid)}")
        kwargs[key] = _coerce(hints[key], value, name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"{where}: {e}") from None


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, name)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name} may not be null")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{name} = {value!r} matches none of the allowed types")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):   # YAML 1.1 reads `1e-5` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None


def from_dict(raw: dict | None, overrides: list[str] | tuple = (), check: bool = True
              ) -> Config:
    """The Config of `raw` (sections as nested mappings) and `section.key=value` overrides;
    `Config.explicit` holds the dotted keys they set (a recipe leaves those alone). `check`:
    the checks across sections that a recipe's intermediate configs skip."""
    raw = dict(raw or {})
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "")
    cfg.explicit = frozenset(_dotted(raw))
    if check:
        cfg.check_ensemble_windows()
    return cfg


def _dotted(raw: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out += _dotted(v, key) if isinstance(v, dict) and v else [key]
    return out


def load(path: str | Path | None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    return from_dict(read_raw(path), overrides)


def read_raw(path: str | Path | None, overrides: list[str] | tuple = ()) -> dict:
    """The YAML mapping of a config file ({} for None) with `overrides` applied: what the
    config was written as, before defaults (a tuned config is written from it)."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    return raw
