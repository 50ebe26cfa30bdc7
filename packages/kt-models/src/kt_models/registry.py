"""The MoE architecture registry: one :class:`ArchSpec` per transformers ``model_type``.

An entry says where an architecture keeps its decoder layers, which layers are MoE, where the
sparse block, router, routed experts and shared experts sit, how the experts are stored, which
config fields hold E, K, H and I, and how the routed experts are named on disk. kt-sft reads
nothing about an architecture from anywhere else, so adding an architecture is adding one entry
(:func:`register_arch`) plus its tiny test model.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from torch import nn

from kt_models.arch_spec import (
    PROJECTIONS,
    ArchSpec,
    DiscoveredExperts,
    MoELayerRule,
    after_first_k_dense,
    every_layer,
    sparse_step,
)
from kt_models.auto_class import auto_model_class
from kt_models.config_fields import config_model_type, text_config
from kt_models.discover import (
    discover_arch_spec,
    experts_interface_model_types,
    find_experts_modules,
)
from kt_models.errors import UnsupportedArchitectureError
from kt_models.navigate import unwrap_model

__all__ = [
    "PROJECTIONS",
    "ArchSpec",
    "DiscoveredExperts",
    "MoELayerRule",
    "after_first_k_dense",
    "every_layer",
    "get_arch_spec",
    "refused_model_types",
    "register_arch",
    "sparse_step",
    "supported_model_types",
    "unregister_arch",
]


def _text_model_type(config: Any) -> str | None:
    return config_model_type(text_config(config))


# ---- the registry ------------------------------------------------------------------------------

_LOCK = threading.Lock()
_REGISTRY: dict[str, ArchSpec] = {}
# Types refused by name (what discovery cannot tell from the module); none at present.
_REFUSED: dict[str, str] = {}


def _validate(spec: ArchSpec) -> None:
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"register_arch expects an ArchSpec, got {type(spec).__name__}")
    if not spec.model_type or not isinstance(spec.model_type, str):
        raise ValueError("ArchSpec.model_type must be a non-empty string")
    if spec.expert_storage not in ("fused", "modulelist"):
        raise ValueError(
            f"{spec.model_type}: expert_storage must be 'fused' or 'modulelist', "
            f"got {spec.expert_storage!r}"
        )
    for name in ("proj_names", "checkpoint_proj_names"):
        value = getattr(spec, name)
        if value is not None and (
            len(value) != 3 or not all(isinstance(v, str) and v for v in value)
        ):
            raise ValueError(
                f"{spec.model_type}: {name} must be three names (gate, up, down), got {value!r}"
            )
    for name in (
        "layers_path",
        "moe_block_attr",
        "experts_attr",
        "router_attr",
        "checkpoint_layers_prefix",
    ):
        if not getattr(spec, name):
            raise ValueError(f"{spec.model_type}: {name} must be non-empty")
    for name in (
        "num_experts_fields",
        "top_k_fields",
        "hidden_size_fields",
        "intermediate_size_fields",
        "num_layers_fields",
    ):
        if not getattr(spec, name):
            raise ValueError(f"{spec.model_type}: {name} must list at least one config field")
    if not callable(spec.moe_layers):
        raise ValueError(f"{spec.model_type}: moe_layers must be callable")
    if spec.router_kind not in ("softmax_topk", "topk_softmax", "sigmoid_group_topk"):
        raise ValueError(f"{spec.model_type}: unknown router_kind {spec.router_kind!r}")


def register_arch(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Add ``spec`` to the registry (validated first: an invalid spec registers nothing).

    Raises:
        ValueError: the spec is invalid, or ``spec.model_type`` is already registered and
            ``overwrite`` is false.
    """
    _validate(spec)
    with _LOCK:
        if spec.model_type in _REGISTRY and not overwrite:
            raise ValueError(
                f"model_type {spec.model_type!r} is already registered; pass "
                "overwrite=True to replace it"
            )
        _REGISTRY[spec.model_type] = spec
        _REFUSED.pop(spec.model_type, None)
    return spec


def unregister_arch(model_type: str) -> ArchSpec:
    """Remove and return the entry for ``model_type`` (``KeyError`` when there is none)."""
    with _LOCK:
        return _REGISTRY.pop(model_type)


