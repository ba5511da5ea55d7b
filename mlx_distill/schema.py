"""Typed dataclass schemas from nested dicts: coercion, choice checks, canonical fingerprints.

Generic over any dataclass tree (the recipe is one): `from_dict` coerces YAML/CLI values to the
annotated types and names the closest valid key on a typo; every error is a `BadInput` that names
the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from typing import Any, Literal

from mlx_distill.errors import BadInput


def choices(tp: Any) -> tuple[str, ...]:
    """The allowed values of a Literal choice type."""
    return typing.get_args(tp)


def check_choices(obj: Any, prefix: str = "") -> None:
    """Every Literal field holds one of its values (also for recipes built in Python)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp, path = getattr(obj, f.name), hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_choices(value, path + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_choices(item, f"{path}[{i}].")
        elif typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            allowed = ", ".join(typing.get_args(tp))
            raise BadInput(f"recipe key {path}: {value!r} is not one of {allowed}")


def fingerprint(obj: Any) -> str:
    """sha256 of canonical JSON, shortened: stable across processes and dict order."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def closest(key: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"did you mean {match[0]!r}?" if match else f"valid keys: {', '.join(valid)}"


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type; raise BadInput naming `path`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise BadInput(f"recipe key {path}: {value!r} is not one of {', '.join(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except BadInput as e:
                errors.append(str(e))
        raise BadInput(errors[0] if errors else f"recipe key {path}: cannot be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BadInput(f"recipe key {path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise BadInput(f"recipe key {path}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "yes",
            "on",
            "1",
            "false",
            "no",
            "off",
            "0",
        ):
            return value.lower() in ("true", "yes", "on", "1")
        raise BadInput(f"recipe key {path}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise BadInput(f"recipe key {path}: expected {tp.__name__}, got {value!r}")
        try:
            # YAML reads 1e-5 as a string and 3.0 as a float: go through float for both.
            number = float(value) if isinstance(value, str) else value
            if tp is int:
                if float(number) != int(number):
                    raise ValueError
                return int(number)
            return float(number)
        except (TypeError, ValueError):
            raise BadInput(f"recipe key {path}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise BadInput(f"recipe key {path}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys name the closest valid key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise BadInput(f"unknown recipe key {path}; {closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)
