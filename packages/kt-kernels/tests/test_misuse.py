"""The engine under misuse: sizes it cannot plan for, calls from several threads at once,
close() during a call, and fork() after the worker pool ran. Each case must end in a clear
Python exception or correct results, never a crash or a hang; the risky ones run in a child
process so a crash or hang fails the test instead of the test run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kt_kernels as kk

HERE = Path(__file__).parent
TOL = 2e-2  # bf16 activations and weights against the float64 reference (as test_engine.py)


def _run_child(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with this folder's helpers importable."""
    prelude = f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "KT_NUM_THREADS": "2"},
    )


# -- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [2**31, 2**40, 2**57, 2**63 - 1])
def test_huge_max_tokens_is_a_value_error(max_tokens: int) -> None:
    r = _run_child(
        f"""
        import kt_kernels as kk
        try:
            kk.MoEEngine(4, 2, 48, 32, lora_rank=2, max_tokens={max_tokens}, num_threads=1)
        except ValueError as e:
            print("VALUE_ERROR", e)
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "VALUE_ERROR max_tokens=" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "too large" in r.stdout and "largest allowed value" in r.stdout


def test_max_tokens_limit_is_exact() -> None:
    """The largest value the error names is accepted (buffers are address space only until a
    forward touches them); one more is refused."""
    with pytest.raises(ValueError, match=r"largest allowed value here is (\d+)") as info:
        kk.MoEEngine(4, 2, 48, 32, max_tokens=2**40, num_threads=1)
    limit = int(str(info.value).rsplit(" ", 1)[1])
    assert limit == (2**31 - 1) // 2  # int32 row indices bound it here (top_k = 2)
    kk.MoEEngine(4, 2, 48, 32, max_tokens=limit, num_threads=1).close()
    with pytest.raises(ValueError, match="max_tokens"):
        kk.MoEEngine(4, 2, 48, 32, max_tokens=limit + 1, num_threads=1)


def test_byte_limit_applies_to_wide_layers() -> None:
    """With a wide layer the byte bound (2**47 per buffer) is the tighter one."""
    H = 2**24  # the largest hidden_size the engine takes
    with pytest.raises(ValueError, match=r"largest allowed value here is (\d+)") as info:
        kk.MoEEngine(4, 1, H, 32, max_tokens=2**30, num_threads=1)
    limit = int(str(info.value).rsplit(" ", 1)[1])
    assert limit * H * 4 <= 2**47 < (limit + 1) * H * 4 * 2  # within the packed width's rounding
