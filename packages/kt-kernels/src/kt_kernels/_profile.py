"""The profiler: ``profile()`` records every engine call's phases; ``write_chrome_trace`` saves them.

Each engine call (load, forward, backward) becomes one trace event on the thread that ran it, with
one nested event per phase (load: alloc, then pack (bf16 repack), quantize (int8 / int4 from float
weights) or copy_codes (``load_quantized_weights``); forward: route, convert, gather, gate_up,
lora_down_a, down, combine; backward: convert, gather, down_t, reduce, gate_up_t, combine).
Phases that run once per group of H columns (down/combine, gate_up_t/combine for very large
batches) give one event per group. Every pool thread that ran tasks of a parallel phase adds one
``"tasks"`` event (``cat`` ``"worker"``) on its own thread, spanning its share of the phase; in
the per-slice phases of a ``tp > 1`` engine (loading, gate_up, down, down_t, gate_up_t) the event
also names its ``group``: the tensor-parallel slice those threads computed. Timestamps come from
the steady clock; with the profiler off, a call pays one relaxed atomic load, and each thread one
more per parallel phase.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from kt_kernels import _core

__all__ = ["clear_trace", "profile", "profiling", "write_chrome_trace"]


@contextlib.contextmanager
def profile(*, clear: bool = True) -> Iterator[None]:
    """Record the phases of every engine call made inside the ``with`` block (all engines, all
    threads of this process). ``clear`` drops the events of earlier profiles first. Per-engine
    totals: :meth:`MoEEngine.profile_summary`; the events: :func:`write_chrome_trace`.
    """
    if clear:
        _core.trace_clear()
    was_on = bool(_core.trace_enabled())
    _core.trace_enable(True)
    try:
        yield
    finally:
        _core.trace_enable(was_on)


def profiling() -> bool:
    """True while the profiler is on."""
    return bool(_core.trace_enabled())


def clear_trace() -> None:
    """Forget the recorded trace events."""
    _core.trace_clear()


def write_chrome_trace(path: str | os.PathLike[str]) -> int:
    """Write the recorded events as Chrome trace JSON (load in chrome://tracing or
    https://ui.perfetto.dev); returns the number of events written (metadata excluded).

    Events are complete (``"ph": "X"``) events with ``ts``/``dur`` in microseconds; ``cat`` is
    ``"call"`` for a whole load/forward/backward, ``"phase"`` for its phases (``args``: the
    engine's ``MoEEngine.engine_id`` and the tokens of the call, 0 for a load) and ``"worker"``
    for one pool thread's share of a phase (``args``: the tasks it ran, and ``group`` = the
    tensor-parallel slice in the per-slice phases of a ``tp > 1`` engine).
    """
    text = _core.trace_chrome_json()
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        f.write(text)
    return int(_core.trace_event_count())
