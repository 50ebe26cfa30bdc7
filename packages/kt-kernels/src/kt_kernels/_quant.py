"""NumPy reference of the engine's weight quantization, and the packed format it accepts.

Format (``MoEEngine.load_quantized_weights``), per weight of shape (E, N, K) in nn.Linear layout
(gate_up: N = 2I, K = H; gate/up: N = I, K = H; down: N = H, K = I):

- ``int8``: codes ``int8 (E, N, K)`` and scales ``float32 (E, N)`` (one per output channel);
  value = code * scale.
- ``int4``: codes ``uint8 (E, N, K / 2)``, two per byte: code k = 2i in the low nibble of byte i,
  code 2i + 1 in the high nibble, each a two's-complement 4-bit integer (-8 .. 7); scales
  ``float32 (E, N, K / group_size)``: code k uses scale k // group_size; value = code * scale.

Quantization (what the engine does at load time from float weights, and what ``quantize_weights``
does bit for bit): symmetric, per row and group, ``scale = max|w| / qmax`` (qmax 127 for int8, 7
for int4) in float32, ``code = rint(w / scale)`` (half to even) clamped to [-qmax, qmax]; an
all-zero group has scale 0, and so has a group whose scale would be below the smallest normal
float32 (2**-126). The engine computes with ``bfloat16(code * scale)``; it stores loaded scales
below 2**-126 as 0 as well.

NumPy is imported on first use only (kt-kernels has no runtime dependencies).
"""

from __future__ import annotations

from typing import Any

__all__ = ["dequantize_weights", "quantize_weights"]


def _check(weight_dtype: str, group_size: int, K: int) -> None:
    if weight_dtype not in ("int8", "int4"):
        raise ValueError(f"weight_dtype: expected 'int8' or 'int4', got {weight_dtype!r}")
    if weight_dtype == "int4":
        if group_size not in (32, 64, 128):
            raise ValueError(f"group_size: expected 32, 64 or 128, got {group_size}")
        if K % group_size:
            raise ValueError(f"group_size: {group_size} does not divide the input dim {K}")


def quantize_weights(w: Any, weight_dtype: str, group_size: int = 128) -> tuple[Any, Any]:
    """Quantize float weights ``w`` (..., N, K) (float32 or anything NumPy converts to it, e.g.
    an ml_dtypes bfloat16 array) to ``(codes, scales)`` in the engine's packed format."""
    import numpy as np

    w = np.asarray(w).astype(np.float32)
    K = w.shape[-1]
    _check(weight_dtype, group_size, K)
    if not np.all(np.isfinite(w)):
        raise ValueError("w: quantization needs finite weights")
    qmax = np.float32(127 if weight_dtype == "int8" else 7)
    g = K if weight_dtype == "int8" else group_size
    wg = w.reshape(*w.shape[:-1], K // g, g)
    scale = (np.max(np.abs(wg), axis=-1) / qmax).astype(np.float32)
    scale[scale < np.finfo(np.float32).tiny] = 0  # below the normals: stored as 0, like the engine
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.where(scale[..., None] > 0, np.rint(wg / safe[..., None]), np.float32(0))
    codes = np.clip(q, -qmax, qmax).astype(np.int8).reshape(w.shape)
    if weight_dtype == "int8":
        return codes, scale[..., 0]
    nib = codes.astype(np.uint8) & np.uint8(0x0F)
    packed = (nib[..., 0::2] | (nib[..., 1::2] << np.uint8(4))).astype(np.uint8)
    return packed, scale


def dequantize_weights(codes: Any, scales: Any, weight_dtype: str, group_size: int = 128) -> Any:
    """float32 ``code * scale`` of packed weights (the engine rounds this to bfloat16)."""
    import numpy as np

    codes = np.asarray(codes)
    scales = np.asarray(scales, dtype=np.float32)
    if weight_dtype == "int8":
        _check(weight_dtype, group_size, codes.shape[-1])
        return codes.astype(np.float32) * scales[..., None]
    K = 2 * codes.shape[-1]
    _check(weight_dtype, group_size, K)
    lo = (codes.astype(np.int8) << 4) >> 4
    hi = codes.astype(np.int8) >> 4
    q = np.empty((*codes.shape[:-1], K), dtype=np.float32)
    q[..., 0::2] = lo
    q[..., 1::2] = hi
    return q * np.repeat(scales, group_size, axis=-1)
