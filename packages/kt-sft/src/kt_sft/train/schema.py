"""The `kt-sft train` configuration: every key, its type, default and check.

Keys follow the names users know from LLaMA-Factory and TRL (`model_name_or_path`, `cutoff_len`,
`per_device_train_batch_size`, `lora_rank`, ...); common alternative spellings are accepted as
aliases. Keys starting with `kt_` are engine options, validated by `kt_sft.KTConfig`. A value comes
from (highest first) a `--key value` command-line override, the YAML file, the built-in default.
Every problem raises `ConfigError` naming the key and where it came from; an unknown key gets the
closest known key suggested.

The pieces: the key table (:mod:`kt_sft.train.config_keys`), typing one value
(:mod:`~kt_sft.train.config_values`), aliases and suggestions (:mod:`~kt_sft.train.config_aliases`),
building a validated config from a mapping (:mod:`~kt_sft.train.config_build`), and YAML files with
command-line overrides (:mod:`~kt_sft.train.config_files`). This module gathers their public names.
"""

from __future__ import annotations

from kt_sft.train.config_aliases import ALIASES, kt_option_names
from kt_sft.train.config_files import embedded_defaults, load_train_config, parse_overrides
from kt_sft.train.config_keys import (
    EMBEDDED,
    GROUPS,
    MAX_ACCUMULATION_STEPS,
    TrainConfig,
    describe_keys,
    opt,
)
from kt_sft.train.config_values import ConfigError

__all__ = [
    "ALIASES",
    "EMBEDDED",
    "GROUPS",
    "MAX_ACCUMULATION_STEPS",
    "ConfigError",
    "TrainConfig",
    "describe_keys",
    "embedded_defaults",
    "kt_option_names",
    "load_train_config",
    "opt",
    "parse_overrides",
]
