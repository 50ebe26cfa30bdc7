"""`load_model`: a model whose routed experts are streamed from the checkpoint into engines.

Non-expert weights load with transformers as usual (on one device, in the checkpoint's dtype
unless told otherwise); the experts are never created in torch (``kt_models.experts_on_meta``)
and are read one MoE layer at a time (``kt_models.CheckpointReader``) straight into that layer's
engine, so peak memory holds one layer's experts beside the packed engine copies.
"""

from __future__ import annotations

import os
from typing import Any

from kt_sft.config import KTConfig
from kt_sft.host_memory import maybe_tune_malloc

__all__ = ["load_model"]


def load_model(path: str | os.PathLike[str], cfg: KTConfig | None = None, **hf_kwargs: Any) -> Any:
    """Load ``path`` with its routed experts in kt engines; returns the wrapped model.

    ``cfg`` defaults to ``KTConfig(checkpoint=path)`` read from the ``KT_*`` environment. Extra
    keyword arguments go to ``from_pretrained`` (``device`` / ``dtype`` / ``torch_dtype`` pick
    where and how the non-expert weights load; default CPU and the checkpoint's dtype). Fixes
    glibc's mmap threshold so freed activations return to the system
    when the loaded model holds more than half of the RAM
    (:func:`kt_sft.host_memory.maybe_tune_malloc`; ``KT_MALLOC_TUNING=0`` / ``1``: never /
    always).
    Architectures with ModuleList experts (remote code) load normally first, then wrap.

    Raises:
        kt_models.UnsupportedArchitectureError: the checkpoint's model type is not supported.
    """
    import kt_models
    from kt_sft.inject import register, wrap_model
    from kt_sft.peft import install_peft_hooks

    cfg = cfg if cfg is not None else KTConfig()
    register()
    install_peft_hooks()
    device = hf_kwargs.pop("device", "cpu")
    dtype = hf_kwargs.pop("dtype", None)
    if "torch_dtype" in hf_kwargs:
        dtype = hf_kwargs.pop("torch_dtype")
    checkpoint = cfg.checkpoint or os.fspath(path)
    spec = kt_models.get_arch_spec(kt_models.loading.load_config(path))
    if spec.expert_storage == "modulelist":
        # Remote-code ModuleList experts cannot be kept off the model while transformers builds
        # it: load normally (experts in torch for a moment), then pack and release them.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            os.fspath(path), device_map={"": str(device)}, dtype=dtype or "auto", **hf_kwargs
        )
        model = wrap_model(model, cfg)
        maybe_tune_malloc()
        return model
    hf_kwargs.setdefault("experts_implementation", "kt")
    model = kt_models.load_model(path, device=device, dtype=dtype, **hf_kwargs)
    with kt_models.CheckpointReader(checkpoint) as reader:
        wrap_model(model, cfg.replace(checkpoint=checkpoint), reader=reader)
    # a model that fills RAM: freed activations go back to the system (kt_sft.host_memory)
    maybe_tune_malloc()
    return model
