"""Timing of a training run: time in the routed experts vs everything else, and a Chrome trace.

`ExpertTimer` hooks the routed-experts module of every MoE layer (found through the kt-models
registry, PEFT wrappers included). Forward time is measured between the module's pre- and
post-forward hooks. Backward time is measured with two identity autograd nodes placed around the
module: one on its output (its backward runs when the experts' backward is about to start) and one
on its input (its backward runs once the experts' input gradient is ready). Forward recomputation
under gradient checkpointing happens inside backward; totals are unions of intervals, so nothing
is counted twice. On CPU the experts run synchronously and these are wall-clock times of the
engine calls; with CUDA, times of the PyTorch side are host-side and only approximate.

Where the engine reports its own per-phase timings (`MoEEngine.last_timings()`: routing, gather,
gate/up, down, combine ... in milliseconds), each experts call is broken down into those phases in
the trace, laid out in the engine's order from the start of the call.

`Timeline` collects named intervals and writes them in the Chrome trace event format
(https://ui.perfetto.dev or chrome://tracing opens it). Its memory is bounded on runs of any
length: the trace keeps the newest `max_events` intervals (a ring buffer; the trace's metadata
says how many older ones were dropped), and the totals (`Timeline.total`, `ExpertTimer`'s
seconds) are kept as running sums, folded at the end of every training step.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kt_sft.experts_backend import ExpertsBackend

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "ExpertTimer",
    "IntervalUnion",
    "Timeline",
    "find_expert_modules",
    "union_seconds",
]

#: Intervals a Timeline keeps for the trace (about 30 MB at most); older ones are dropped.
DEFAULT_MAX_EVENTS = 100_000

_TIDS = {"step": 1, "phase": 2, "experts": 3, "engine": 4}
_TNAMES = {
    1: "training steps",
    2: "forward / backward / optimizer",
    3: "routed experts (CPU)",
    4: "engine phases",
}
#: Order in which the engine runs its phases (MoEEngine.last_timings keys); others follow.
_PHASE_ORDER = {
    "forward": ("route", "gather", "convert", "gate_up", "down", "combine"),
    "backward": ("gather", "convert", "down_t", "gate_up_t", "reduce", "combine"),
}


class IntervalUnion:
    """Length of the union of [start, end) intervals added over time, in bounded memory.

    Intervals are kept until :meth:`fold` with a horizon that no later interval starts before
    (the end of a training step); everything up to the horizon is then summed into a number.
    """

    def __init__(self) -> None:
        self.folded = 0.0
        self.pending: list[tuple[float, float]] = []

    def add(self, start: float, end: float) -> None:
        self.pending.append((start, end))

    def fold(self, horizon: float) -> None:
        """Sum the parts of the pending intervals before ``horizon`` into the running total."""
        if not self.pending:
            return
        merged: list[list[float]] = []
        for s, e in sorted(self.pending):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        keep: list[tuple[float, float]] = []
        for s, e in merged:
            if e <= horizon:
                self.folded += e - s
            elif s < horizon:
                self.folded += horizon - s
                keep.append((horizon, e))
            else:
                keep.append((s, e))
        self.pending = keep

    @property
    def seconds(self) -> float:
        return self.folded + union_seconds(self.pending)


class Timeline:
    """Intervals (name, lane, start, end, args) in perf_counter seconds: the newest
    ``max_events`` for the trace, and running totals per lane and per (lane, name)."""

    def __init__(self, enabled: bool = True, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.enabled = enabled
        self.max_events = max_events
        self.events: deque[tuple[str, str, float, float, dict[str, Any]]] = deque(maxlen=max_events)
        self.recorded = 0
        self.origin = time.perf_counter()
        self._totals: dict[tuple[str, str | None], IntervalUnion] = {}
        #: other unions folded with this timeline's (ExpertTimer's)
        self.followers: list[IntervalUnion] = []

    @property
    def dropped(self) -> int:
        """Intervals recorded but no longer kept for the trace (the oldest ones)."""
        return self.recorded - len(self.events)

    def add(self, name: str, lane: str, start: float, end: float, **args: Any) -> None:
        if not self.enabled:
            return
        self.events.append((name, lane, start, end, args))
        self.recorded += 1
        for key in ((lane, None), (lane, name)):
            union = self._totals.get(key)
            if union is None:
                union = self._totals[key] = IntervalUnion()
            union.add(start, end)
        if lane == "step":  # a step ended: nothing later starts before its end
            self.fold(end)

    def fold(self, horizon: float) -> None:
        """Fold every running total up to ``horizon`` (see :class:`IntervalUnion`)."""
        for union in self._totals.values():
            union.fold(horizon)
        for union in self.followers:
            union.fold(horizon)

    @contextmanager
    def span(self, name: str, lane: str = "phase", **args: Any) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, lane, start, time.perf_counter(), **args)

    def total(self, lane: str, name: str | None = None) -> float:
        """Seconds covered by the intervals of ``lane`` (named ``name``), dropped ones included."""
        union = self._totals.get((lane, name))
        return union.seconds if union is not None else 0.0

    def write_chrome_trace(self, path: Path, metadata: dict[str, Any] | None = None) -> None:
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "kt-sft train"}}
        ]
        for tid, tname in _TNAMES.items():
            events.append(
                {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": tname}}
            )
        for name, lane, start, end, args in self.events:
            events.append(
                {
                    "name": name,
                    "cat": lane,
                    "ph": "X",
                    "pid": 1,
                    "tid": _TIDS.get(lane, 9),
                    "ts": round((start - self.origin) * 1e6, 3),
                    "dur": round(max(end - start, 0.0) * 1e6, 3),
                    "args": args,
                }
            )
        other = dict(metadata or {})
        if self.dropped:
            other["dropped_events"] = self.dropped
            other["note"] = (
                f"the trace keeps the newest {self.max_events} intervals; "
                f"{self.dropped} older ones were dropped (totals include them)"
            )
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(
            json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}),
            encoding="utf-8",
        )
        os.replace(tmp, path)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def find_expert_modules(model: Any) -> list[tuple[int, Any]]:
    """(layer index, routed-experts module) of every MoE layer, outermost PEFT wrapper included.

    Uses the kt-models registry; falls back to modules named `*.experts` for unregistered models.
    """
    try:
        from kt_models import get_arch_spec, unwrap_model

        base = unwrap_model(model)
        spec = get_arch_spec(base)
        return [(i, spec.experts(base, i)) for i in spec.moe_layer_indices(base.config)]
    except Exception:
        found, taken = [], []
        for name, mod in model.named_modules():
            if name.split(".")[-1] == "experts" and not any(
                name.startswith(t + ".") for t in taken
            ):
                taken.append(name)
                found.append((len(found), mod))
        return found


def _backend_of(module: Any) -> ExpertsBackend | None:
    """The experts backend (engine, reference or distributed proxy) serving an experts module,
    if any."""
    for sub in module.modules():
        layer = sub.__dict__.get("_kt_engine")
        if layer is not None:
            return layer.experts_backend
    return None


def _marker_class() -> Any:
    import torch

    class _Mark(torch.autograd.Function):
        """Identity whose backward calls `callback()` (records a time)."""

        @staticmethod
        def forward(ctx: Any, x: Any, callback: Any) -> Any:
            ctx.callback = callback
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            ctx.callback()
            return grad, None

    return _Mark


class ExpertTimer:
    """Measures forward and backward time of the routed experts of every MoE layer."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.fwd = IntervalUnion()
        self.all = IntervalUnion()  # forward and backward intervals
        timeline.followers += [self.fwd, self.all]
        self._handles: list[Any] = []
        self._fwd_start: dict[int, float] = {}
        self._bwd_start: dict[int, list[float]] = {}
        self._mark = _marker_class()
        self._backends: dict[int, ExpertsBackend | None] = {}
        self.num_layers = 0
        self.engine_phases = False

    def attach(self, model: Any) -> int:
        """Hook every experts module; returns how many were found."""
        modules = find_expert_modules(model)
        for layer, module in modules:
            self._backends[layer] = _backend_of(module)
            self._handles.append(
                module.register_forward_pre_hook(self._pre(layer), with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._post(layer)))
        self.num_layers = len(modules)
        return self.num_layers

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, layer: int) -> Any:
        import torch

        def hook(module: Any, args: tuple, kwargs: dict) -> Any:
            self._fwd_start[layer] = time.perf_counter()
            if (
                torch.is_grad_enabled()
                and args
                and isinstance(args[0], torch.Tensor)
                and args[0].requires_grad
            ):
                args = (self._mark.apply(args[0], lambda: self._bwd_end(layer)), *args[1:])
                return args, kwargs
            return None

        return hook

    def _post(self, layer: int) -> Any:
        import torch

        def hook(module: Any, args: tuple, output: Any) -> Any:
            end = time.perf_counter()
            start = self._fwd_start.pop(layer, end)
            self.fwd.add(start, end)
            self.all.add(start, end)
            self.timeline.add(f"experts fwd L{layer}", "experts", start, end, layer=layer)
            self._phases(layer, "forward", start)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                return self._mark.apply(output, lambda: self._bwd_begin(layer))
            return None

        return hook

    def _bwd_begin(self, layer: int) -> None:
        self._bwd_start.setdefault(layer, []).append(time.perf_counter())

    def _bwd_end(self, layer: int) -> None:
        stack = self._bwd_start.get(layer)
        if not stack:
            return
        start, end = stack.pop(), time.perf_counter()
        self.all.add(start, end)
        self.timeline.add(f"experts bwd L{layer}", "experts", start, end, layer=layer)
        self._phases(layer, "backward", start)

    def _phases(self, layer: int, kind: str, start: float) -> None:
        backend = self._backends.get(layer)
        if backend is None or not self.timeline.enabled:
            return
        try:
            ms = {
                k.split(".", 1)[1]: v
                for k, v in backend.last_timings().items()
                if k.startswith(kind + ".") and not k.endswith(".total")
            }
        except Exception:  # a closed or foreign engine: no breakdown
            return
        self.engine_phases = True
        order = [p for p in _PHASE_ORDER[kind] if p in ms] + sorted(
            p for p in ms if p not in _PHASE_ORDER[kind]
        )
        t = start
        for phase in order:
            dur = ms[phase] / 1e3
            self.timeline.add(f"{kind} {phase}", "engine", t, t + dur, layer=layer, ms=ms[phase])
            t += dur

    @property
    def forward_seconds(self) -> float:
        return self.fwd.seconds

    @property
    def total_seconds(self) -> float:
        return self.all.seconds

    @property
    def backward_seconds(self) -> float:
        """Backward time not spent in (re)computed forwards."""
        return self.total_seconds - self.forward_seconds
