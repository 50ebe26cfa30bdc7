"""The engine under misuse: sizes it cannot plan for, calls from several threads at once,
close() during a call, and fork() after the worker pool ran. Each case must end in a clear
Python exception or correct results, never a crash or a hang; the risky ones run in a child
process so a crash or hang fails the test instead of the test run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from kk_helpers import make_engine
from kk_reference import forward, make_case, max_rel_err

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
    # float32 rows of H + 32 per token: H is a multiple of 512, so bf16 rows (and gate_up blocks)
    # hold one zero step more (quant::unaliased_depth)
    assert limit == 2**47 // (4 * (H + 32))
    kk.MoEEngine(4, 1, H, 32, max_tokens=limit, num_threads=1).close()
    with pytest.raises(ValueError, match="max_tokens"):
        kk.MoEEngine(4, 1, H, 32, max_tokens=limit + 1, num_threads=1)


# -- threads ----------------------------------------------------------------------------------

_THREADED = """
    import threading, time
    import numpy as np
    import kt_kernels as kk
    from kk_helpers import make_engine
    from kk_reference import make_case

    c = make_case(8, 2, 256, 128, 4, 512, seed=7)
    eng, _, _ = make_engine(c, threads=2, max_cache_depth=64)
    inside = threading.Event()
    stop = threading.Event()
    errors = []

    def busy():
        out = np.empty((c.T, c.H), np.float32)
        try:
            while not stop.is_set():
                inside.set()
                eng.forward(c.x, c.ids, c.w, out, save_for_backward=False)
        except RuntimeError as e:  # closed under us: must say so
            errors.append(str(e))

    t = threading.Thread(target=busy)
    t.start()
    inside.wait()
