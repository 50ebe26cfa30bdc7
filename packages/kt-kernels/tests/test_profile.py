"""The profiler: kk.profile(), MoEEngine.profile_summary(), kk.write_chrome_trace()."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
from kk_helpers import make_engine, run
from kk_reference import make_case

import kt_kernels as kk

FWD = ["route", "convert", "gather", "gate_up", "lora_down_a", "down", "combine"]
BWD = ["convert", "gather", "down_t", "reduce", "gate_up_t", "combine"]


def test_profile_trace_and_summary(tmp_path) -> None:
    c = make_case(4, 2, 64, 48, 2, 9, seed=3)
    eng, _, _ = make_engine(c)
    run(eng, c)  # not profiled
    assert eng.profile_stats() == {}
    with kk.profile():
        assert kk.profiling()
        run(eng, c)
    assert not kk.profiling()
    run(eng, c)  # off again: recorded nothing
    path = tmp_path / "trace.json"
    n = kk.write_chrome_trace(path)
    doc = json.loads(path.read_text())  # valid JSON
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert n == len(events) == 2 + len(FWD) + len(BWD)
    calls = [e for e in events if e["cat"] == "call"]
    assert [e["name"] for e in calls] == ["forward", "backward"]
    for call, phases in zip(calls, (FWD, BWD)):
        inner = [
            e
            for e in events
            if e["cat"] == "phase"
            and e["tid"] == call["tid"]
            and call["ts"] <= e["ts"]
            and e["ts"] + e["dur"] <= call["ts"] + call["dur"] + 1e-3
        ]
        # One event per phase, in order, nested in the call on the same thread, not overlapping.
        assert [e["name"] for e in inner] == phases
        for a, b in pairwise(inner):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-3
        assert all(
            e["args"]["engine"] == eng.engine_id and e["args"]["tokens"] == c.T
            for e in [*inner, call]
        )
    assert any(e["ph"] == "M" and e["name"] == "thread_name" for e in doc["traceEvents"])
    stats = eng.profile_stats()
    assert stats["forward.total"]["calls"] == 1 and stats["backward.gate_up_t"]["calls"] == 1
    assert set(stats) == {f"forward.{p}" for p in [*FWD, "total"]} | {
        f"backward.{p}" for p in [*BWD, "total"]
    }
    table = eng.profile_summary()
    assert table.splitlines()[0].split()[0] == "phase" and "forward.gate_up" in table
    eng.reset_profile()
    assert eng.profile_stats() == {}
    kk.clear_trace()
    assert json.loads(open(path).read())  # file untouched; buffer cleared
    assert kk.write_chrome_trace(tmp_path / "empty.json") == 0
    eng.close()


def test_profile_worker_events_nest(tmp_path) -> None:
    c = make_case(8, 2, 64, 96, 2, 40, seed=4)
    eng, _, _ = make_engine(c, threads=2)
    with kk.profile():
        run(eng, c)
    kk.write_chrome_trace(tmp_path / "t.json")
    events = [
        e for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e["ph"] == "X"
    ]
    calls = [e for e in events if e["cat"] == "call"]
    phases = [e for e in events if e["cat"] == "phase"]
    workers = [e for e in events if e["cat"] == "worker"]
    assert len(calls) == 2 and len(phases) == len(FWD) + len(BWD)
    assert workers and all(e["args"]["tasks"] >= 1 for e in workers)
    caller = calls[0]["tid"]
    # On the calling thread each worker span lies inside one phase event (proper nesting).
    for w in (e for e in workers if e["tid"] == caller):
        assert any(
            p["ts"] <= w["ts"] + 1e-3 and w["ts"] + w["dur"] <= p["ts"] + p["dur"] + 1e-3
            for p in phases
        ), w
    eng.close()


LOAD = {"bf16": ["alloc", "pack"], "int8": ["alloc", "quantize"], "int4": ["alloc", "quantize"]}


def test_profile_load_phases(tmp_path) -> None:
    c = make_case(4, 2, 128, 64, 0, 5, seed=6)
    engines = []
    with kk.profile():
        for wd in ("bf16", "int8", "int4"):
            eng = kk.MoEEngine(c.E, c.K, c.H, c.I, weight_dtype=wd, group_size=64, num_threads=2)
            eng.load_weights(gate_up=c.gate_up, down=c.down)
            engines.append((wd, eng, LOAD[wd]))
        pre = kk.MoEEngine(c.E, c.K, c.H, c.I, weight_dtype="int4", group_size=64, num_threads=1)
        q = {n: kk.quantize_weights(getattr(c, n), "int4", 64) for n in ("gate_up", "down")}
        pre.load_quantized_weights(
            gate_up=q["gate_up"][0],
            gate_up_scale=q["gate_up"][1],
            down=q["down"][0],
            down_scale=q["down"][1],
        )
        engines.append(("int4 pre-quantized", pre, ["alloc", "copy_codes"]))
    path = tmp_path / "load.json"
    n = kk.write_chrome_trace(path)
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert n == len(events)
    for what, eng, phases in engines:
        mine = [
            e
            for e in events
            if e["cat"] in ("call", "phase") and e["args"]["engine"] == eng.engine_id
        ]
        calls = [e for e in mine if e["cat"] == "call"]
        assert [e["name"] for e in calls] == ["load"], what
        call = calls[0]
        inner = [e for e in mine if e["cat"] == "phase"]
        # One event per phase, in order, inside the load event on the same thread.
        assert [e["name"] for e in inner] == phases, what
        for e in inner:
            assert e["tid"] == call["tid"] and e["args"]["tokens"] == 0
            assert call["ts"] <= e["ts"] and e["ts"] + e["dur"] <= call["ts"] + call["dur"] + 1e-3
        for a, b in pairwise(inner):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-3
        stats = eng.profile_stats()
        assert set(stats) == {f"load.{p}" for p in [*phases, "total"]}, what
        assert all(stats[k]["calls"] == 1 for k in stats)
        table = eng.profile_summary().splitlines()
        assert [row.split()[0] for row in table[1:]] == [f"load.{p}" for p in [*phases, "total"]]
        times = eng.last_timings()
        assert set(times) == {f"load.{p}" for p in [*phases, "total"]}, what
        assert times["load.total"] >= max(times[f"load.{p}"] for p in phases)
        eng.close()


def test_last_timings_keep_load_after_forward() -> None:
    c = make_case(4, 2, 64, 48, 0, 7, seed=8)
    eng = kk.MoEEngine(c.E, c.K, c.H, c.I, weight_dtype="int8", num_threads=1)
    eng.load_weights(gate_up=c.gate_up, down=c.down)  # not profiled: timings are kept anyway
    out = np.zeros((c.T, c.H), dtype=np.float32)
    eng.forward(c.x, c.ids, c.w, out, save_for_backward=False)
    times = eng.last_timings()
    assert {"load.alloc", "load.quantize", "load.total", "forward.gate_up", "forward.total"} <= set(
        times
    )
    eng.load_weights(gate_up=c.gate_up, down=c.down)  # a second load replaces the load.* entries
    assert {k for k in eng.last_timings() if k.startswith("load.")} == {
        "load.alloc",
        "load.quantize",
        "load.total",
    }
    eng.close()
