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
(https://ui.perfetto.dev or chrome://tracing opens it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["ExpertTimer", "Timeline", "find_expert_modules", "union_seconds"]

_TIDS = {"step": 1, "phase": 2, "experts": 3, "engine": 4}
_TNAMES = {1: "training steps", 2: "forward / backward / optimizer", 3: "routed experts (CPU)",
           4: "engine phases"}
#: Order in which the engine runs its phases (MoEEngine.last_timings keys); others follow.
_PHASE_ORDER = {
    "forward": ("route", "gather", "convert", "gate_up", "down", "combine"),
    "backward": ("gather", "convert", "down_t", "gate_up_t", "reduce", "combine"),
}


class Timeline:
    """Intervals (name, lane, start, end, args) in perf_counter seconds."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.events: list[tuple[str, str, float, float, dict[str, Any]]] = []
        self.origin = time.perf_counter()

    def add(self, name: str, lane: str, start: float, end: float, **args: Any) -> None:
        if self.enabled:
            self.events.append((name, lane, start, end, args))

    @contextmanager
    def span(self, name: str, lane: str = "phase", **args: Any) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, lane, start, time.perf_counter(), **args)

    def total(self, lane: str, name: str | None = None) -> float:
        return union_seconds([(s, e) for n, ln, s, e, _ in self.events
                              if ln == lane and (name is None or n == name)])

    def write_chrome_trace(self, path: Path, metadata: dict[str, Any] | None = None) -> None:
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "kt-sft train"}}]
        for tid, tname in _TNAMES.items():
            events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid,
                           "args": {"name": tname}})
        for name, lane, start, end, args in self.events:
            events.append({"name": name, "cat": lane, "ph": "X", "pid": 1,
                           "tid": _TIDS.get(lane, 9),
                           "ts": round((start - self.origin) * 1e6, 3),
                           "dur": round(max(end - start, 0.0) * 1e6, 3), "args": args})
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                                   "otherData": metadata or {}}), encoding="utf-8")
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
            if name.split(".")[-1] == "experts" and not any(name.startswith(t + ".")
                                                            for t in taken):
                taken.append(name)
                found.append((len(found), mod))
        return found


def _engine_of(module: Any) -> Any:
    """The kt-kernels engine (or reference backend) serving an experts module, if any."""
    for sub in module.modules():
        layer = sub.__dict__.get("_kt_engine")
        if layer is not None:
            return getattr(layer, "backend", None)
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
        self.fwd: list[tuple[float, float]] = []
        self.bwd: list[tuple[float, float]] = []
        self._handles: list[Any] = []
        self._fwd_start: dict[int, float] = {}
        self._bwd_start: dict[int, list[float]] = {}
        self._mark = _marker_class()
        self._engines: dict[int, Any] = {}
        self.num_layers = 0
        self.engine_phases = False

    def attach(self, model: Any) -> int:
        """Hook every experts module; returns how many were found."""
        modules = find_expert_modules(model)
        for layer, module in modules:
            self._engines[layer] = _engine_of(module)
            self._handles.append(module.register_forward_pre_hook(self._pre(layer),
                                                                  with_kwargs=True))
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
            if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) \
                    and args[0].requires_grad:
                args = (self._mark.apply(args[0], lambda: self._bwd_end(layer)), *args[1:])
                return args, kwargs
            return None

        return hook

    def _post(self, layer: int) -> Any:
        import torch

        def hook(module: Any, args: tuple, output: Any) -> Any:
            end = time.perf_counter()
            start = self._fwd_start.pop(layer, end)
            self.fwd.append((start, end))
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
        self.bwd.append((start, end))
        self.timeline.add(f"experts bwd L{layer}", "experts", start, end, layer=layer)
        self._phases(layer, "backward", start)

    def _phases(self, layer: int, kind: str, start: float) -> None:
        engine = self._engines.get(layer)
        timings = getattr(engine, "last_timings", None)
        if timings is None or not self.timeline.enabled:
            return
        try:
            ms = {k.split(".", 1)[1]: v for k, v in timings().items()
                  if k.startswith(kind + ".") and not k.endswith(".total")}
        except Exception:  # a closed or foreign engine: no breakdown
            return
        self.engine_phases = True
        order = [p for p in _PHASE_ORDER[kind] if p in ms] + \
            sorted(p for p in ms if p not in _PHASE_ORDER[kind])
        t = start
        for phase in order:
            dur = ms[phase] / 1e3
            self.timeline.add(f"{kind} {phase}", "engine", t, t + dur, layer=layer, ms=ms[phase])
            t += dur

    @property
    def forward_seconds(self) -> float:
        return union_seconds(self.fwd)

    @property
    def total_seconds(self) -> float:
        return union_seconds(self.fwd + self.bwd)

    @property
    def backward_seconds(self) -> float:
        """Backward time not spent in (re)computed forwards."""
        return self.total_seconds - self.forward_seconds
