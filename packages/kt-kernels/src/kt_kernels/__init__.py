"""kt-kernels: the compiled CPU engine for Mixture-of-Experts layers with LoRA.

Arrays cross into the engine through DLPack (torch tensors, NumPy arrays with ml_dtypes for
bfloat16, ...). This package imports no torch and no training code.
"""

from __future__ import annotations

from kt_kernels._guard import check_platform as _check_platform
from kt_kernels._version import __version__

_check_platform()

from kt_kernels import _core  # noqa: E402
from kt_kernels._engine import MoEEngine, active_isa, available_isas  # noqa: E402
from kt_kernels._profile import clear_trace, profile, profiling, write_chrome_trace  # noqa: E402
from kt_kernels._quant import dequantize_weights, quantize_weights  # noqa: E402

ABI_VERSION: int = _core.ABI_VERSION


def cpu_features() -> dict[str, bool]:
    """Return the x86 ISA flags of this CPU that the OS enables, named as in /proc/cpuinfo.

    AMX flags are true only when Linux granted this process the AMX tile-data permission.
    """
    return dict(_core.cpu_features())


def physical_core_count() -> int:
    """Return the number of physical cores this process may run on."""
    return int(_core.physical_core_count())


def default_thread_count() -> int:
    """Return the threads an engine uses by default: ``KT_NUM_THREADS``, else one per physical
    core."""
    return int(_core.default_thread_count())


def memory_stats() -> dict[str, int]:
    """Return the engine memory of the whole process, in bytes, by kind: ``<kind>_bytes`` (live
    now) and ``<kind>_peak_bytes`` (the most since :func:`reset_memory_peaks`) for ``weights``
    (packed base weights), ``lora`` (the LoRA stage: fp32 kernel-layout copies of the LoRA
    weights of the engines that ran most recently, up to ``KT_LORA_STAGE_MIB``), ``cache`` (activation cache
    entries of pending forwards), ``pool`` (cache blocks kept for reuse by the next forward of
    any layer) and ``scratch`` (the process-wide scratch buffers); ``total_bytes`` and
    ``total_peak_bytes`` are their sum (the peak of the sum, not the sum of the peaks)."""
    return {str(k): int(v) for k, v in _core.memory_stats().items()}


def reset_memory_peaks() -> None:
    """Set every peak of :func:`memory_stats` to its live value."""
    _core.reset_memory_peaks()


def trim_memory() -> None:
    """Free the process-wide scratch buffers, the activation-cache blocks kept for reuse and the
    LoRA stage.

    All are allocated again when an engine next needs them; cache entries of pending forwards
    are not touched. Call it between phases of different size (after a long-sequence step, before
    evaluation) to give the memory back to the system."""
    _core.trim_memory()


def numa_node_count() -> int:
    """Return the NUMA nodes of this machine (``tp=None`` engines use one slice per node)."""
    return int(_core.numa_node_count())


__all__ = [
    "ABI_VERSION",
    "MoEEngine",
    "__version__",
    "active_isa",
    "available_isas",
    "clear_trace",
    "cpu_features",
    "default_thread_count",
    "dequantize_weights",
    "memory_stats",
    "numa_node_count",
    "physical_core_count",
    "profile",
    "profiling",
    "quantize_weights",
    "reset_memory_peaks",
    "trim_memory",
    "write_chrome_trace",
]
