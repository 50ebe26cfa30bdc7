"""Merge a LoRA adapter into its base checkpoint, streaming the checkpoint one tensor at a time.

:func:`export_merged` writes a Hugging Face checkpoint that stock ``from_pretrained`` loads: the
base model's safetensors shards with every LoRA delta added to the weight it adapts, the same
tensor names, on-disk layout and shard files as the base (per-expert or fused experts, as the
base stores them, so transformers converts them at load exactly as it converts the base), plus
the base's ``config.json``, generation config and tokenizer files.

How, and why this way:

* The model is never instantiated with real weights. A ``meta``-device model (no memory) gives
  the parameter names and shapes, PEFT itself injects the adapter into it (so its rank, alpha,
  ``rank_pattern``, ``alpha_pattern`` and rsLoRA scaling rules apply unchanged), and
  transformers' own checkpoint conversion rules map each on-disk key to the parameter it loads
  into. Routed-expert keys are mapped through the kt-models registry (the per-expert / fused
  names that :class:`kt_models.CheckpointReader` reads).
* Output shards are written tensor by tensor: the safetensors header is computed from the base's
  headers first, then each tensor is read (:class:`kt_models.CheckpointReader`: memory mapped,
  cast or FP8-dequantized, unmapped again), merged in float32, cast and appended; fused 3-D
  expert tensors go one expert at a time. Peak memory is the adapter plus the largest 2-D tensor
  (in float32 when it is merged; usually the embeddings or ``lm_head``) or one expert matrix,
  plus its output copy: never a whole shard and never the model.
* The output is written into a temporary directory beside the target and renamed into place at the
  end: a crash or Ctrl-C leaves the previous state, never a half-written checkpoint.

Merged LoRA kinds: PEFT ``lora.Linear`` (attention, dense and shared MLPs, ``lm_head``, linear
routers): ``W += s · B @ A``; PEFT ``target_parameters`` on 2-D parameters (e.g. a router weight)
the same way; and ``target_parameters`` on fused 3-D experts (``gate_up_proj``: ``E x 2I x H``,
``down_proj``: ``E x H x I``), where PEFT's ``ParamWrapper`` stores ``lora_A`` as ``(E·r) x in``
(expert-major: rows ``e·r … e·r + r - 1``) and ``lora_B`` as ``out x (r·E)`` (expert-fastest:
column ``k·E + e``), so ``ΔW[e] = s · B[:, e::E] @ A[e·r:(e+1)·r]``. Everything else (DoRA,
``modules_to_save``, embedding or convolution LoRA, LoRA bias, other PEFT methods, kt's LoRA
experts) is refused with a :class:`ExportError` naming it.

FP8 base checkpoints (DeepSeek-style ``weight_scale_inv`` block scales): every FP8 weight is
dequantized and written in the output dtype (``"auto"``: bfloat16), the scale tensors are dropped
and ``quantization_config`` is removed from ``config.json``; the export is then about twice the
size of the FP8 base. Other quantized checkpoints are refused.
"""

from __future__ import annotations

from kt_sft.export.errors import ExportError
from kt_sft.export.merge import EXPORT_DTYPES, ExportResult, export_merged

__all__ = ["EXPORT_DTYPES", "ExportError", "ExportResult", "export_merged"]
