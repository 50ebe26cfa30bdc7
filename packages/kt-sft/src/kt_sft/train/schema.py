"""The `kt-sft train` configuration: every key, its type, default and check, in one place.

Keys follow the names users know from LLaMA-Factory and TRL (`model_name_or_path`, `cutoff_len`,
`per_device_train_batch_size`, `lora_rank`, ...); common alternative spellings are accepted as
aliases. Keys starting with `kt_` are engine options, validated by `kt_sft.KTConfig`. A value comes
from (highest first) a `--key value` command-line override, the YAML file, the built-in default.
Every problem raises `ConfigError` naming the key and where it came from; an unknown key gets the
closest known key suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ALIASES",
    "EMBEDDED",
    "GROUPS",
    "ConfigError",
    "TrainConfig",
    "kt_option_names",
    "load_train_config",
    "parse_overrides",
]

#: The value of `model_name_or_path` / `dataset` that selects the embedded demo model / data.
EMBEDDED = "embedded"
# Micro-batches per optimizer step: the loop plans a window's batches up front, so the count is
# bounded (a typo such as 1e20 must be an error, not unbounded memory).
MAX_ACCUMULATION_STEPS = 65536

GROUPS = {
    "model": "Model",
    "data": "Data",
    "lora": "LoRA",
    "train": "Training",
    "output": "Output and checkpoints",
    "kt": "Engine",
}


class ConfigError(ValueError):
    """A training configuration key or value is invalid; the message says which and why."""


def opt(
    default: Any,
    help: str,
    group: str,
    *,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_min: bool = False,
    kind: str | None = None,
) -> Any:
    """A dataclass field carrying the documentation and checks of one config key."""
    meta = {
        "help": help,
        "group": group,
        "choices": tuple(choices) if choices else None,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_min": exclusive_min,
        "kind": kind,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every key of a `kt-sft train` YAML file (see docs/configuration.md)."""

    # ---- model
    model_name_or_path: str | None = opt(
        None,
        "Hugging Face checkpoint directory of the base model (config.json + safetensors). "
        f"`{EMBEDDED}` selects the built-in tiny Qwen3-MoE demo model. Required.",
        "model",
    )
    tokenizer_name_or_path: str | None = opt(
        None, "Tokenizer directory; defaults to the model directory.", "model"
    )
    trust_remote_code: bool = opt(
        False, "Allow model code shipped with the checkpoint (custom architectures).", "model"
    )
    bf16: bool = opt(
        False,
        "Run the PyTorch side (attention, router, embeddings) in bfloat16 instead of "
        "float32. The CPU experts always use the engine's own weight format (kt_weight_dtype).",
        "model",
    )
    device: str = opt(
        "auto",
        "Where the non-expert part of the model runs: `auto` (CUDA when available), "
        "`cpu` or `cuda`.",
        "model",
        choices=("auto", "cpu", "cuda"),
    )
    torch_num_threads: int | None = opt(
        None,
        "Intra-op threads of PyTorch (attention, router, LM head); unset = PyTorch's "
        "default (one per core). The engine has its own (kt_num_threads). On a CPU-only machine "
        "they take turns; small models run faster with 1.",
        "model",
        minimum=1,
    )
    use_kt: bool = opt(
        True,
        "Run the routed experts in the kt engine. `false` trains the stock Hugging Face + "
        "PEFT model instead (for comparisons; needs memory for every expert in PyTorch).",
        "model",
    )

    # ---- data
    dataset: str | list[str] | None = opt(  # noqa: RUF009 - immutable default
        None,
        "Training data: a file or list of files (.jsonl, .json, .parquet, .csv). "
        f"`{EMBEDDED}` selects the bundled demo dataset. Required.",
        "data",
        kind="paths",
    )
    dataset_format: str = opt(
        "auto",
        "How records are read: `text` (one `text` column, loss on every token), "
        "`prompt_completion` (loss on the completion only), `messages` (chat turns through the "
        "chat template, loss on assistant turns only), `alpaca` (instruction/input/output) or "
        "`sharegpt` (conversations of from/value); `auto` picks by the columns present.",
        "data",
        choices=("auto", "text", "prompt_completion", "messages", "alpaca", "sharegpt"),
    )
    text_column: str = opt("text", "Column holding the text of the `text` format.", "data")
    prompt_column: str = opt("prompt", "Column holding the prompt of `prompt_completion`.", "data")
    completion_column: str = opt(
        "completion", "Column holding the completion of `prompt_completion`.", "data"
    )
    messages_column: str = opt(
        "messages", "Column holding the list of {role, content} turns of `messages`.", "data"
    )
    template: str = opt(
        "auto",
        "Chat template for `messages`, `alpaca` and `sharegpt`: `auto` uses the "
        "tokenizer's own template, `chatml` the built-in ChatML template (<|im_start|>role ... "
        "<|im_end|>).",
        "data",
        choices=("auto", "chatml"),
    )
    cutoff_len: int = opt(
        1024, "Maximum tokens per example; longer examples are truncated.", "data", minimum=1
    )
    max_samples: int | None = opt(
        None, "Use at most this many examples (after reading, before shuffling).", "data", minimum=1
    )
    train_on_prompt: bool = opt(
        False,
        "Also compute the loss on prompts / user turns (by default only completions and "
        "assistant turns are trained).",
        "data",
    )

    # ---- LoRA
    finetuning_type: str = opt(
        "lora", "Fine-tuning method; only `lora` is supported.", "lora", choices=("lora",)
    )
    lora_rank: int = opt(8, "LoRA rank r.", "lora", minimum=1)
    lora_alpha: float | None = opt(
        None,
        "LoRA alpha (scaling = alpha / r); defaults to 2 × lora_rank.",
        "lora",
        minimum=0,
        exclusive_min=True,
    )
    lora_dropout: float = opt(
        0.0,
        "Dropout on the LoRA input. Only without expert LoRA: PEFT's adapters on fused "
        "expert tensors (target_parameters) have no dropout.",
        "lora",
        minimum=0,
        maximum=1,
    )
    lora_target: str | list[str] = opt(  # noqa: RUF009 - immutable default
        "all",
        "What gets LoRA adapters: `all` (routed experts + every linear layer except the "
        "LM head and router), `experts` (routed experts only), or a list / comma-separated "
        "string of module names (e.g. `q_proj,v_proj`), where `experts` may be one item.",
        "lora",
        kind="names",
    )

    # ---- training
    learning_rate: float = opt(
        1e-4, "Peak learning rate of AdamW.", "train", minimum=0, exclusive_min=True
    )
    num_train_epochs: float = opt(
        3.0,
        "Passes over the data (ignored when max_steps > 0).",
        "train",
        minimum=0,
        exclusive_min=True,
    )
    max_steps: int = opt(
        -1, "Optimizer steps to run; -1 = use num_train_epochs.", "train", minimum=-1
    )
    per_device_train_batch_size: int = opt(1, "Examples per micro-batch.", "train", minimum=1)
    gradient_accumulation_steps: int = opt(
        1,
        "Micro-batches per optimizer step (at most 65536).",
        "train",
        minimum=1,
        maximum=MAX_ACCUMULATION_STEPS,
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in backward to save memory.", "train"
    )
    lr_scheduler_type: str = opt(
        "cosine",
        "Learning-rate schedule after warmup.",
        "train",
        choices=("cosine", "linear", "constant", "constant_with_warmup"),
    )
    warmup_ratio: float = opt(
        0.0, "Fraction of the steps used for linear warmup.", "train", minimum=0, maximum=1
    )
    warmup_steps: int = opt(
        0, "Warmup steps (overrides warmup_ratio when > 0).", "train", minimum=0
    )
    weight_decay: float = opt(0.0, "AdamW weight decay.", "train", minimum=0)
    max_grad_norm: float = opt(
        1.0, "Gradient clipping norm; 0 disables clipping.", "train", minimum=0
    )
    adam_beta1: float = opt(0.9, "AdamW beta1.", "train", minimum=0, maximum=1)
    adam_beta2: float = opt(0.999, "AdamW beta2.", "train", minimum=0, maximum=1)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", "train", minimum=0, exclusive_min=True)
    optim: str = opt("adamw_torch", "Optimizer.", "train", choices=("adamw_torch",))
    seed: int = opt(
        42,
        "Seed for LoRA initialisation and data order (0 to 2**63 - 1).",
        "train",
        minimum=0,
        maximum=2**63 - 1,
    )
    on_nonfinite_loss: str = opt(
        "error",
        "What a step whose loss or gradient norm is NaN / Inf does: `error` stops the "
        "run with an error before the optimizer step (nothing non-finite reaches the adapter or a "
        "checkpoint), `skip` drops that step's gradients and goes on (the step still consumes "
        "its data and counts).",
        "train",
        choices=("error", "skip"),
    )

    # ---- output
    output_dir: str = opt(
        "kt-sft-output", "Where the adapter, checkpoints, loss curve and trace go.", "output"
    )
    overwrite_output_dir: bool = opt(
        False, "Allow reusing an output_dir that already holds results.", "output"
    )
    logging_steps: int = opt(10, "Print a log line every this many steps.", "output", minimum=1)
    save_steps: int = opt(
        0,
        "Write a resumable checkpoint every this many steps and after the last one "
        "(0 = only the final adapter).",
        "output",
        minimum=0,
    )
    save_total_limit: int | None = opt(
        None, "Keep only the newest this many checkpoints.", "output", minimum=1
    )
    resume_from_checkpoint: str | None = opt(
        None,
        "Checkpoint directory to resume from, or `auto` for the newest one in output_dir.",
        "output",
    )
    plot_loss: bool = opt(True, "Write loss_curve.png.", "output")
    profile: bool = opt(
        True, "Time the CPU experts and the rest, and write a Chrome trace (trace.json).", "output"
    )
    disable_tqdm: bool = opt(
        False, "Hide the progress bar (log lines are still printed).", "output"
    )

    # ---- engine options: every `kt_*` key, passed to kt_sft.KTConfig
    kt: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Engine options (`kt_*` keys), validated by kt_sft.KTConfig.",
            "group": "kt",
        },
    )

    # ---- derived
    @property
    def scaling_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank)

    @property
    def datasets(self) -> list[str]:
        if self.dataset is None:
            return []
        return [self.dataset] if isinstance(self.dataset, str) else list(self.dataset)

    @property
    def lora_targets(self) -> list[str]:
        value = self.lora_target
        items = value.split(",") if isinstance(value, str) else list(value)
        return [s.strip() for s in items if s.strip()]

    def to_dict(self) -> dict[str, Any]:
        """The config as a flat dict of YAML keys (`kt_*` options inline)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "kt"}
        out.update(self.kt)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build and validate a config from YAML-style keys; raises ConfigError."""
        return _build(values, source)


