"""Take the routed experts' weights out of an instantiated model and release them.

After :func:`extract_expert_weights` with ``release=True`` the experts' parameters are ``meta``
tensors of the same shape and dtype, so the torch model no longer holds expert memory and the
engine's packed copy is the only one. Everything is checked before anything is released: a
failing call leaves the model as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kt_models.errors import ExpertsReleasedError, ModulePathError
from kt_models.navigate import unwrap_model
from kt_models.registry import ArchSpec, get_arch_spec
from kt_models.weights import ExpertWeights

__all__ = ["base_layer", "experts_released", "extract_expert_weights", "release_experts"]


def base_layer(module: nn.Module) -> nn.Module:
    """The module inside PEFT layer wrappers (``lora.Linear``, ``lora.ParamWrapper``...)."""
    seen: set[int] = set()
    while id(module) not in seen and isinstance(getattr(module, "base_layer", None), nn.Module):
        seen.add(id(module))
        module = module.base_layer
    return module


def _to_meta(module: nn.Module, name: str) -> None:
    old = getattr(module, name)
    setattr(
        module,
        name,
        nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False),
    )


def _expected(spec: ArchSpec, config: Any) -> tuple[int, int, int]:
    return spec.num_experts(config), spec.hidden_size(config), spec.intermediate_size(config)


def _check_fused_flags(spec: ArchSpec, experts: nn.Module, layer_idx: int) -> None:
    where = f"{spec.model_type} layer {layer_idx} experts ({type(experts).__name__})"
    if not getattr(experts, "is_concatenated", True):
        raise ValueError(
            f"{where}: gate and up are interleaved (is_concatenated=False); the "
            "engine needs [gate; up] concatenated"
        )
    if getattr(experts, "has_bias", False):
        raise ValueError(f"{where}: experts carry biases (has_bias=True); not supported")
    if not getattr(experts, "has_gate", True):
        raise ValueError(
            f"{where}: experts have no gate projection (has_gate=False); the "
            "engine computes gated (SwiGLU) experts"
        )


def _fused_params(
    spec: ArchSpec, experts: nn.Module, layer_idx: int, dims: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    _check_fused_flags(spec, experts, layer_idx)
    for name in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, name, None), torch.Tensor):
            raise ModulePathError(
                f"{spec.model_type} layer {layer_idx}: experts module "
                f"{type(experts).__name__} has no tensor {name!r}"
            )
    gate_up, down = experts.gate_up_proj, experts.down_proj
    transposed = bool(getattr(experts, "is_transposed", False))
    num_experts, hidden, inter = dims
    want_gu = (num_experts, hidden, 2 * inter) if transposed else (num_experts, 2 * inter, hidden)
    want_d = (num_experts, inter, hidden) if transposed else (num_experts, hidden, inter)
    if tuple(gate_up.shape) != want_gu or tuple(down.shape) != want_d:
        raise ValueError(
            f"{spec.model_type} layer {layer_idx}: expert tensors have shapes gate_up_proj "
            f"{tuple(gate_up.shape)}, down_proj {tuple(down.shape)}; the config implies "
            f"{want_gu} and {want_d}"
        )
    return gate_up, down, transposed


def _modulelist_linears(
    spec: ArchSpec, experts: nn.Module, layer_idx: int, dims: tuple[int, int, int]
) -> list[list[nn.Module]]:
    num_experts, hidden, inter = dims
    if not isinstance(experts, (nn.ModuleList, nn.Sequential)) or len(experts) != num_experts:
        raise ModulePathError(
            f"{spec.model_type} layer {layer_idx}: expected an nn.ModuleList of {num_experts} "
            f"experts, got {type(experts).__name__}"
            + (f" of length {len(experts)}" if hasattr(experts, "__len__") else "")
        )
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    rows = []
    for e, expert in enumerate(experts):
        row = []
        for name, shape in zip(spec.proj_names, shapes):
            proj = getattr(expert, name, None)
            lin = base_layer(proj) if isinstance(proj, nn.Module) else None
            weight = getattr(lin, "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise ModulePathError(
                    f"{spec.model_type} layer {layer_idx} expert {e}: no "
                    f"projection {name!r} with a weight"
                )
            if getattr(lin, "bias", None) is not None:
                raise ValueError(
                    f"{spec.model_type} layer {layer_idx} expert {e}: {name} has "
                    "a bias; not supported"
                )
            if tuple(weight.shape) != shape:
                raise ValueError(
                    f"{spec.model_type} layer {layer_idx} expert {e}: {name}.weight "
                    f"has shape {tuple(weight.shape)}, config implies {shape}"
                )
            assert isinstance(lin, nn.Module)
            row.append(lin)
        rows.append(row)
    return rows


def _resolve(
    model: nn.Module, layer_idx: int, spec: ArchSpec | None
) -> tuple[ArchSpec, nn.Module, tuple[int, int, int]]:
    spec = spec or get_arch_spec(model)
    config = unwrap_model(model).config
    return spec, base_layer(spec.experts(model, layer_idx)), _expected(spec, config)


def _params(spec: ArchSpec, experts: nn.Module) -> list[torch.Tensor]:
    if spec.expert_storage == "fused":
        return [
            t
            for t in (getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None))
            if isinstance(t, torch.Tensor)
        ]
    return [
        base_layer(getattr(expert, name)).weight
        for expert in experts
        for name in spec.proj_names
        if hasattr(expert, name)
    ]


def experts_released(model: nn.Module, layer_idx: int, *, spec: ArchSpec | None = None) -> bool:
    """Whether layer ``layer_idx``'s expert weights are on the ``meta`` device."""
    spec, experts, _ = _resolve(model, layer_idx, spec)
    params = _params(spec, experts)
    return bool(params) and all(p.device.type == "meta" for p in params)


