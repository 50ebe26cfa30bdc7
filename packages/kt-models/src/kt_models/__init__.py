"""kt-models: where the routed experts of each MoE architecture live, and how to get their weights
into the engine without holding a giant model in memory twice.

* :func:`get_arch_spec` / :func:`register_arch`: the architecture registry (:class:`ArchSpec`).
* :func:`extract_expert_weights`: expert weights out of an instantiated model, released to
  ``meta``.
* :class:`CheckpointReader`: expert weights streamed from safetensors one layer at a time
  (memory-mapped; FP8 block-scaled weights dequantized on the fly).
* :func:`from_pretrained_kwargs`, :func:`experts_on_meta`, :func:`load_model`: load everything
  but the routed experts with transformers.
* :mod:`kt_models.tiny`: tiny seeded reference models of every registered architecture.
"""

from __future__ import annotations

from kt_models._version import __version__
from kt_models.architectures import BUILTIN_ARCHS, register_builtin_archs
from kt_models.checkpoint import CheckpointReader, dequantize_fp8_blockwise
from kt_models.config_fields import get_field, read_field, text_config
from kt_models.errors import (
    CheckpointError,
    ConfigFieldError,
    CorruptCheckpointError,
    ExpertsReleasedError,
    KtModelsError,
    MissingScaleError,
    MissingShardError,
    MissingTensorError,
    ModulePathError,
    TensorShapeError,
    UnsupportedArchitectureError,
    UnsupportedTensorDtypeError,
)
from kt_models.extract import experts_released, extract_expert_weights, release_experts
from kt_models.loading import experts_on_meta, from_pretrained_kwargs, load_model
from kt_models.navigate import resolve_path, unwrap_model
from kt_models.registry import (
    ArchSpec,
    after_first_k_dense,
    every_layer,
    get_arch_spec,
    refused_model_types,
    register_arch,
    sparse_step,
    supported_model_types,
    unregister_arch,
)
from kt_models.weights import ExpertWeights

register_builtin_archs()

__all__ = [
    "BUILTIN_ARCHS",
    "ArchSpec",
    "CheckpointError",
    "CheckpointReader",
    "ConfigFieldError",
    "CorruptCheckpointError",
    "ExpertWeights",
    "ExpertsReleasedError",
    "KtModelsError",
    "MissingScaleError",
    "MissingShardError",
    "MissingTensorError",
    "ModulePathError",
    "TensorShapeError",
    "UnsupportedArchitectureError",
    "UnsupportedTensorDtypeError",
    "__version__",
    "after_first_k_dense",
    "dequantize_fp8_blockwise",
    "every_layer",
    "experts_on_meta",
    "experts_released",
    "extract_expert_weights",
    "from_pretrained_kwargs",
    "get_arch_spec",
    "get_field",
    "load_model",
    "read_field",
    "refused_model_types",
    "register_arch",
    "release_experts",
    "resolve_path",
    "sparse_step",
    "supported_model_types",
    "text_config",
    "unregister_arch",
    "unwrap_model",
]