# ---------------------------------------------------------------------------------------------
# aliases: other spellings users bring from LLaMA-Factory, TRL and HF TrainingArguments


def _negate(value: Any) -> Any:
    return (not value) if isinstance(value, bool) else _NegatedString(value)


class _NegatedString(str):
    """A bool-like string whose meaning is inverted once parsed (for `completion_only_loss`)."""


#: alias -> (canonical key, transform or None)
ALIASES: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "model": ("model_name_or_path", None),
    "model_path": ("model_name_or_path", None),
    "tokenizer": ("tokenizer_name_or_path", None),
    "dataset_path": ("dataset", None),
    "data_files": ("dataset", None),
    "train_file": ("dataset", None),
    "formatting": ("dataset_format", None),
    "dataset_text_field": ("text_column", None),
    "max_seq_length": ("cutoff_len", None),
    "max_length": ("cutoff_len", None),
    "completion_only_loss": ("train_on_prompt", _negate),
    "assistant_only_loss": ("train_on_prompt", _negate),
    "r": ("lora_rank", None),
    "lora_r": ("lora_rank", None),
    "target_modules": ("lora_target", None),
    "epochs": ("num_train_epochs", None),
    "batch_size": ("per_device_train_batch_size", None),
    "train_batch_size": ("per_device_train_batch_size", None),
    "lr": ("learning_rate", None),
    "lr_scheduler": ("lr_scheduler_type", None),
    "resume": ("resume_from_checkpoint", None),
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "kt"}


