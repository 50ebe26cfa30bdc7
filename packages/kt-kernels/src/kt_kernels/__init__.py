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
    "numa_node_count",
    "physical_core_count",
    "profile",
    "profiling",
    "quantize_weights",
    "write_chrome_trace",
]
