"""The training profiler's memory stays bounded on long runs, and its totals stay exact."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kt_sft.train.profiling import ExpertTimer, Timeline, union_seconds


def _simulate(tl: Timeline, timer: ExpertTimer, steps: int, layers: int, seed: int = 5):
    """Steps of forward / backward spans with per-layer experts intervals, the backward of a
    layer enclosing a recomputed forward (gradient checkpointing). Returns the exact totals."""
    rng = random.Random(seed)
    t = 0.0
    phases: dict[str, list[tuple[float, float]]] = {"forward": [], "backward": []}
    fwd: list[tuple[float, float]] = []
    every: list[tuple[float, float]] = []
    for step in range(steps):
        start = t
        for phase in ("forward", "backward"):
            p0 = t
            for layer in range(layers):
                a = t + rng.uniform(0.001, 0.002)
                b = a + rng.uniform(0.001, 0.003)
                if phase == "forward":
                    tl.add(f"experts fwd L{layer}", "experts", a, b)
                    timer.fwd.add(a, b)
                    timer.all.add(a, b)
                    fwd.append((a, b))
                else:  # recomputed forward nested in the backward
                    c = a + (b - a) / 4
                    d = a + (b - a) / 2
                    timer.fwd.add(c, d)
                    timer.all.add(c, d)
                    fwd.append((c, d))
                    timer.all.add(a, b)
                every.append((a, b))
                t = b
            tl.add(phase, "phase", p0, t)
            phases[phase].append((p0, t))
        t += 0.001
        tl.add(f"step {step + 1}", "step", start, t)
    return phases, fwd, every


def test_long_run_keeps_bounded_memory_and_exact_totals(tmp_path: Path) -> None:
    tl = Timeline()
    timer = ExpertTimer(tl)
    steps, layers = 4000, 24  # ~108k intervals: more than the trace keeps
    phases, fwd, every = _simulate(tl, timer, steps, layers)
    assert len(tl.events) <= 100_000
    assert tl.recorded == steps * (layers + 3) and tl.dropped == tl.recorded - len(tl.events)
    # running totals are folded every step: nothing accumulates
    assert len(timer.fwd.pending) <= 2 * layers and len(timer.all.pending) <= 2 * layers
    for phase, intervals in phases.items():
        assert tl.total("phase", phase) == pytest.approx(union_seconds(intervals), rel=1e-9)
    assert timer.forward_seconds == pytest.approx(union_seconds(fwd), rel=1e-9)
    assert timer.total_seconds == pytest.approx(union_seconds(every), rel=1e-9)
    path = tmp_path / "trace.json"
    tl.write_chrome_trace(path, {"source": "test"})
    data = json.loads(path.read_text())
    assert data["otherData"]["dropped_events"] == tl.dropped
    last = [e for e in data["traceEvents"] if e.get("ph") == "X"][-1]
    assert last["name"] == f"step {steps}"  # the newest events are the ones kept


def test_small_cap_and_bad_cap() -> None:
    tl = Timeline(max_events=3)
    for i in range(10):
        tl.add(f"e{i}", "phase", float(i), i + 0.5)
    assert [e[0] for e in tl.events] == ["e7", "e8", "e9"] and tl.dropped == 7
    assert tl.total("phase") == pytest.approx(5.0)
    with pytest.raises(ValueError, match="max_events"):
        Timeline(max_events=0)