def kt_option_names() -> list[str]:
    """The `kt_*` keys KTConfig accepts (empty when kt_sft's KTConfig is not importable)."""
    try:
        from kt_sft.config import KTConfig
    except ImportError:
        return []
    names: set[str] = set()
    for f in dataclasses.fields(KTConfig):
        names.add(f.name if f.name.startswith("kt_") else f"kt_{f.name}")
    for attr in ("ALIASES", "KT_ALIASES", "_ALIASES", "LEGACY_ALIASES"):
        extra = getattr(KTConfig, attr, None) or getattr(
            __import__("kt_sft.config", fromlist=[attr]), attr, None
        )
        if isinstance(extra, Mapping):
            names.update(k for k in extra if isinstance(k, str) and k.startswith("kt_"))
    return sorted(names)


def _known_names() -> list[str]:
    return sorted(set(_FIELDS) | set(ALIASES) | set(kt_option_names()))


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _known_names(), n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key.lower(), _known_names(), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else "; see docs/configuration.md for every key"


# ---------------------------------------------------------------------------------------------
# value parsing

_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}
_NONE = {"null", "none", "~", ""}


def _annotation(name: str) -> str:
    ann = _FIELDS[name].type
    return ann if isinstance(ann, str) else str(ann)


def _coerce(name: str, value: Any, source: str) -> Any:
    meta = _FIELDS[name].metadata
    ann = _annotation(name)
    where = f"{source}: '{name}'"
    negate = isinstance(value, _NegatedString)
    optional = "None" in ann
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise ConfigError(f"{where} must be set (got an empty value)")
    if ann.startswith("bool"):
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            out = value.strip().lower() in _TRUE
        else:
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return (not out) if negate else out
    if ann.startswith("int"):
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
        return _check_range(name, value, where, meta)
    if ann.startswith("float"):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value.strip())  # YAML reads `1e-4` (no dot) as a string
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return _check_range(name, float(value), where, meta)
    # strings, and string-or-list keys
    if meta.get("kind") in ("paths", "names"):
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
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    value = value.strip()
    choices = meta.get("choices")
    if choices and value not in choices:
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}{hint}")
    return value


