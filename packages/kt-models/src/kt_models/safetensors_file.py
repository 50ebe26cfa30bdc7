"""One safetensors file: its header read without mapping the data, and maps opened on demand.

:func:`read_safetensors_header` parses the JSON header and checks it against the file size (a
truncated download is caught before any tensor is read). :class:`ShardMaps` memory-maps the
files a read touches and unmaps each again after a budget of bytes, so a long streamed read
does not keep every page it touched resident.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kt_models.errors import CorruptCheckpointError, MissingShardError

__all__ = [
    "FLOAT_DTYPES",
    "FP8_DTYPES",
    "STORED_DTYPES",
    "ShardMaps",
    "TensorInfo",
    "read_safetensors_header",
]

_MAX_HEADER = 100 * 1024 * 1024

#: torch dtype of each safetensors dtype string.
STORED_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
#: Float dtypes read as they are (cast on copy).
FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
#: FP8 dtypes, dequantized with their block scales.
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    """Header entry of one tensor: safetensors dtype string, shape and the file holding it."""

    dtype: str
    shape: tuple[int, ...]
    file: Path
    nbytes: int


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse a safetensors file's JSON header without mapping its data.

    Raises:
        MissingShardError: the file does not exist.
        CorruptCheckpointError: the header is unreadable, or the file is shorter than the header
            says (a truncated download); names the file and the first tensor cut off.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise CorruptCheckpointError(
                    "safetensors file is too short to hold a header", path=path
                )
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, _MAX_HEADER):
                raise CorruptCheckpointError(
                    f"safetensors header claims {header_len} bytes but the file has {size}",
                    path=path,
                )
            raw = fh.read(header_len)
    except FileNotFoundError as exc:
        raise MissingShardError("checkpoint file does not exist", path=path) from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"safetensors header is not valid JSON ({exc})", path=path
        ) from exc
    data_size = size - 8 - header_len
    out: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            start, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"malformed header entry {entry!r}", path=path, key=key
            ) from exc
        if end > data_size or start > end:
            raise CorruptCheckpointError(
                f"file is truncated or corrupt: tensor data ends at byte {end} of a "
                f"{data_size}-byte data section",
                path=path,
                key=key,
            )
        out[key] = TensorInfo(dtype=dtype, shape=shape, file=path, nbytes=end - start)
    return out


class ShardMaps:
    """Memory-maps shards on demand and unmaps them again.

    A shard's mapping is dropped once ``map_budget`` bytes have been copied out of it (and on
    exit), so the file pages a long read touches do not pile up in the resident set: the next
    access maps the file afresh (re-reading only its JSON header).
    """

    def __init__(self, map_budget: int = 8 << 20) -> None:
        self._open: dict[Path, Any] = {}
        self._used: dict[Path, int] = {}
        self._budget = map_budget

    def get(self, file: Path) -> Any:
        handle = self._open.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except SafetensorError as exc:
                raise CorruptCheckpointError(
                    f"cannot open safetensors file ({exc})", path=file
                ) from exc
            except FileNotFoundError as exc:
                raise MissingShardError("checkpoint file disappeared", path=file) from exc
            self._open[file] = handle
            self._used[file] = 0
        return handle

    def consumed(self, file: Path, nbytes: int) -> None:
        """Record ``nbytes`` copied out of ``file``; unmap it when over budget."""
        self._used[file] = self._used.get(file, 0) + nbytes
        if self._used[file] >= self._budget:
            self._close(file)

    def _close(self, file: Path) -> None:
        handle = self._open.pop(file, None)
        self._used.pop(file, None)
        if handle is not None:
            handle.__exit__(None, None, None)

    def __enter__(self) -> ShardMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        for file in list(self._open):
            self._close(file)
