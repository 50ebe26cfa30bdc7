"""PEFT LoRA on kt experts: reading PEFT's tensors and hooking PEFT's ``ParamWrapper``.

The hooks behind :mod:`kt_sft.peft` (whose docstring tells the whole story): a ``ParamWrapper``
around kt experts forwards straight to the experts module with the wrappers' LoRA tensors bound
to the engine (:mod:`kt_sft.binding`), and merging into engine-held weights is refused; every
other module keeps PEFT's own code.

PEFT layout of a ``ParamWrapper`` on a fused ``E x out x in`` tensor (peft/tuners/lora/layer.py):
``lora_A.weight`` is ``(E·r) x in`` with expert-major rows (expert e = rows ``e·r .. e·r+r-1``),
``lora_B.weight`` is ``out x (r·E)`` with the expert index fastest (column ``k·E + e``), and the
delta is ``s · B_e @ A_e``. kt views them as ``A: E x r x in`` and ``B: E x out x r`` without
copying.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kt_sft.binding import LoRAFactor, LoRASource
from kt_sft.hf_experts import IMPLEMENTATION, routed_experts_of
from kt_sft.layer import KTMoELayer
from kt_sft.lora_experts import LoRAExperts
from kt_sft.routed_experts import RoutedExperts

__all__ = [
    "KTLoRAError",
    "install_peft_hooks",
    "lora_parameters",
    "lora_source",
    "outer_wrappers",
]

_KIND_OF_PARAM = {"gate_up_proj": "gate_up", "down_proj": "down"}


class KTLoRAError(ValueError):
    """A LoRA configuration kt cannot run on its experts (or that matches none of them)."""


def _param_wrapper_cls() -> Any:
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def _chain(outer: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    ParamWrapper = _param_wrapper_cls()
    wrappers = []
    module = outer
    while isinstance(module, ParamWrapper):
        wrappers.append(module)
        module = module.base_layer
    return wrappers, module


def _factor_views(
    num_experts: int, rank: int, in_features: int, out_features: int
) -> tuple[Any, Any]:
    def view_a(t: torch.Tensor) -> torch.Tensor:
        return t.view(num_experts, rank, in_features)

    def view_b(t: torch.Tensor) -> torch.Tensor:
        return t.view(out_features, rank, num_experts).permute(2, 0, 1)

    return view_a, view_b


def lora_source(outer: nn.Module) -> LoRASource | None:
    """The active expert LoRA of the ``ParamWrapper`` chain ``outer`` (``None``: none active)."""
    wrappers, experts = _chain(outer)
    kinds: dict[str, tuple[LoRAFactor, LoRAFactor]] = {}
    ranks: dict[str, int] = {}
    scalings: dict[str, float] = {}
    names: list[str] = []
    for wrapper in wrappers:
        if wrapper.disable_adapters or wrapper.merged:
            continue
        active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if not active:
            continue
        if len(active) > 1:
            raise KTLoRAError(
                f"{type(experts).__name__}: {len(active)} active adapters "
                f"{active} on kt experts; kt runs one active adapter at a time"
            )
        adapter = active[0]
        kind = _KIND_OF_PARAM.get(wrapper.parameter_name)
        if kind is None:
            raise KTLoRAError(
                f"LoRA on experts parameter {wrapper.parameter_name!r} is not "
                "supported by kt (target gate_up_proj and/or down_proj)"
            )
        rank = int(wrapper.r[adapter])
        a = wrapper.lora_A[adapter].weight
        b = wrapper.lora_B[adapter].weight
        num_experts = int(wrapper.num_experts)
        in_f, out_f = int(a.shape[1]), int(b.shape[0])
        view_a, view_b = _factor_views(num_experts, rank, in_f, out_f)
        kinds[kind] = (LoRAFactor(a, view_a), LoRAFactor(b, view_b))
        ranks[kind] = rank
        scalings[kind] = float(wrapper.scaling[adapter])
        names.append(adapter)
    if not kinds:
        return None
    if len(set(names)) > 1:
        raise KTLoRAError(
            f"{type(experts).__name__}: gate_up_proj and down_proj carry different "
            f"active adapters {names}"
        )
    first = next(iter(kinds))
    return LoRASource(
        "fused",
        ranks[first],
        scalings[first],
        kinds,
        key=("peft", id(outer), tuple(names)),
        ranks=ranks,
        scalings=scalings,
        interleaved=not bool(getattr(experts, "is_concatenated", True)),
    )


# ---------------------------------------------------------------------------------------------
# ParamWrapper hooks


def _kt_layer(wrapper: nn.Module) -> tuple[RoutedExperts | None, nn.Module]:
    experts = wrapper.get_base_layer()
    layer = experts.__dict__.get("_kt_engine")
    if layer is None:
        config = getattr(experts, "config", None)
        if (
            config is not None
            and hasattr(experts, "has_gate")
            and getattr(config, "_experts_implementation", None) == IMPLEMENTATION
        ):
            layer = routed_experts_of(experts, create=True)
    return layer, experts


def _refuse_merge(wrapper: nn.Module) -> None:
    raise NotImplementedError(
        "merging LoRA into kt experts is not supported: the base expert weights live packed in "
        "the engine. Save the adapter (save_pretrained) and run `kt-sft export --adapter DIR "
        "--model BASE --output MERGED` (kt_sft.export_merged), which streams the base "
        "checkpoint and writes a merged Hugging Face checkpoint without loading the model"
    )


def install_peft_hooks() -> None:
    """Route PEFT ``ParamWrapper``s around kt experts to the engine (idempotent)."""
    try:
        ParamWrapper = _param_wrapper_cls()
    except ImportError:  # peft is not installed: nothing to hook
        return
    if getattr(ParamWrapper, "_kt_hooked", False):
        return
    original_forward = ParamWrapper.forward
    original_merge = ParamWrapper.merge
    original_delta = ParamWrapper.get_delta_weight

    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer, experts = _kt_layer(self)
        if layer is None:
            return original_forward(self, x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            raise KTLoRAError(
                "mixed adapter batches (adapter_names=) are not supported on kt experts"
            )
        kwargs.pop("adapter_names", None)
        source = lora_source(self)
        previous = layer.call_source
        layer.call_source = source
        try:
            return experts(x, *args, **kwargs)
        finally:
            layer.call_source = previous

    def merge(self: Any, *args: Any, **kwargs: Any) -> None:
        if _kt_layer(self)[0] is not None:
            _refuse_merge(self)
        return original_merge(self, *args, **kwargs)

    def get_delta_weight(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _kt_layer(self)[0] is not None:
            _refuse_merge(self)
        return original_delta(self, *args, **kwargs)

    ParamWrapper.forward = forward
    ParamWrapper.merge = merge
    ParamWrapper.get_delta_weight = get_delta_weight
    ParamWrapper._kt_hooked = True


def outer_wrappers(model: nn.Module) -> list[tuple[str, nn.Module, RoutedExperts]]:
    """``(name, outermost ParamWrapper, layer)`` for every kt experts module under PEFT."""
    try:
        ParamWrapper = _param_wrapper_cls()
    except ImportError:
        return []
    out = []
    inner: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            if id(module) in inner:
                continue
            wrappers, experts = _chain(module)
            inner.update(id(w) for w in wrappers[1:])
            layer = experts.__dict__.get("_kt_engine")
            if layer is not None:
                out.append((name, module, layer))
    return out


def lora_parameters(model: nn.Module, *, include_lora_experts: bool = False) -> list[nn.Parameter]:
    """The expert LoRA parameters bound to kt engines (active adapter), in model order.

    Their gradients are written by the engines, not by autograd. With
    ``include_lora_experts=True`` the parameters of kt's LoRA experts (``lora_experts=N``,
    ordinary autograd) follow. Attention / shared-expert / router LoRA is not included: it is
    ordinary PEFT.
    """
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, outer, _ in outer_wrappers(model):
        source = lora_source(outer)
        if source is None:
            continue
        for p in source.params():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)  # type: ignore[arg-type]
    for module in model.modules():
        if isinstance(module, KTMoELayer):
            for p in module.lora_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    if include_lora_experts:
        for module in model.modules():
            if isinstance(module, LoRAExperts):
                for p in module.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
    return params
