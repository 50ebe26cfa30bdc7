"""CPU feature detection against the kernel's own view (/proc/cpuinfo)."""

from __future__ import annotations

from pathlib import Path

import pytest

import kt_kernels as kk

FLAGS = [
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "avx512_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
]


def _proc_cpuinfo_flags() -> set[str]:
    path = Path("/proc/cpuinfo")
    if not path.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("/proc/cpuinfo has no flags line")


def test_features_match_proc_cpuinfo() -> None:
    proc = _proc_cpuinfo_flags()
    ours = kk.cpu_features()
    for flag in FLAGS:
        assert flag in ours, flag
        if flag.startswith("amx"):
            # AMX is reported only once Linux grants tile data; it can never exceed the CPU's.
            assert not ours[flag] or flag in proc, flag
        else:
            assert ours[flag] == (flag in proc), flag


def test_version_reaches_cpp() -> None:
    assert kk._core.__version__ == kk.__version__
    assert isinstance(kk.ABI_VERSION, int) and kk.ABI_VERSION >= 1


def test_physical_cores_positive() -> None:
    import os

    n = kk.physical_core_count()
    assert 1 <= n <= (os.cpu_count() or n)