"""


def test_concurrent_calls_on_one_engine_raise() -> None:
    r = _run_child(
        _THREADED
        + """
    seen = None
    deadline = time.monotonic() + 20
    while seen is None and time.monotonic() < deadline:
        dx = np.empty((c.T, c.H), np.float32)
        dw = np.empty((c.T, c.K), np.float32)
        try:
            eng.forward(c.x, c.ids, c.w, np.empty((c.T, c.H), np.float32))
            eng.backward(c.dout, dx, dw)
        except RuntimeError as e:
            seen = str(e)
    stop.set()
    t.join()
    print("SEEN", seen)
    print("ERRORS", errors)
    """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SEEN" in r.stdout and "another thread is inside forward()" in r.stdout, r.stdout
    assert "ERRORS []" in r.stdout


def test_close_while_another_thread_is_in_forward() -> None:
    r = _run_child(
        _THREADED
        + """
    time.sleep(0.05)
    eng.close()          # waits for the running forward, then frees the engine
    stop.set()
    t.join()
    assert eng.closed
    print("ERRORS", errors)
    """
    )
    assert r.returncode == 0, f"child died ({r.returncode}): {r.stderr[-2000:]}"
    assert "ERRORS" in r.stdout
    # the busy thread either finished its loop or was told the engine is closed
    errors = r.stdout.split("ERRORS", 1)[1]
    assert errors.strip() == "[]" or "closed" in errors


def test_reads_wait_for_a_running_call() -> None:
    """Read-only calls (memory_stats, cache_depth, ...) from another thread wait, never raise."""
    r = _run_child(
        _THREADED
        + """
    for _ in range(200):
        eng.memory_stats(); eng.cache_depth; eng.last_timings(); eng.profile_stats()
    stop.set()
    t.join()
    print("ERRORS", errors)
    """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERRORS []" in r.stdout


# -- fork ---------------------------------------------------------------------------------------


def _wait(pid: int, timeout: float) -> int | None:
    """Exit status of child `pid`, or None (after killing it) when it runs past `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_after_the_pool_ran() -> None:
    """A forked child uses the parent's engine and a new one with several threads; both give the
    parent's results (the parent's pool threads do not exist in the child)."""
    c = make_case(8, 2, 96, 64, 2, 40, seed=11)
    eng, _, _ = make_engine(c, threads=2)
    want = np.empty((c.T, c.H), np.float32)
    eng.forward(c.x, c.ids, c.w, want, save_for_backward=False)
    assert max_rel_err(want, forward(c)[0]) <= TOL
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, report through the exit code
        code = 1
        try:
            os.close(r)
            out = np.empty_like(want)
            eng.forward(c.x, c.ids, c.w, out, save_for_backward=False)
            eng2, _, _ = make_engine(c, threads=2)
            out2 = np.empty_like(want)
            eng2.forward(c.x, c.ids, c.w, out2, save_for_backward=False)
            ok = np.array_equal(out, want) and np.array_equal(out2, want)
            code = 0 if ok else 3
        finally:
            os._exit(code)
    os.close(w)
    os.close(r)
    status = _wait(pid, 60)
    eng.forward(c.x, c.ids, c.w, want, save_for_backward=False)  # the parent still works
    eng.close()
    assert status is not None, "the forked child hung on an engine call"
    assert status == 0, f"forked child failed with exit status {status}"


def _worker_forward(args: tuple) -> float:
    """A fork-started worker (like a DataLoader worker) calling the inherited engine."""
    eng, c, want = _FORK_STATE
    out = np.empty_like(want)
    eng.forward(c.x, c.ids, c.w, out, save_for_backward=False)
    return float(np.abs(out - want).max())


_FORK_STATE: tuple = ()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_started_workers_call_the_engine() -> None:
    import multiprocessing as mp

    global _FORK_STATE
    c = make_case(8, 2, 96, 64, 2, 40, seed=13)
    eng, _, _ = make_engine(c, threads=2)
    want = np.empty((c.T, c.H), np.float32)
    eng.forward(c.x, c.ids, c.w, want, save_for_backward=False)
    _FORK_STATE = (eng, c, want)
    try:
        with mp.get_context("fork").Pool(2) as pool:
            res = pool.map_async(_worker_forward, range(4))
            diffs = res.get(timeout=60)  # a hang is a TimeoutError here
    finally:
        _FORK_STATE = ()
        eng.close()
    assert diffs == [0.0] * 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_with_a_submitted_forward_pending() -> None:
    """The submitted forward ran in the parent: the child's sync_forward says so (instead of
    joining a thread that does not exist there), and the engine works on in the child."""
    c = make_case(8, 2, 96, 64, 2, 40, seed=17)
    eng, _, _ = make_engine(c, threads=2)
    want = np.empty((c.T, c.H), np.float32)
    eng.forward(c.x, c.ids, c.w, want, save_for_backward=False)
    out = np.empty_like(want)
    eng.submit_forward(c.x, c.ids, c.w, out, save_for_backward=False)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                eng.sync_forward()
                code = 4
            except RuntimeError as e:
                code = 0 if "forked" in str(e) else 5
            if code == 0:
                eng.clear_cache()
                again = np.empty_like(want)
                eng.forward(c.x, c.ids, c.w, again, save_for_backward=False)
                eng.close()
                code = 0 if np.array_equal(again, want) else 3
        finally:
            os._exit(code)
    status = _wait(pid, 60)
    eng.sync_forward()
    assert np.array_equal(out, want)
    eng.close()
    assert status == 0, f"forked child: exit status {status} (None: hung)"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_is_in_a_call() -> None:
    """A call running on another thread of the parent at fork time does not exist in the child:
    the child's calls are not refused as concurrent, and close() does not wait for it."""
    r = _run_child(
        _THREADED
        + """
    import os
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            out = np.empty((c.T, c.H), np.float32)
            eng.forward(c.x, c.ids, c.w, out, save_for_backward=False)
            eng.memory_stats()
            eng.close()
            code = 0
        except BaseException as e:
            print("CHILD", e, flush=True)
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, 9)
        status = -1
    stop.set()
    t.join()
    eng.close()
    print("CHILD_STATUS", status)
    """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CHILD_STATUS 0" in r.stdout, r.stdout + r.stderr[-2000:]