def _bound(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _check_range(name: str, value: float, where: str, meta: Mapping[str, Any]) -> Any:
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if lo is not None:
        if meta.get("exclusive_min") and not value > lo:
            raise ConfigError(f"{where} must be > {_bound(lo)}, got {value!r}")
        if not meta.get("exclusive_min") and value < lo:
            raise ConfigError(f"{where} must be >= {_bound(lo)}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where} must be <= {_bound(hi)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# building a config


def _canonical(key: Any, source: str) -> tuple[str, Callable[[Any], Any] | None]:
    if not isinstance(key, str):
        raise ConfigError(f"{source}: keys must be strings, got {key!r}")
    name = key.strip().replace("-", "_")
    if name in _FIELDS:
        return name, None
    if name in ALIASES:
        return ALIASES[name]
    if name.startswith("kt_") or name == "kt":
        return name, None
    raise ConfigError(f"{source}: unknown key '{key}'{_suggest(name)}")


def _build(values: Mapping[str, Any], source: str) -> TrainConfig:
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping of keys to values, got {type(values).__name__}"
        )
    seen: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    kt: dict[str, Any] = {}
    for raw_key, raw_value in values.items():
        name, transform = _canonical(raw_key, source)
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
        kwargs[name] = _coerce(name, value, source)
    cfg = TrainConfig(**kwargs)
    cfg.kt = _validate_kt(kt, source)
    _check_combinations(cfg, source)
    return cfg


def _validate_kt(options: dict[str, Any], source: str) -> dict[str, Any]:
    """Check the `kt_*` keys with KTConfig (which names an unknown key); keep them as given."""
    if not options:
        return {}
    options = {k: _scalar(v) for k, v in options.items()}
    try:
        from kt_sft.config import KTConfig
    except ImportError:
        return dict(options)
    try:
        KTConfig.from_dict(dict(options))
    except (TypeError, ValueError, KeyError) as exc:
        msg = str(exc).strip("'\"")
        unknown = [k for k in options if k not in kt_option_names()]
        hint = _suggest(unknown[0]) if unknown and kt_option_names() else ""
        raise ConfigError(f"{source}: invalid engine option: {msg}{hint}") from exc
    return dict(options)


def _scalar(value: Any) -> Any:
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


def _check_combinations(cfg: TrainConfig, source: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# YAML files and command-line overrides


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
    cfg = _build(merged, where)
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


def describe_keys() -> Iterable[tuple[str, dataclasses.Field]]:
    """Yield (group, field) for every documented key, in declaration order."""
    for f in dataclasses.fields(TrainConfig):
        if f.name != "kt":
            yield f.metadata["group"], f
