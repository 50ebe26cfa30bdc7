"""kt-accelerate: kt with Hugging Face accelerate, the Trainer and torch.distributed.

* :class:`KTransformersPlugin` — kt's settings (engine config, engine placement, timeouts).
* :class:`KTAccelerator` — ``accelerate.Accelerator`` that prepares kt models.
* :class:`KTTrainer` / :class:`KTTrainerMixin` / ``KTSFTTrainer`` (TRL, loaded on first use).
* :func:`wrap_model` / :func:`load_model` — kt-sft's, after starting kt's distributed mode.
* :func:`prepare_model`, :func:`sync_expert_grads`, :func:`init_distributed` — the same steps
  for a plain ``torch.distributed`` loop.
* FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``) through :class:`KTAccelerator`: the
  non-expert parameters are sharded, kt keeps its own (:mod:`kt_accelerate.fsdp`).

See docs/distributed.md for launching on one or several nodes.
"""

from __future__ import annotations

import importlib
from typing import Any

from kt_accelerate._version import __version__
from kt_accelerate.accelerator import KTAccelerator
from kt_accelerate.integration import (
    KTPluginConflictError,
    init_distributed,
    load_model,
    prepare_model,
    sync_expert_grads,
    wrap_model,
)
from kt_accelerate.plugin import KTransformersPlugin
from kt_accelerate.resume_layout import KTResumeError
from kt_accelerate.trainer import KTCallback, KTTrainer, KTTrainerMixin
from kt_sft.distributed import KTDistributedError

__all__ = [
    "KTAccelerator",
    "KTCallback",
    "KTDistributedError",
    "KTPluginConflictError",
    "KTResumeError",
    "KTSFTTrainer",
    "KTTrainer",
    "KTTrainerMixin",
    "KTransformersPlugin",
    "__version__",
    "init_distributed",
    "load_model",
    "prepare_model",
    "sync_expert_grads",
    "wrap_model",
]

_LAZY = {"KTSFTTrainer": "kt_accelerate.trl"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kt_accelerate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