def supported_model_types() -> list[str]:
    """Registered model types, sorted."""
    with _LOCK:
        return sorted(_REGISTRY)


def refused_model_types() -> dict[str, str]:
    """Known model types kt refuses, with the reason for each."""
    with _LOCK:
        return dict(_REFUSED)


def _model_types_of(obj: Any) -> tuple[str, list[str]]:
    """(label for messages, candidate model types: top-level first, then the text config's)."""
    if isinstance(obj, str):
        return obj, [obj]
    if isinstance(obj, nn.Module):
        base = unwrap_model(obj)
        config = getattr(base, "config", None)
        if config is None:
            raise UnsupportedArchitectureError(
                f"{type(obj).__name__} has no .config; pass the model's config or model_type"
            )
        obj = config
    if not isinstance(obj, Mapping) and not hasattr(obj, "model_type"):
        raise TypeError(
            "get_arch_spec expects a model, a config, a config dict or a model_type "
            f"string, got {type(obj).__name__}"
        )
    candidates = []
    top = config_model_type(obj)
    if top:
        candidates.append(top)
    nested = _text_model_type(obj)
    if nested and nested not in candidates:
        candidates.append(nested)
    label = top or nested or "<none>"
    return label, candidates


_DISCOVERED_ATTR = "_kt_discovered_arch_spec"


def _discover(config_or_model: Any, candidates: list[str]) -> ArchSpec | None:
    """The spec discovered from the model's experts-interface modules (``None`` when the model
    type does not use the interface). A config, config dict or model type string is built on the
    ``meta`` device (no memory) to read its module tree."""
    if isinstance(config_or_model, nn.Module):
        base = unwrap_model(config_or_model)
        cached = base.__dict__.get(_DISCOVERED_ATTR)
        if cached is not None:
            return cached
        if not find_experts_modules(base):
            return None
        spec = discover_arch_spec(base)
        base.__dict__[_DISCOVERED_ATTR] = spec
        return spec
    interface = set(experts_interface_model_types(causal_lm_only=False))
    if not any(t in interface for t in candidates):
        return None
    import torch
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_model, str):
        config = AutoConfig.for_model(config_or_model)
    elif isinstance(config_or_model, PretrainedConfig):
        config = config_or_model
    else:
        raw = dict(config_or_model) if isinstance(config_or_model, Mapping) else None
        if raw is None:
            return None
        model_type = raw.pop("model_type")
        config = AutoConfig.for_model(model_type, **raw)
    with torch.device("meta"):
        model = auto_model_class(config).from_config(config)
    return discover_arch_spec(model)


def get_arch_spec(config_or_model: Any) -> ArchSpec:
    """The registry entry for a model, config, config dict or ``model_type`` string.

    The top-level ``model_type`` is looked up first, then that of the ``text_config`` (so a
    registered language model is found inside a vision-language config). A model type that is
    not registered but whose experts use transformers' experts interface is discovered from the
    module tree (:func:`kt_models.discover.discover_arch_spec`; a config is built on ``meta``).

    Raises:
        UnsupportedArchitectureError: no entry matches; the message lists the supported types and
            says how to register one, or gives the reason a known type is refused.
    """
    label, candidates = _model_types_of(config_or_model)
    registered = False
    with _LOCK:
        registered = any(t in _REGISTRY or t in _REFUSED for t in candidates)
    if not registered:
        spec = _discover(config_or_model, candidates)
        if spec is not None:
            return spec
    with _LOCK:
        for model_type in candidates:
            if model_type in _REGISTRY:
                return _REGISTRY[model_type]
        for model_type in candidates:
            if model_type in _REFUSED:
                reason = _REFUSED[model_type]
                raise UnsupportedArchitectureError(
                    f"model_type {model_type!r} is not supported by kt: {reason}",
                    model_type=model_type,
                    reason=reason,
                )
        supported = ", ".join(sorted(_REGISTRY)) or "(none)"
    raise UnsupportedArchitectureError(
        f"model_type {label!r} is not supported by kt-models. Supported model types: {supported}. "
        "To add an architecture whose routed experts are SwiGLU, describe it with "
        "kt_models.ArchSpec(model_type=..., layers_path=..., moe_block_attr=..., ...) and call "
        "kt_models.register_arch(spec) (see docs/models.md, 'Registering a new architecture').",
        model_type=label,
    )
