"""Other spellings of the `kt-sft train` keys (from LLaMA-Factory, TRL and HF TrainingArguments),
the engine's `kt_*` option names, and the closest known key for a misspelt one."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kt_sft.train.config_values import negate

__all__ = ["ALIASES", "kt_option_names", "suggest"]

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
    "completion_only_loss": ("train_on_prompt", negate),
    "assistant_only_loss": ("train_on_prompt", negate),
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


def suggest(key: str, known: Iterable[str]) -> str:
    """A hint naming the known key closest to the misspelt `key` (or where every key is listed)."""
    names = sorted(known)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key.lower(), names, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else "; see docs/configuration.md for every key"
