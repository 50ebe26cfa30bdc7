"""Putting the engine into a Hugging Face model: :func:`wrap_model`.

For each MoE layer a list of dispatchers is tried, first match wins:

1. :func:`dispatch_hf_experts` — the transformers 5 experts module (``@use_experts_implementation``,
   fused ``gate_up_proj``/``down_proj``): kt registers the ``"kt"`` experts implementation and
   the model's config selects it, so HF's own MoE block keeps its router (softmax top-k,
   DeepSeek-V3 sigmoid + bias + group-limited top-k, ``norm_topk_prob``,
   ``routed_scaling_factor`` ...) and shared experts; only the routed-experts call reaches the
   engine.
2. :func:`dispatch_modulelist` — an ``nn.ModuleList`` of per-expert MLPs (remote-code models):
   the MoE block is replaced by :class:`kt_sft.layer.KTMoELayer`.

The expert weights go into the layer's engine and the module's expert parameters are replaced by
empty placeholders on the model's device (zero elements; the full shape is kept in ``ds_shape``,
which PEFT reads) so the weights exist once, in the engine, and PEFT still places LoRA tensors on
the model's device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kt_sft.config import KTConfig
from kt_sft.hf_experts import (
    IMPLEMENTATION,
    KTAlreadyWrappedError,
    KTUnsupportedExpertsError,
    activation_of,
    build_hf_layer,
    check_hf_flags,
    config_of,
    experts_layers,
    is_wrapped,
    model_device,
    routed_experts_of,
)
from kt_sft.install import ensure_installed, kt_experts_forward, register
from kt_sft.layer import replace_moe_block
from kt_sft.routed_experts import RoutedExperts

__all__ = [
    "IMPLEMENTATION",
    "KTAlreadyWrappedError",
    "KTUnsupportedExpertsError",
    "dispatch_hf_experts",
    "dispatch_modulelist",
    "experts_layers",
    "get_layer_engine",
    "is_wrapped",
    "kt_experts_forward",
    "register",
    "wrap_model",
]

#: The former name of :func:`kt_sft.hf_experts.routed_experts_of`.
get_layer_engine = routed_experts_of


# ---------------------------------------------------------------------------------------------
# dispatchers


Dispatcher = Callable[..., "RoutedExperts | None"]


def dispatch_hf_experts(
    model: nn.Module,
    spec: Any,
    layer_idx: int,
    cfg: KTConfig,
    *,
    reader: Any = None,
    device: torch.device,
) -> RoutedExperts | None:
    """transformers 5 fused experts: engine behind the ``"kt"`` experts implementation."""
    if spec.expert_storage != "fused":
        return None
    from kt_models.extract import base_layer

    experts = base_layer(spec.experts(model, layer_idx))
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "has_gate"):
        return None
    config = config_of(model)
    name = f"{spec.model_type} layer {layer_idx} experts ({type(experts).__name__})"
    check_hf_flags(experts, name)
    weights = None
    bias_tensors = None
    if reader is not None:
        w = reader.layer_experts(layer_idx, dtype=None)
        weights = w.fused()
        if getattr(experts, "has_bias", False):
            # The biases sit beside the fused experts on disk, under the in-memory names.
            prefix = spec.checkpoint_experts_prefix(layer_idx)
            bias_tensors = (
                reader.get_tensor(f"{prefix}.gate_up_proj_bias", dtype=torch.float32),
                reader.get_tensor(f"{prefix}.down_proj_bias", dtype=torch.float32),
            )
    return build_hf_layer(
        experts,
        cfg,
        top_k=spec.top_k(config),
        name=name,
        layer_idx=layer_idx,
        activation=activation_of(experts, spec.activation(config)),
        weights=weights,
        device=device,
        bias_tensors=bias_tensors,
    )


def dispatch_modulelist(
    model: nn.Module,
    spec: Any,
    layer_idx: int,
    cfg: KTConfig,
    *,
    reader: Any = None,
    device: torch.device,
) -> RoutedExperts | None:
    """``nn.ModuleList`` experts: the MoE block becomes a :class:`~kt_sft.layer.KTMoELayer`."""
    if spec.expert_storage != "modulelist":
        return None
    return replace_moe_block(model, spec, layer_idx, cfg, reader=reader, device=device)


DISPATCHERS: list[Dispatcher] = [dispatch_hf_experts, dispatch_modulelist]


# ---------------------------------------------------------------------------------------------
# wrap_model


def _select_kt(model: nn.Module) -> None:
    """Make every experts module's config select the ``"kt"`` implementation."""
    from kt_models import unwrap_model

    base = unwrap_model(model)
    setter = getattr(base, "set_experts_implementation", None)
    if callable(setter):
        try:
            setter(IMPLEMENTATION)
        except (ValueError, KeyError, RuntimeError):
            pass
    for _, module, _ in experts_layers(base):
        config = getattr(module, "config", None)
        if (
            config is not None
            and getattr(config, "_experts_implementation", None) != IMPLEMENTATION
        ):
            config._experts_implementation_internal = IMPLEMENTATION


def wrap_model(model: nn.Module, cfg: KTConfig | None = None, *, reader: Any = None) -> nn.Module:
    """Run ``model``'s routed experts in kt engines (in place; returns ``model``).

    Every MoE layer's expert weights are packed into a per-layer engine and released from torch;
    HF's routers, shared experts and everything else stay. ``cfg`` defaults to ``KTConfig()``
    (``KT_*`` environment). A model whose experts are on ``meta`` (loaded without them) reads
    them from ``cfg.checkpoint`` (or ``reader``, a ``kt_models.CheckpointReader``).

    Raises:
        kt_models.UnsupportedArchitectureError: the model type is not registered (the message
            lists the supported ones) or is refused (gpt_oss).
        KTUnsupportedExpertsError: the experts' layout or activation is not the engine's.
        KTAlreadyWrappedError: the model is wrapped already.
    """
    from kt_models import get_arch_spec, unwrap_model

    cfg = cfg if cfg is not None else KTConfig()
    if not isinstance(cfg, KTConfig):
        raise TypeError(f"wrap_model expects a KTConfig, got {type(cfg).__name__}")
    base = unwrap_model(model)
    if is_wrapped(base):
        raise KTAlreadyWrappedError(
            f"{type(base).__name__} is wrapped already (its experts run in kt engines); "
            "wrap_model must be called once per model"
        )
    spec = get_arch_spec(base)
    ensure_installed()
    config = config_of(base)
    if reader is None and cfg.checkpoint is not None:
        from kt_models import CheckpointReader

        reader = CheckpointReader(cfg.checkpoint)
    device = model_device(base)
    layers = spec.moe_layer_indices(config)
    built: list[RoutedExperts] = []
    try:
        for layer_idx in layers:
            for dispatch in DISPATCHERS:
                layer = dispatch(base, spec, layer_idx, cfg, reader=reader, device=device)
                if layer is not None:
                    built.append(layer)
                    break
            else:
                raise KTUnsupportedExpertsError(
                    f"{spec.model_type} layer {layer_idx}: no kt dispatcher handles experts "
                    f"stored as {spec.expert_storage!r}"
                )
    except BaseException:
        for layer in built:
            layer.close()
        raise
    _select_kt(base)
    base.__dict__["_kt_config"] = cfg
    return model
