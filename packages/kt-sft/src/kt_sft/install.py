"""`ensure_installed`: kt's hooks into other libraries, installed once.

* ``"kt"`` in transformers' experts-implementation registry (:func:`kt_experts_forward`);
* PEFT's ``ParamWrapper`` routed to the engine for kt experts (:mod:`kt_sft.peft_hooks`);
* kt's distributed placement in the backend factory (:func:`kt_sft.distributed.place_backend`).

Every entry point that builds or adapts a kt model calls :func:`ensure_installed`
(``wrap_model``, ``load_model``, ``get_peft_model``, ``load_adapter``, the first call of a model
loaded with ``experts_implementation="kt"``); calling it again does nothing.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from kt_sft.backend import set_placement
from kt_sft.distributed.exchange import place_backend
from kt_sft.function import kt_moe
from kt_sft.hf_experts import IMPLEMENTATION, KTUnsupportedExpertsError, routed_experts_of
from kt_sft.peft_hooks import install_peft_hooks

__all__ = ["ensure_installed", "kt_experts_forward", "register", "register_experts_implementation"]


def kt_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``"kt"`` experts implementation: called by HF in place of the experts' forward."""
    layer = routed_experts_of(self)
    if layer is None:  # loaded with experts_implementation="kt" and never wrapped
        ensure_installed()
        layer = routed_experts_of(self, create=True)
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


def register_experts_implementation(module: ModuleType | None = None) -> None:
    """Register ``"kt"`` in transformers' experts-implementation registry (idempotent);
    ``module`` is ``transformers.integrations.moe`` when the caller has it."""
    if module is None:
        from transformers.integrations import moe as module
    registry = module.ExpertsInterface
    if registry._global_mapping.get(IMPLEMENTATION) is not kt_experts_forward:
        registry.register(IMPLEMENTATION, kt_experts_forward)


def ensure_installed() -> None:
    """Install every hook of kt's; each step checks whether it is in place already."""
    register_experts_implementation()
    install_peft_hooks()
    set_placement(place_backend)


#: The former name of :func:`ensure_installed` (public API).
register = ensure_installed
