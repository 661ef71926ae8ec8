"""Typed, strict job configs: one nested dataclass per job, loaded from YAML, overridden with --set.

Unknown keys are an error (a misspelt key must never be dropped silently).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            number = float(value.replace("_", ""))  # accepts 3e6 and 3_000_000
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            return int(number)
    raise ValueError(f"{where}: expected an int, got {value!r}")


def _to_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{where}: expected a bool, got {value!r}")
    if tp is int:
        return _to_int(value, where)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Coerce a YAML value to the annotated type `tp`, raising ValueError with the key path."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where}: {value!r} fits none of {tp}: {errors}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where + ".")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    return _to_scalar(tp, value, where)


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a dict; unknown keys raise ValueError naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(where + k for k in unknown)} "
                         f"(valid: {', '.join(where + n for n in sorted(names))})")
    return cls(**{k: _convert(hints[k], v, where + k) for k, v in data.items()})


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(cls: type[T], path: str | Path | None, overrides: typing.Sequence[str] = ()) -> T:
    """Load YAML at `path` into `cls`, applying `a.b=value` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path is not None:
        tree = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw)
    return from_dict(cls, tree)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_job_args(cls: type[T], description: str, argv: Sequence[str] | None = None,
                   shortcuts: dict[str, str] | None = None) -> T:
    """The common job CLI: --config FILE and repeated --set a.b=value. `shortcuts` maps extra flags
    to config keys (evaluate's `--model X` is `--set model=X`); they apply after the --set items."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=shortcuts is None,
                        help="YAML config (see jobs/configs/<job>/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=1e-5 (repeatable)")
    for flag, key in (shortcuts or {}).items():
        parser.add_argument(f"--{flag}", dest=f"shortcut:{key}", metavar="VALUE", help=f"same as --set {key}=VALUE")
    args = parser.parse_args(argv)
    overrides = list(args.set) + [f"{dest.split(':', 1)[1]}={value}" for dest, value in vars(args).items()
                                  if dest.startswith("shortcut:") and value is not None]
    try:
        return load_config(cls, args.config, overrides)
    except ValueError as e:
        parser.error(str(e))
