"""Give freed activation memory back to the system (glibc's malloc on Linux) when RAM is tight.

PyTorch's CPU tensors come from malloc. glibc serves an allocation from its heap unless it is
larger than the mmap threshold, and that threshold *grows* to the size of every mmapped block
that is freed (up to 32 MiB): after the first few activations of a step are freed, the next
ones of a few MiB come from the heap, and memory freed in the middle of a heap is kept by the
process. On a 48-layer Qwen3-30B-A3B-shaped model at T=1024 that retention was 2 GiB of peak
RSS (22.2 GiB against 20.3 GiB with a fixed 1 MiB threshold; same losses bit for bit).

A fixed threshold costs time: every large tensor is a fresh mapping whose pages fault in on
first touch (that run's steps took 1.35x as long). So :func:`maybe_tune_malloc` fixes it only
when memory is tight — the process already holds more than half of the machine's RAM once the
model is loaded — and ``KT_MALLOC_TUNING=1`` / ``0`` forces it on / off. ``kt_sft.load_model``
and ``kt-sft train`` call it after loading the model. A threshold the user set with glibc's own
``MALLOC_MMAP_THRESHOLD_`` is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TIGHT_FRACTION", "malloc_tuned", "maybe_tune_malloc", "tune_malloc"]

#: Allocations of at least this many bytes get their own mapping, returned on free.
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
_M_ARENA_MAX = -8
_ARENAS = 2
#: Tune when the process's RSS is above this fraction of the machine's RAM.
TIGHT_FRACTION = 0.5
_done: bool | None = None


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` and cap its arenas; returns whether
    the settings are in force (False off Linux/glibc, with ``KT_MALLOC_TUNING=0``, or when the
    user set ``MALLOC_MMAP_THRESHOLD_``). Idempotent: the first answer is kept."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("KT_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, _ARENAS)
    _done = ok
    return ok


def _meminfo_kib(field: str, path: str) -> int:
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def maybe_tune_malloc() -> bool:
    """:func:`tune_malloc` when ``KT_MALLOC_TUNING=1``, or (unset) when this process's RSS is
    above :data:`TIGHT_FRACTION` of the machine's RAM; returns whether the tuning is in force."""
    mode = os.environ.get("KT_MALLOC_TUNING", "")
    if mode not in ("", "0", "1"):
        raise ValueError(
            f"KT_MALLOC_TUNING={mode!r}: expected 1 (always), 0 (never) or unset (when the "
            "model holds more than half of the RAM)"
        )
    if _done is not None or mode == "0":
        return bool(_done)
    if mode == "":
        try:
            rss = _meminfo_kib("VmRSS", "/proc/self/status")
            total = _meminfo_kib("MemTotal", "/proc/meminfo")
        except OSError:
            return False
        if not total or rss <= TIGHT_FRACTION * total:
            return False
    return tune_malloc()


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` has fixed the threshold in this process."""
    return bool(_done)
