"""Model-level helpers: :func:`close`, :func:`lora_updated`."""

from __future__ import annotations

from torch import nn

from kt_sft.hf_experts import experts_layers
from kt_sft.trace import write_trace

__all__ = ["close", "lora_updated"]


def close(model: nn.Module) -> None:
    """Free every kt engine of ``model`` (packed weights, caches, scratch).

    The model cannot run its MoE layers afterwards; call it when done (also safe to call twice).
    """
    profiled = False
    for _, _, layer in experts_layers(model):
        profiled = profiled or layer.cfg.profile is not None
        layer.close()
    if profiled:
        write_trace()


def lora_updated(model: nn.Module) -> None:
    """Make every engine re-read its LoRA weights.

    kt notices in-place updates through torch's version counters (optimizer steps,
    ``load_state_dict``); call this after changing LoRA tensors behind autograd's back
    (``param.data.copy_(...)``).
    """
    for _, _, layer in experts_layers(model):
        layer.lora_updated()
