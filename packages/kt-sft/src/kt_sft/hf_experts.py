"""A transformers experts module and its :class:`~kt_sft.routed_experts.RoutedExperts`.

The helpers shared by :mod:`kt_sft.inject` (fused transformers-5 experts), :mod:`kt_sft.layer`
(``nn.ModuleList`` experts) and :mod:`kt_sft.peft_hooks`: the checks that an experts module
computes the engine's math, its activation and top-k, building the routed experts of one
module, releasing torch weights into placeholders, and finding the routed experts of a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from kt_sft.config import KTConfig
from kt_sft.gpu_experts import GPUExperts
from kt_sft.lora_experts import LoRAExperts
from kt_sft.reference import ACTIVATIONS
from kt_sft.routed_experts import RoutedExperts

__all__ = [
    "IMPLEMENTATION",
    "KTAlreadyWrappedError",
    "KTUnsupportedExpertsError",
    "activation_of",
    "build_hf_layer",
    "check_hf_flags",
    "config_of",
    "experts_layers",
    "is_wrapped",
    "model_device",
    "release_parameter",
    "routed_experts_of",
    "top_k_of",
]

#: Name of kt's implementation in transformers' experts-implementation registry.
IMPLEMENTATION = "kt"


class KTAlreadyWrappedError(RuntimeError):
    """``wrap_model`` was called on a model whose experts already run in kt engines."""


class KTUnsupportedExpertsError(ValueError):
    """An experts module uses a layout or activation the engine does not implement."""


def routed_experts_of(experts: nn.Module, *, create: bool = False) -> RoutedExperts | None:
    """The :class:`RoutedExperts` of an experts module (``None`` if it has none).

    With ``create=True`` an experts module of a model loaded with
    ``from_pretrained(..., experts_implementation="kt")`` (and never wrapped) gets its engine
    now, configured from the ``KT_*`` environment, and releases its torch weights (the caller
    has run :func:`kt_sft.install.ensure_installed`).
    """
    layer = experts.__dict__.get("_kt_engine")
    if layer is None and create:
        cfg = KTConfig()
        top_k = top_k_of(experts)
        layer = build_hf_layer(
            experts,
            cfg,
            top_k=top_k,
            name=type(experts).__name__,
            layer_idx=None,
            activation=activation_of(experts, None),
        )
    return layer


def check_hf_flags(experts: nn.Module, where: str) -> Any:
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


def activation_of(experts: nn.Module, spec_activation: str | None) -> str:
    """The engine's name of ``experts``' gate activation (``spec_activation`` when the module
    does not say)."""
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


def top_k_of(experts: nn.Module) -> int:
    """Experts per token, read from the experts module's config."""
    from kt_models.config_fields import TOP_K_FIELDS, read_field

    config = getattr(experts, "config", None)
    if config is None:
        raise RuntimeError(
            f"{type(experts).__name__} has no config; wrap the model with kt_sft.wrap_model instead"
        )
    return read_field(config, TOP_K_FIELDS, what="number of experts per token (top-k)")


def model_device(model: nn.Module, fallback: nn.Module | None = None) -> torch.device:
    """The device of the first parameter still in torch (the CPU if none)."""
    for module in (fallback, model):
        if module is None:
            continue
        for p in module.parameters():
            if p.device.type != "meta" and not getattr(p, "kt_released", False):
                return p.device
    return torch.device("cpu")


def release_parameter(module: nn.Module, name: str, device: torch.device) -> None:
    """Replace ``module.<name>`` by an empty placeholder on ``device`` that keeps the shape
    (``ds_shape``) for PEFT: the weights now live in the engine."""
    old = getattr(module, name)
    placeholder = nn.Parameter(torch.empty(0, dtype=old.dtype, device=device), requires_grad=False)
    placeholder.ds_shape = torch.Size(old.shape)  # read by PEFT for the LoRA shapes
    placeholder.ds_numel = old.numel()  # read by PEFT's parameter counts
    placeholder.kt_released = True
    module._parameters[name] = placeholder


def build_hf_layer(
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
) -> RoutedExperts:
    """Pack a transformers experts module into a new :class:`RoutedExperts` (attached to it as
    ``_kt_engine``) and release its weights. ``bias_tensors``: ``gate_up_proj_bias``,
    ``down_proj_bias`` read from a checkpoint (else the module's, when it has biases)."""
    gating = check_hf_flags(experts, name)
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
    biases = hf_biases(experts, gating.interleaved, bias_tensors) if has_bias else None
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
    layer = RoutedExperts(
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
    release_parameter(experts, "gate_up_proj", device)
    release_parameter(experts, "down_proj", device)
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


def hf_biases(
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


def config_of(model: nn.Module) -> Any:
    """The text config of ``model`` (under any wrapper)."""
    from kt_models import text_config, unwrap_model

    return text_config(unwrap_model(model).config)


def is_wrapped(model: nn.Module) -> bool:
    """Whether any experts module of ``model`` runs in a kt engine."""
    return any(True for _ in experts_layers(model))


def experts_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, RoutedExperts]]:
    """``(module name, experts module, RoutedExperts)`` for every kt-run experts module."""
    for name, module in model.named_modules():
        layer = module.__dict__.get("_kt_engine")
        if isinstance(layer, RoutedExperts):
            yield name, module, layer
