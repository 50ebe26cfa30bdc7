"""Typing one `kt-sft train` configuration value: booleans, integers, numbers and strings as YAML
or the command line spell them, range and choice checks, each problem a :class:`ConfigError`
naming the key and where it came from."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ConfigError", "NegatedString", "coerce", "negate", "scalar"]


class ConfigError(ValueError):
    """A training configuration key or value is invalid; the message says which and why."""


class NegatedString(str):
    """A bool-like string whose meaning is inverted once parsed (for `completion_only_loss`)."""


def negate(value: Any) -> Any:
    """The transform of an alias that means the opposite of its key (`completion_only_loss`)."""
    return (not value) if isinstance(value, bool) else NegatedString(value)


_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}
_NONE = {"null", "none", "~", ""}


def coerce(key: dataclasses.Field, value: Any, source: str) -> Any:
    """`value` typed and checked as the field `key` declares (its annotation and metadata)."""
    meta = key.metadata
    ann = key.type if isinstance(key.type, str) else str(key.type)
    where = f"{source}: '{key.name}'"
    optional = "None" in ann
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise ConfigError(f"{where} must be set (got an empty value)")
    if ann.startswith("bool"):
        out = _to_bool(value, where)
        return (not out) if isinstance(value, NegatedString) else out
    if ann.startswith("int"):
        return _check_range(_to_int(value, where), where, meta)
    if ann.startswith("float"):
        return _check_range(_to_float(value, where), where, meta)
    if meta.get("kind") in ("paths", "names"):
        return _to_strings(value, where)
    return _to_string(value, where, meta.get("choices"))


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{where} must be true or false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            try:
                as_float = float(value.strip())
            except ValueError:
                as_float = math.nan
            if not as_float.is_integer():
                raise ConfigError(f"{where} must be an integer, got {value!r}") from None
            value = int(as_float)
    if not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    return value


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())  # YAML reads `1e-4` (no dot) as a string
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _to_strings(value: Any, where: str) -> str | list[str]:
    """A string-or-list key (paths, module names): a string stays one, a list is stripped."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{where} must be a string or a list of strings, got {value!r}")
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise ConfigError(
            f"{where} must be a non-empty string or list of non-empty strings, got {value!r}"
        )
    return items[0] if isinstance(value, str) else [v.strip() for v in items]


def _to_string(value: Any, where: str, choices: Sequence[str] | None) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    value = value.strip()
    if choices and value not in choices:
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}{hint}")
    return value


def _bound(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _check_range(value: float, where: str, meta: Mapping[str, Any]) -> Any:
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if lo is not None:
        if meta.get("exclusive_min") and not value > lo:
            raise ConfigError(f"{where} must be > {_bound(lo)}, got {value!r}")
        if not meta.get("exclusive_min") and value < lo:
            raise ConfigError(f"{where} must be >= {_bound(lo)}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where} must be <= {_bound(hi)}, got {value!r}")
    return value


def scalar(value: Any) -> Any:
    """Type a command-line string the way YAML would (`2` -> 2, `true` -> True)."""
    if isinstance(value, str):
        import yaml

        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, (int, float, bool)) or parsed is None:
            return parsed
    return value