def extract_expert_weights(
    model: nn.Module, layer_idx: int, *, release: bool = True, spec: ArchSpec | None = None
) -> ExpertWeights:
    """The routed-expert weights of decoder layer ``layer_idx`` of ``model``.

    Fused experts give ``gate_up`` (``E x 2I x H``) and ``down``; ModuleList experts give
    ``gate``, ``up`` (``E x I x H``) and ``down`` (``E x H x I``). The dtype is the model's.

    With ``release=True`` the module's expert parameters are replaced by ``meta`` parameters
    (same shape and dtype, ``requires_grad=False``) and the returned tensors own the memory they
    used (fused experts: the very same storage, no copy). With ``release=False`` the model is
    untouched and fused tensors share storage with its parameters.

    Raises:
        ExpertsReleasedError: the layer's experts were released already.
        ModulePathError, ValueError: the layer is dense, or the experts' layout or shapes do not
            match the registry entry and the config (nothing is released then).
    """
    spec, experts, dims = _resolve(model, layer_idx, spec)
    params = _params(spec, experts)
    if params and any(p.device.type == "meta" for p in params):
        raise ExpertsReleasedError(
            f"{spec.model_type} layer {layer_idx}: expert weights are on the meta device "
            "(released already, or the model was loaded without them); read them from the "
            "checkpoint with kt_models.CheckpointReader instead"
        )
    if spec.expert_storage == "fused":
        gate_up, down, transposed = _fused_params(spec, experts, layer_idx, dims)
        gate_up, down = gate_up.detach(), down.detach()
        if transposed:
            gate_up = gate_up.transpose(1, 2).contiguous()
            down = down.transpose(1, 2).contiguous()
        weights = ExpertWeights(gate_up=gate_up, down=down)
        if release:
            _to_meta(experts, "gate_up_proj")
            _to_meta(experts, "down_proj")
        return weights
    rows = _modulelist_linears(spec, experts, layer_idx, dims)
    with torch.no_grad():
        gate, up, down = (torch.stack([row[j].weight.detach() for row in rows]) for j in range(3))
    weights = ExpertWeights(gate=gate, up=up, down=down)
    if release:
        for row in rows:
            for lin in row:
                _to_meta(lin, "weight")
    return weights


def release_experts(model: nn.Module, layer_idx: int, *, spec: ArchSpec | None = None) -> None:
    """Move layer ``layer_idx``'s expert parameters to ``meta`` without reading them."""
    spec, experts, dims = _resolve(model, layer_idx, spec)
    if spec.expert_storage == "fused":
        _fused_params(spec, experts, layer_idx, dims)
        _to_meta(experts, "gate_up_proj")
        _to_meta(experts, "down_proj")
        return
    for row in _modulelist_linears(spec, experts, layer_idx, dims):
        for lin in row:
            _to_meta(lin, "weight")
