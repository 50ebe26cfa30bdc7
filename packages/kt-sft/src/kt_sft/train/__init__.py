"""`kt-sft train`: configuration schema, the embedded demo, the training loop and its artifacts."""

from __future__ import annotations

from kt_sft.train.schema import (
    EMBEDDED,
    ConfigError,
    TrainConfig,
    embedded_defaults,
    load_train_config,
    parse_overrides,
)

__all__ = [
    "EMBEDDED",
    "ConfigError",
    "TrainConfig",
    "embedded_defaults",
    "load_train_config",
    "parse_overrides",
    "train",
]


def train(*args, **kwargs):
    """Run a training job; see kt_sft.train.loop.train."""
    from kt_sft.train.loop import train as _train

    return _train(*args, **kwargs)
