"""Per-layer timings of the routed experts as a Chrome trace (``chrome://tracing``, Perfetto).

Enabled by ``KTConfig(profile="trace.json")`` (or ``KT_PROFILE``): every engine forward and
backward of every layer becomes a span on the ``kt experts`` track, with the engine's own phase
timings (``MoEEngine.last_timings()``: routing sort, gate/up, down, LoRA, ... when the engine
reports them) as nested spans, and host<->device copies included in the outer span. The trace is
written when the model is closed (:func:`kt_sft.close`), at interpreter exit, or on demand with
:func:`write_trace`.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["Tracer", "tracer", "write_trace"]


class Tracer:
    """Collects complete ("X") events; thread-safe; written as Chrome trace JSON."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._paths: set[str] = set()
        self._lock = threading.Lock()
        self._origin = time.perf_counter_ns()
        self._registered = False

    def enable(self, path: str) -> None:
        """Remember ``path`` as an output (written at exit and by :func:`write_trace`)."""
        with self._lock:
            self._paths.add(os.fspath(path))
            if not self._registered:
                atexit.register(self.flush)
                self._registered = True

    def span(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        *,
        phases: dict[str, float] | None = None,
        args: dict[str, Any] | None = None,
    ) -> None:
        """Record ``name`` from ``start_ns`` to ``end_ns`` (``time.perf_counter_ns``) and, inside
        it, one span per engine phase (milliseconds, laid out in order)."""
        ts = (start_ns - self._origin) / 1000.0
        events = [
            {
                "name": name,
                "cat": "kt",
                "ph": "X",
                "ts": ts,
                "dur": (end_ns - start_ns) / 1000.0,
                "pid": os.getpid(),
                "tid": "kt experts",
                "args": args or {},
            }
        ]
        cursor = ts
        for phase, ms in (phases or {}).items():
            events.append(
                {
                    "name": phase,
                    "cat": "kt.engine",
                    "ph": "X",
                    "ts": cursor,
                    "dur": ms * 1000.0,
                    "pid": os.getpid(),
                    "tid": "kt experts",
                }
            )
            cursor += ms * 1000.0
        with self._lock:
            self._events.extend(events)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the events recorded so far to ``path`` (atomically); returns the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            data = {"traceEvents": list(self._events), "displayTimeUnit": "ms"}
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, target)
        return target

    def flush(self) -> None:
        """Write every enabled path."""
        with self._lock:
            paths = sorted(self._paths)
        for path in paths:
            try:
                self.write(path)
            except OSError:  # pragma: no cover - best effort at exit
                pass

    def clear(self) -> None:
        with self._lock:
            self._events.clear()


tracer = Tracer()


def write_trace(path: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write the kt trace to ``path``, or to every ``KTConfig.profile`` path in use."""
    if path is not None:
        return [tracer.write(path)]
    tracer.flush()
    return [Path(p) for p in sorted(tracer._paths)]
