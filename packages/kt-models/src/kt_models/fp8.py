"""FP8 weights with DeepSeek-style block scales (``weight_scale_inv``).

An FP8 (e4m3/e5m2) matrix is stored beside ``<key>_scale_inv``, one FP32 scale per
``b0 x b1`` block; the config's ``quantization_config.weight_block_size`` gives the block
(128 x 128 when it names none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from kt_models.config_fields import get_field

__all__ = ["DEFAULT_BLOCK_SIZE", "SCALE_SUFFIX", "dequantize_fp8_blockwise", "fp8_block_size"]

#: Suffix of the block-scale tensor's key (``<weight key>_scale_inv``).
SCALE_SUFFIX = "_scale_inv"
#: Block size assumed when the config names none.
DEFAULT_BLOCK_SIZE = (128, 128)


def dequantize_fp8_blockwise(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize a 2-D FP8 matrix with per-block scales: ``w[i, j] * scale_inv[i // b0, j // b1]``.

    Works one row block at a time in FP32, so the extra memory is one ``b0 x cols`` FP32 block.
    ``out`` (``rows x cols``, any float dtype) receives the result when given.
    """
    rows, cols = weight.shape
    b0, b1 = block_size
    want = (math.ceil(rows / b0), math.ceil(cols / b1))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight "
            f"{(rows, cols)} with blocks {block_size} (expected {want})"
        )
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype)
    scales = scale_inv.to(torch.float32)
    for rb in range(want[0]):
        r0, r1 = rb * b0, min((rb + 1) * b0, rows)
        col_scale = scales[rb].repeat_interleave(b1)[:cols]
        out[r0:r1] = weight[r0:r1].to(torch.float32) * col_scale
    return out


def fp8_block_size(config: Any) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` of ``config``; :data:`DEFAULT_BLOCK_SIZE` when
    it names none."""
    qcfg = (
        config.get("quantization_config")
        if isinstance(config, Mapping)
        else getattr(config, "quantization_config", None)
    )
    if qcfg is None:
        qcfg = get_field(config, ("quantization_config",), None)
    if qcfg is None:
        return DEFAULT_BLOCK_SIZE
    block = (
        qcfg.get("weight_block_size")
        if isinstance(qcfg, Mapping)
        else getattr(qcfg, "weight_block_size", None)
    )
    if block is None:
        return DEFAULT_BLOCK_SIZE
    b0, b1 = (int(v) for v in block)
    return b0, b1
