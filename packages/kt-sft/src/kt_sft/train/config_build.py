"""A mapping of YAML-style keys -> a validated configuration: aliases resolved, `kt_*` engine
options gathered and checked by KTConfig, every value typed, and the checks across keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from kt_sft.train.config_aliases import ALIASES, kt_option_names, suggest
from kt_sft.train.config_values import ConfigError, coerce, scalar

if TYPE_CHECKING:
    from kt_sft.train.config_keys import TrainConfig

__all__ = ["build", "key_fields"]

_Config = TypeVar("_Config", bound="TrainConfig")


def key_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of the configuration class `cls` by key (the `kt` options dict left out)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "kt"}


def _suggest(key: str, fields: Mapping[str, Any]) -> str:
    return suggest(key, set(fields) | set(ALIASES) | set(kt_option_names()))


def _canonical(
    key: Any, source: str, fields: Mapping[str, dataclasses.Field]
) -> tuple[str, Callable[[Any], Any] | None]:
    """The key `key` names (aliases resolved) and the transform its value takes, if any."""
    if not isinstance(key, str):
        raise ConfigError(f"{source}: keys must be strings, got {key!r}")
    name = key.strip().replace("-", "_")
    if name in fields:
        return name, None
    if name in ALIASES:
        return ALIASES[name]
    if name.startswith("kt_") or name == "kt":
        return name, None
    raise ConfigError(f"{source}: unknown key '{key}'{_suggest(name, fields)}")


def build(cls: type[_Config], values: Mapping[str, Any], source: str) -> _Config:
    """A `cls` instance from YAML-style keys: every key and value checked; raises ConfigError
    naming the key and `source`."""
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping of keys to values, got {type(values).__name__}"
        )
    fields = key_fields(cls)
    seen: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    kt: dict[str, Any] = {}
    for raw_key, raw_value in values.items():
        name, transform = _canonical(raw_key, source, fields)
        if name == "kt":
            if not isinstance(raw_value, Mapping):
                raise ConfigError(f"{source}: 'kt' must be a mapping of engine options")
            for k, v in raw_value.items():
                k = str(k).replace("-", "_")
                kt[k if k.startswith("kt_") else f"kt_{k}"] = v
            continue
        if name.startswith("kt_"):
            kt[name] = raw_value
            continue
        if name in seen:
            raise ConfigError(f"{source}: '{raw_key}' and '{seen[name]}' both set '{name}'")
        seen[name] = str(raw_key)
        value = transform(raw_value) if transform else raw_value
        kwargs[name] = coerce(fields[name], value, source)
    cfg = cls(**kwargs)
    cfg.kt = _validate_kt(kt, source, fields)
    _check_combinations(cfg, source)
    return cfg


def _validate_kt(
    options: dict[str, Any], source: str, fields: Mapping[str, dataclasses.Field]
) -> dict[str, Any]:
    """Check the `kt_*` keys with KTConfig (which names an unknown key); keep them as given."""
    if not options:
        return {}
    options = {k: scalar(v) for k, v in options.items()}
    try:
        from kt_sft.config import KTConfig
    except ImportError:
        return dict(options)
    try:
        KTConfig.from_dict(dict(options))
    except (TypeError, ValueError, KeyError) as exc:
        msg = str(exc).strip("'\"")
        unknown = [k for k in options if k not in kt_option_names()]
        hint = _suggest(unknown[0], fields) if unknown and kt_option_names() else ""
        raise ConfigError(f"{source}: invalid engine option: {msg}{hint}") from exc
    return dict(options)


def _check_combinations(cfg: TrainConfig, source: str) -> None:
    """Checks that involve more than one key."""
    if cfg.max_steps == 0:
        raise ConfigError(f"{source}: 'max_steps' must be > 0, or -1 to train for num_train_epochs")
    if cfg.warmup_ratio >= 1:
        raise ConfigError(f"{source}: 'warmup_ratio' must be < 1, got {cfg.warmup_ratio}")
    if not cfg.lora_targets:
        raise ConfigError(f"{source}: 'lora_target' names no module")
    if not str(cfg.output_dir).strip():
        raise ConfigError(
            f"{source}: 'output_dir' must not be empty (it names the directory "
            "that receives the adapter and checkpoints)"
        )
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"{source}: 'device' is cuda but torch sees no CUDA device "
                f"(torch {torch.__version__}); use `device: cpu` or `auto`"
            )
