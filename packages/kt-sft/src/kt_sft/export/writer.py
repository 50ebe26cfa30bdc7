"""Streaming safetensors output: each shard's header computed up front from the base's headers,
then every tensor read, merged and appended one at a time (fused 3-D experts one expert at a
time), so memory holds one tensor, never a shard."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kt_sft.export.plan import MergePlan

__all__ = [
    "FLOAT_DTYPES",
    "FP8_DTYPES",
    "SCALE_SUFFIX",
    "ST_DTYPES",
    "ShardWriter",
    "copy_side_files",
    "write_tensor",
]

_ST_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}

#: safetensors dtype name -> torch dtype, for the dtypes written as they are stored.
ST_DTYPES = {name: dtype for dtype, name in _ST_NAMES.items()}
#: Floating dtypes: merged into, and cast to the output dtype.
FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
#: FP8 dtypes: dequantized with their block scales.
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
#: Key suffix of an FP8 weight's block-scale tensor.
SCALE_SUFFIX = "_scale_inv"
#: Base files that are not copied beside the merged shards: weights in any format.
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
)
_WEIGHT_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


def _shard_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, int]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {
            "dtype": _ST_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return raw, offset


def write_tensor(fh: Any, tensor: torch.Tensor) -> None:
    """Append the raw bytes of `tensor` (little-endian, C order) to `fh`."""
    flat = tensor.contiguous().reshape(-1)
    if flat.numel():
        fh.write(flat.view(torch.uint8).numpy().data)


@dataclass
class ShardWriter:
    """Writes output shards: header first (from the base's headers), then tensor by tensor."""

    reader: Any
    plan: MergePlan
    out_dtype: torch.dtype | None
    dropped: set[str]

    def dtype_of(self, stored: str) -> torch.dtype:
        """Output dtype of a tensor stored as ``stored`` (a safetensors dtype name)."""
        if stored in FP8_DTYPES:
            return self.out_dtype or torch.bfloat16
        if stored in FLOAT_DTYPES:
            return self.out_dtype or ST_DTYPES[stored]
        return ST_DTYPES[stored]

    def pieces(self, key: str) -> Iterator[torch.Tensor]:
        """Output tensor ``key`` in consecutive pieces: 3-D tensors (fused experts) one expert
        at a time, everything else whole; LoRA deltas added in float32."""
        reader, info = self.reader, self.reader.tensor_info(key)
        if info.dtype not in FP8_DTYPES and info.dtype not in FLOAT_DTYPES:
            yield reader.get_tensor(key)
            return
        ops = self.plan.ops.get(key, [])
        want = self.dtype_of(info.dtype)
        compute = torch.float64 if info.dtype == "F64" else torch.float32
        read = compute if ops else want
        saved = self.plan.replace.get(key)
        parts: Iterator[tuple[int | None, torch.Tensor]]
        if saved is not None:
            parts = iter([(None, saved.to(read, copy=True))])
        elif len(info.shape) == 3:
            parts = ((e, reader.get_slice(key, e, dtype=read)) for e in range(info.shape[0]))
        else:
            parts = iter([(None, reader.get_tensor(key, dtype=read))])
        for index, t in parts:
            for op in ops:
                op(t, index)
            yield t if t.dtype == want else t.to(want)

    def write(self, path: Path, keys: list[str]) -> tuple[int, int]:
        """Write ``keys`` as the safetensors file ``path``; ``(data bytes, tensors merged)``."""
        entries = []
        for key in keys:
            info = self.reader.tensor_info(key)
            entries.append((key, self.dtype_of(info.dtype), info.shape))
        header, data_size = _shard_header(entries)
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(header)))
            fh.write(header)
            for key, kind, shape in entries:
                numel = 0
                for piece in self.pieces(key):
                    if piece.dtype != kind:  # pragma: no cover
                        raise RuntimeError(f"internal: {key} came out {piece.dtype}, not {kind}")
                    write_tensor(fh, piece)
                    numel += piece.numel()
                    del piece
                if numel != torch.Size(shape).numel():  # pragma: no cover
                    raise RuntimeError(f"internal: {key} wrote {numel} values, planned {shape}")
        return data_size, sum(key in self.plan.ops for key in keys)


def copy_side_files(base: Path, out: Path, config: dict[str, Any]) -> tuple[str, ...]:
    """Copy the base's non-weight files (tokenizer, generation config, ...) and write
    `config`; returns the names written."""
    copied = []
    for f in sorted(base.iterdir()):
        if (
            not f.is_file()
            or f.name.startswith(".")
            or f.name == "config.json"
            or f.name in _WEIGHT_FILES
            or f.name.endswith(_WEIGHT_SUFFIXES)
        ):
            continue
        shutil.copy2(f, out / f.name)
        copied.append(f.name)
    (out / "config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return ("config.json", *copied)
