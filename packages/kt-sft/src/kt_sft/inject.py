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

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from kt_sft.config import KTConfig
from kt_sft.engine import LayerEngine
from kt_sft.reference import ACTIVATIONS

__all__ = [
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

#: Name of kt's implementation in transformers' experts-implementation registry.
IMPLEMENTATION = "kt"


class KTAlreadyWrappedError(RuntimeError):
    """``wrap_model`` was called on a model whose experts already run in kt engines."""


class KTUnsupportedExpertsError(ValueError):
    """An experts module uses a layout or activation the engine does not implement."""


# ---------------------------------------------------------------------------------------------
# registry hook


def kt_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``"kt"`` experts implementation: called by HF in place of the experts' forward."""
    from kt_sft.function import kt_moe

    layer = get_layer_engine(self, create=True)
    assert layer is not None
    if top_k_index.shape[-1] != layer.top_k:
        raise KTUnsupportedExpertsError(
            f"{layer.name or type(self).__name__}: the experts are called with top-k "
            f"{top_k_index.shape[-1]} (top_k_index {tuple(top_k_index.shape)}), but the engine "
            f"was built for top-k {layer.top_k} from the config; a model whose router picks a "
            "varying number of experts per call is not supported"
        )
    out = kt_moe(layer, hidden_states, top_k_index, top_k_weights, layer.call_source)
    lora_experts = getattr(self, "kt_lora_experts", None)
    if lora_experts is not None:
        out = out + lora_experts(hidden_states).to(out.dtype)
    return out


def register() -> None:
    """Register ``"kt"`` in transformers' experts-implementation registry (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    if ExpertsInterface._global_mapping.get(IMPLEMENTATION) is not kt_experts_forward:
        ExpertsInterface.register(IMPLEMENTATION, kt_experts_forward)


def get_layer_engine(experts: nn.Module, *, create: bool = False) -> LayerEngine | None:
    """The :class:`LayerEngine` of an experts module (``None`` if it has none).

    With ``create=True`` an experts module of a model loaded with
    ``from_pretrained(..., experts_implementation="kt")`` (and never wrapped) gets its engine
    now, configured from the ``KT_*`` environment, and releases its torch weights.
    """
    layer = experts.__dict__.get("_kt_engine")
    if layer is None and create:
        from kt_sft.peft import install_peft_hooks

        install_peft_hooks()
        cfg = KTConfig()
        top_k = _top_k_of(experts)
        layer = _build_hf_layer(
            experts,
            cfg,
            top_k=top_k,
            name=type(experts).__name__,
            layer_idx=None,
            activation=_activation_of(experts, None),
        )
    return layer


# ---------------------------------------------------------------------------------------------
# dispatchers


def _check_hf_flags(experts: nn.Module, where: str) -> Any:
    """The :class:`kt_models.gating.Gating` the engine runs for ``experts``; raises
    :class:`KTUnsupportedExpertsError` naming every feature of its layout the engine does not
    compute (kt_models.discover.unsupported_features)."""
    from kt_models.discover import experts_layout, unsupported_features
    from kt_models.gating import Gating

    layout = experts_layout(experts)
    problems = unsupported_features(layout)
    if problems:
        raise KTUnsupportedExpertsError(
            f"{where}: the kt engine computes f(min(g, limit)) * (clamp(u, +-limit) + c) of "
            f"[gate; up] (concatenated or interleaved, biases allowed), but here "
            f"{'; '.join(problems)}"
        )
    return layout.gating or Gating()


def _activation_of(experts: nn.Module, spec_activation: str | None) -> str:
    act = getattr(experts, "act_fn", None)
    name = None
    if act is not None:
        cls = type(act).__name__.lower()
        if "silu" in cls or "swish" in cls:
            name = "silu"
        elif "gelutanh" in cls or "pytorchgelutanh" in cls:
            name = "gelu_pytorch_tanh"
        elif cls in ("geluactivation", "gelu"):
            name = "gelu"
        elif "relu" == cls:
            name = "relu"
    if name is None:
        name = spec_activation or "silu"
    if name not in ACTIVATIONS:
        raise KTUnsupportedExpertsError(
            f"{type(experts).__name__}: activation {name!r} is not implemented by the engine "
            f"(supported: {', '.join(sorted(ACTIVATIONS))})"
        )
    return name


def _top_k_of(experts: nn.Module) -> int:
    from kt_models.config_fields import TOP_K_FIELDS, read_field

    config = getattr(experts, "config", None)
    if config is None:
        raise RuntimeError(
            f"{type(experts).__name__} has no config; wrap the model with kt_sft.wrap_model instead"
        )
    return read_field(config, TOP_K_FIELDS, what="number of experts per token (top-k)")


def _model_device(model: nn.Module, fallback: nn.Module | None = None) -> torch.device:
    for module in (fallback, model):
        if module is None:
            continue
        for p in module.parameters():
            if p.device.type != "meta" and not getattr(p, "kt_released", False):
                return p.device
    return torch.device("cpu")


def _release(module: nn.Module, name: str, device: torch.device) -> None:
    old = getattr(module, name)
    placeholder = nn.Parameter(torch.empty(0, dtype=old.dtype, device=device), requires_grad=False)
    placeholder.ds_shape = torch.Size(old.shape)  # read by PEFT for the LoRA shapes
    placeholder.ds_numel = old.numel()  # read by PEFT's parameter counts
    placeholder.kt_released = True
    module._parameters[name] = placeholder


def _build_hf_layer(
    experts: nn.Module,
    cfg: KTConfig,
    *,
    top_k: int,
    name: str,
    layer_idx: int | None,
    activation: str,
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: torch.device | None = None,
    bias_tensors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LayerEngine:
    from kt_sft.gpu_experts import GPUExperts
    from kt_sft.lora_experts import LoRAExperts

    gating = _check_hf_flags(experts, name)
    has_bias = bool(getattr(experts, "has_bias", False))
    if (not gating.is_default or has_bias) and (cfg.num_gpu_experts or cfg.lora_experts):
        raise KTUnsupportedExpertsError(
            f"{name}: experts with gating {gating.describe()!r}"
            f"{', interleaved gate/up' if gating.interleaved else ''}"
            f"{', biases' if has_bias else ''} run on the CPU engine only; "
            "KTConfig.num_gpu_experts and lora_experts must be 0"
        )
    gate_up_p, down_p = experts.gate_up_proj, experts.down_proj
    gu_shape = tuple(getattr(gate_up_p, "ds_shape", gate_up_p.shape))
    d_shape = tuple(getattr(down_p, "ds_shape", down_p.shape))
    # Transposed storage (E x H x 2I, E x I x H) is repacked to the engine's layout at load;
    # the hot loops do not change. A checkpoint reader already yields the engine's layout.
    transposed = bool(getattr(experts, "is_transposed", False))
    if transposed:
        num_experts, inter, hidden = d_shape
        gu_shape = (gu_shape[0], gu_shape[2], gu_shape[1])
    else:
        num_experts, hidden, inter = d_shape
    if weights is None:
        if gate_up_p.device.type == "meta" or getattr(gate_up_p, "kt_released", False):
            raise RuntimeError(
                f"{name}: the expert weights are not in memory (meta); load the model with "
                "kt_sft.load_model(path, cfg) or pass KTConfig(checkpoint=path) to wrap_model"
            )
        weights = (gate_up_p.detach(), down_p.detach())
        if transposed:
            weights = (weights[0].transpose(1, 2), weights[1].transpose(1, 2))
    gate_up, down = weights
    if gating.interleaved:
        # [g0, u0, g1, u1, ...] rows -> [gate; up], once at load (the engine's loops unchanged).
        e_, rows, h_ = gate_up.shape
        gate_up = gate_up.reshape(e_, rows // 2, 2, h_).transpose(1, 2).reshape(e_, rows, h_)
    biases = _hf_biases(experts, gating.interleaved, bias_tensors) if has_bias else None
    dtype = gate_up_p.dtype
    if device is None:
        device = gate_up_p.device if gate_up_p.device.type != "meta" else torch.device("cpu")
    lora_layout = "fused" if cfg.lora_layout == "auto" else cfg.lora_layout
    if gating.interleaved:
        if cfg.lora_layout == "fused":
            raise KTUnsupportedExpertsError(
                f"{name}: gate and up are interleaved (is_concatenated=False), so the fused "
                "LoRA's B rows alternate gate and up; use KTConfig(lora_layout='split') or "
                "'auto'"
            )
        lora_layout = "split"
    options = (
        {}
        if gating.is_default
        else {k: v for k, v in gating.engine_kwargs().items() if k != "activation"}
    )
    layer = LayerEngine(
        cfg,
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden,
        intermediate_size=inter,
        activation=activation,
        lora_layout=lora_layout,
        name=name,
        layer_idx=layer_idx,
        activation_options=options,
    )
    if tuple(gate_up.shape) != gu_shape:
        raise ValueError(
            f"{name}: gate_up weights have shape {tuple(gate_up.shape)}, the "
            f"experts module expects {gu_shape}"
        )
    layer.load_weights(gate_up, down, biases)
    if cfg.num_gpu_experts:
        n = cfg.num_gpu_experts
        experts.kt_gpu_experts = GPUExperts(
            gate_up[:n].to(device, dtype), down[:n].to(device, dtype), activation
        )
        layer.gpu_experts = experts.kt_gpu_experts
    del gate_up, down, weights
    _release(experts, "gate_up_proj", device)
    _release(experts, "down_proj", device)
    if cfg.lora_experts:
        experts.kt_lora_experts = LoRAExperts(
            cfg.lora_experts,
            hidden,
            cfg.lora_expert_intermediate_size,
            activation=activation,
            dtype=dtype,
            device=device,
        )
    experts.__dict__["_kt_engine"] = layer
    return layer


def _hf_biases(
    experts: nn.Module,
    interleaved: bool,
    tensors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The frozen expert biases as the engine takes them: gate, up (E x I), down (E x H), from
    ``tensors`` (``gate_up_proj_bias``, ``down_proj_bias`` read from a checkpoint) or the
    module."""
    if tensors is not None:
        gu, down = tensors
    else:
        gu = experts.gate_up_proj_bias.detach()
        down = experts.down_proj_bias.detach()
    if gu.device.type == "meta" or down.device.type == "meta":
        raise RuntimeError(
            f"{type(experts).__name__}: the expert biases are not in memory (meta); load the "
            "model's weights before wrapping it"
        )
    if interleaved:
        gate, up = gu[:, 0::2], gu[:, 1::2]
    else:
        gate, up = gu.chunk(2, dim=-1)
    return {"gate": gate, "up": up, "down": down}


Dispatcher = Callable[..., "LayerEngine | None"]


def dispatch_hf_experts(
    model: nn.Module,
    spec: Any,
    layer_idx: int,
    cfg: KTConfig,
    *,
    reader: Any = None,
    device: torch.device,
) -> LayerEngine | None:
    """transformers 5 fused experts: engine behind the ``"kt"`` experts implementation."""
    if spec.expert_storage != "fused":
        return None
    from kt_models.extract import base_layer

    experts = base_layer(spec.experts(model, layer_idx))
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "has_gate"):
        return None
    config = _config_of(model)
    name = f"{spec.model_type} layer {layer_idx} experts ({type(experts).__name__})"
    _check_hf_flags(experts, name)
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
    return _build_hf_layer(
        experts,
        cfg,
        top_k=spec.top_k(config),
        name=name,
        layer_idx=layer_idx,
        activation=_activation_of(experts, spec.activation(config)),
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
) -> LayerEngine | None:
    """``nn.ModuleList`` experts: the MoE block becomes a :class:`~kt_sft.layer.KTMoELayer`."""
    if spec.expert_storage != "modulelist":
        return None
    from kt_sft.layer import replace_moe_block

    return replace_moe_block(model, spec, layer_idx, cfg, reader=reader, device=device)


DISPATCHERS: list[Dispatcher] = [dispatch_hf_experts, dispatch_modulelist]


# ---------------------------------------------------------------------------------------------
# wrap_model


def _config_of(model: nn.Module) -> Any:
    from kt_models import text_config, unwrap_model

    return text_config(unwrap_model(model).config)


def is_wrapped(model: nn.Module) -> bool:
    """Whether any experts module of ``model`` runs in a kt engine."""
    return any(True for _ in experts_layers(model))


def experts_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, LayerEngine]]:
    """``(module name, experts module, LayerEngine)`` for every kt-run experts module."""
    for name, module in model.named_modules():
        layer = module.__dict__.get("_kt_engine")
        if isinstance(layer, LayerEngine):
            yield name, module, layer


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
    from kt_sft.peft import install_peft_hooks

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
    register()
    install_peft_hooks()
    config = _config_of(base)
    if reader is None and cfg.checkpoint is not None:
        from kt_models import CheckpointReader

        reader = CheckpointReader(cfg.checkpoint)
    device = _model_device(base)
    layers = spec.moe_layer_indices(config)
    built: list[LayerEngine] = []
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
