"""Where a `kt-sft train` configuration comes from: a YAML file (relative paths resolved next to
it) or the embedded demo defaults, with `--key value` command-line overrides on top."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kt_sft.train.config_aliases import ALIASES
from kt_sft.train.config_build import key_fields
from kt_sft.train.config_keys import EMBEDDED, TrainConfig
from kt_sft.train.config_values import ConfigError

__all__ = ["embedded_defaults", "load_train_config", "parse_overrides"]

_FIELDS = key_fields(TrainConfig)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """Turn `--key value`, `--key=value` and bare boolean `--flag` into a dict of strings.

    Values stay strings here (`a,b` lists included) and are typed by the schema; a flag followed
    by another `--option` or by nothing means `true`.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"command line: expected --key value, got {token!r}")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not key:
            raise ConfigError(f"command line: empty option name in {token!r}")
        canonical = ALIASES.get(key, (key, None))[0]
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            elif canonical in _FIELDS and _FIELDS[canonical].type not in (bool, "bool"):
                raise ConfigError(f"command line: --{key} needs a value (--{key} VALUE)")
            else:
                value = "true"
        if (
            canonical in _FIELDS
            and _FIELDS[canonical].metadata.get("kind") in ("paths", "names")
            and "," in value
        ):
            out[key] = [v for v in value.split(",") if v]
        else:
            out[key] = value
        i += 1
    return out


def _resolve_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative model/dataset/output paths in a YAML file relative to the file's folder,
    when that is where they exist (so a config works from any working directory)."""
    out = dict(values)
    for key in (
        "model_name_or_path",
        "model",
        "model_path",
        "tokenizer_name_or_path",
        "dataset",
        "dataset_path",
        "data_files",
        "train_file",
    ):
        if key not in out:
            continue

        def fix(p: Any) -> Any:
            if not isinstance(p, str) or p == EMBEDDED or Path(p).is_absolute() or Path(p).exists():
                return p
            candidate = base / p
            return str(candidate) if candidate.exists() else p

        value = out[key]
        out[key] = [fix(v) for v in value] if isinstance(value, list) else fix(value)
    return out


def load_train_config(
    path: str | Path | None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    defaults: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Read a YAML file (or `defaults` when `path` is None), apply overrides, validate.

    With `path=None` and no `defaults`, the embedded demo configuration is used.
    """
    if path is None:
        base = dict(defaults) if defaults is not None else embedded_defaults()
        source = "embedded default config"
    else:
        path = Path(path)
        base = _resolve_paths(_read_yaml(path), path.resolve().parent)
        source = str(path)
    extra = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    merged = dict(base)
    for key, value in extra.items():
        name = key.replace("-", "_")
        canonical = ALIASES.get(name, (name, None))[0]
        # an override replaces whichever spelling the file used
        for existing in list(merged):
            if ALIASES.get(existing.replace("-", "_"), (existing, None))[0] == canonical:
                del merged[existing]
        merged[name] = value
    where = source if not extra else f"{source} (with command-line overrides)"
    cfg = TrainConfig.from_dict(merged, where)
    if cfg.model_name_or_path is None:
        raise ConfigError(
            f"{where}: missing model path: set 'model_name_or_path' to a Hugging Face checkpoint "
            f"directory (or `{EMBEDDED}` for the built-in demo model)"
        )
    if not cfg.datasets:
        raise ConfigError(
            f"{where}: missing dataset: set 'dataset' to a .jsonl/.json/.parquet/.csv file "
            f"(or `{EMBEDDED}` for the bundled demo data)"
        )
    return cfg


def embedded_defaults() -> dict[str, Any]:
    """The keys of the embedded demo run (resources/default.yaml)."""
    from importlib.resources import files

    import yaml

    text = files("kt_sft.resources").joinpath("default.yaml").read_text(encoding="utf-8")
    return dict(yaml.safe_load(text))
