"""PEFT LoRA on kt experts.

``peft.get_peft_model(model, LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"], ...))`` wraps each experts module in PEFT ``ParamWrapper``s. Stock PEFT
would, at every forward, fold ``W + s·B·A`` into the (released) expert tensors. kt hooks
``ParamWrapper`` (only for wrappers around kt experts; every other module keeps PEFT's own
code): the forward goes straight to the experts module with the wrappers' LoRA tensors bound to
the engine (see :mod:`kt_sft.binding`), and merging into engine-held weights is refused with a
clear error. So the stock call "just works" after :func:`kt_sft.wrap_model`;
:func:`get_peft_model` additionally checks the targets, binds eagerly, keeps LoRA experts
trainable, and makes ``save_pretrained`` atomic and kt-aware.

PEFT layout of a ``ParamWrapper`` on a fused ``E x out x in`` tensor (peft/tuners/lora/layer.py):
``lora_A.weight`` is ``(E·r) x in`` with expert-major rows (expert e = rows ``e·r .. e·r+r-1``),
``lora_B.weight`` is ``out x (r·E)`` with the expert index fastest (column ``k·E + e``), and the
delta is ``s · B_e @ A_e``. kt views them as ``A: E x r x in`` and ``B: E x out x r`` without
copying.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kt_sft.adapter import install_save
from kt_sft.hf_experts import is_wrapped
from kt_sft.install import ensure_installed
from kt_sft.layer import bind_modulelist_lora
from kt_sft.lora_experts import LoRAExperts
from kt_sft.peft_hooks import (
    KTLoRAError,
    install_peft_hooks,
    lora_parameters,
    lora_source,
    outer_wrappers,
)

__all__ = [
    "KTLoRAError",
    "default_expert_lora_targets",
    "get_peft_model",
    "install_peft_hooks",
    "lora_parameters",
    "lora_source",
]


def default_expert_lora_targets(model: nn.Module) -> dict[str, list[str]]:
    """``LoraConfig`` keyword arguments that target this architecture's routed experts.

    Fused (transformers 5) experts give ``target_parameters`` (``"mlp.experts.gate_up_proj"``,
    ``"mlp.experts.down_proj"`` with this architecture's attribute names); ModuleList experts
    give ``target_modules`` naming the per-expert projections.
    """
    from kt_models import get_arch_spec

    spec = get_arch_spec(model)
    prefix = f"{spec.moe_block_attr}.{spec.experts_attr}"
    if spec.expert_storage == "fused":
        return {"target_parameters": [f"{prefix}.gate_up_proj", f"{prefix}.down_proj"]}
    names = "|".join(spec.proj_names)
    return {"target_modules": [rf".*\.{prefix}\.\d+\.({names})"]}


def get_peft_model(model: nn.Module, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
    """``peft.get_peft_model`` for a kt-wrapped model, plus kt's bind step.

    Checks that the config's expert targets matched kt experts (an error names the targets
    otherwise), binds every layer's LoRA to its engine now (so rank/alpha problems surface
    here), keeps kt's LoRA experts trainable, and makes ``save_pretrained`` atomic and able to
    save kt's extras (see :func:`kt_sft.adapter.save_adapter`).
    """
    import peft

    if not is_wrapped(model):
        raise KTLoRAError(
            "kt_sft.get_peft_model expects a model wrapped with kt_sft.wrap_model "
            "or loaded with kt_sft.load_model"
        )
    ensure_installed()
    targets = list(getattr(peft_config, "target_parameters", None) or [])
    peft_model = peft.get_peft_model(model, peft_config, *args, **kwargs)
    bound = outer_wrappers(peft_model)
    if targets and not bound:
        raise KTLoRAError(
            f"target_parameters={targets} matched no kt experts parameter; for this model use "
            f"{default_expert_lora_targets(model)} (kt_sft.default_expert_lora_targets)"
        )
    for _, outer, layer in bound:
        try:
            layer.plan_for(lora_source(outer))
        except ValueError as exc:
            pattern = (
                getattr(
                    peft_model.peft_config.get(kwargs.get("adapter_name", "default")),
                    "rank_pattern",
                    None,
                )
                or {}
            )
            if "larger than" in str(exc) and any("gate_up_proj" in k for k in pattern):
                raise KTLoRAError(
                    f"{exc}. PEFT gave the experts' gate_up_proj rank {sorted(pattern.values())} "
                    "because target_modules names both gate_proj and up_proj (transformers-4 "
                    "names, which PEFT maps onto the fused experts with twice the rank)"
                ) from exc
            raise
    bind_modulelist_lora(peft_model)
    for module in peft_model.modules():
        if isinstance(module, LoRAExperts):
            module.requires_grad_(True)
    install_save(peft_model)
    return peft_model
