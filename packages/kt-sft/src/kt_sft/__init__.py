"""kt-sft: LoRA fine-tuning of giant MoE models whose routed experts run on the CPU engine.

```python
from kt_sft import KTConfig, wrap_model
model = wrap_model(model, KTConfig(lora_rank=8))       # experts -> engines, weights released
peft_model = kt_sft.get_peft_model(model, LoraConfig(**kt_sft.default_expert_lora_targets(model)))
# ... train, peft_model.save_pretrained(adapter_dir), then a merged stock checkpoint:
kt_sft.export_merged(adapter_dir, "merged/", base_model="/models/base")  # streamed from disk
```

Importing ``kt_sft`` is light (no torch, transformers or accelerate); the API below loads on
first use. It also arranges for ``"kt"`` to be registered in transformers' experts-implementation
registry as soon as transformers loads, so ``from_pretrained(..., experts_implementation="kt")``
works after ``import kt_sft``.
"""

from __future__ import annotations

import importlib
from typing import Any

from kt_sft import _hooks
from kt_sft._version import __version__
from kt_sft.config import KTConfig, KTConfigError

__all__ = [
    "EXPORT_DTYPES",
    "ExpertsBackend",
    "ExpertsOptions",
    "ExportError",
    "ExportResult",
    "KTAdapterError",
    "KTAlreadyWrappedError",
    "KTCacheError",
    "KTConfig",
    "KTConfigError",
    "KTCopyError",
    "KTLoRAError",
    "KTMoEFunction",
    "KTMoELayer",
    "KTUnsupportedExpertsError",
    "LayerEngine",
    "RoutedExperts",
    "TorchMoEEngine",
    "__version__",
    "close",
    "default_expert_lora_targets",
    "engine_available",
    "ensure_installed",
    "export_merged",
    "get_peft_model",
    "kt_moe",
    "load_adapter",
    "load_model",
    "lora_parameters",
    "lora_updated",
    "register",
    "save_adapter",
    "wrap_model",
    "write_trace",
]

_LAZY = {
    "EXPORT_DTYPES": "kt_sft.export",
    "ExportError": "kt_sft.export",
    "ExportResult": "kt_sft.export",
    "export_merged": "kt_sft.export",
    "KTAdapterError": "kt_sft.adapter",
    "load_adapter": "kt_sft.adapter",
    "save_adapter": "kt_sft.adapter",
    "KTAlreadyWrappedError": "kt_sft.hf_experts",
    "KTUnsupportedExpertsError": "kt_sft.hf_experts",
    "ensure_installed": "kt_sft.install",
    "register": "kt_sft.install",
    "wrap_model": "kt_sft.inject",
    "KTCacheError": "kt_sft.routed_experts",
    "KTCopyError": "kt_sft.routed_experts",
    "LayerEngine": "kt_sft.routed_experts",
    "RoutedExperts": "kt_sft.routed_experts",
    "ExpertsBackend": "kt_sft.experts_backend",
    "ExpertsOptions": "kt_sft.options",
    "KTMoEFunction": "kt_sft.function",
    "kt_moe": "kt_sft.function",
    "KTMoELayer": "kt_sft.layer",
    "KTLoRAError": "kt_sft.peft",
    "default_expert_lora_targets": "kt_sft.peft",
    "get_peft_model": "kt_sft.peft",
    "lora_parameters": "kt_sft.peft",
    "load_model": "kt_sft.model_loader",
    "TorchMoEEngine": "kt_sft.reference",
    "engine_available": "kt_sft.backend",
    "close": "kt_sft._api",
    "lora_updated": "kt_sft._api",
    "write_trace": "kt_sft.trace",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kt_sft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_hooks.install()
