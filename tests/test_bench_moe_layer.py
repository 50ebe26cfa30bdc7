"""bench/bench_moe_layer.py measures as docs/performance.md says: rows in alternating rounds,
medians over rounds, ratios per round, the peak as the best of its samples."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_moe_layer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_moe_layer", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def _run(fwd: list[float], bwd: list[float], **extra) -> dict:
    return {
        "fwd": fwd,
        "bwd": bwd,
        "cpu": [f + b for f, b in zip(fwd, bwd)],
        "isa": "scalar",
        "peak_rss": 100,
        "load_peak_rss": 50,
        **extra,
    }


def test_summarize_row_takes_medians_over_rounds_and_ratios_per_round(bench) -> None:
    case = bench.SHAPES["small"][0]
    # Round medians of the step: ours 0.010, 0.030, 0.020 s; torch 0.040, 0.060, 0.080 s.
    ours = [
        _run([0.004, 0.005, 0.009], [0.005, 0.005, 0.001]),
        _run([0.010, 0.020, 0.010], [0.020, 0.010, 0.030], peak_rss=300),
        _run([0.010, 0.010, 0.015], [0.010, 0.010, 0.010]),
    ]
    torch = [
        _run([0.02, 0.02, 0.03], [0.02, 0.02, 0.03]),
        _run([0.03, 0.03, 0.03], [0.03, 0.03, 0.03]),
        _run([0.04, 0.04, 0.04], [0.04, 0.04, 0.04]),
    ]
    row = bench.summarize_row(case, 2, "bf16", ours, [900.0, 1100.0, 1000.0, 950.0], torch)
    assert row["rounds"] == 3
    assert row["round_total_ms"] == pytest.approx([10.0, 30.0, 20.0])
    assert row["total_ms"] == pytest.approx(20.0)
    assert row["fwd_ms"] == pytest.approx(statistics.median([5.0, 10.0, 10.0]))
    assert row["bwd_ms"] == pytest.approx(statistics.median([5.0, 20.0, 10.0]))
    assert row["torch_total_ms"] == pytest.approx(60.0)
    # Per round 4.0, 2.0, 4.0: the median of the ratios, not 60 / 20 = 3.0.
    assert row["speedup"] == pytest.approx(4.0)
    assert row["peak_gflops"] == 1100.0
    assert row["gflops"] == pytest.approx((case.fwd_flops() + case.bwd_flops()) / 0.020 / 1e9)
    assert row["peak_rss_bytes"] == 300
    assert bench.round_ratios([10.0, 30.0, 20.0], [5.0, 10.0, 20.0]) == pytest.approx(2.0)


def test_summarize_row_without_torch(bench) -> None:
    case = bench.SHAPES["small"][0]
    row = bench.summarize_row(case, 1, "int8", [_run([0.01], [0.02])], [500.0], None)
    assert row["speedup"] is None and row["torch_total_ms"] is None
    assert row["total_ms"] == pytest.approx(30.0)


def test_bench_runs_rounds_end_to_end(tmp_path: Path) -> None:
    """The real driver on the small shape: two rounds of the peak, the torch loop and the engine
    in subprocesses; the JSON rows carry what the table printed."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCH), "--shapes", "small", "--threads", "1", "--rounds", "2"]
    cmd += ["--reps", "1", "--warmup", "0", "--weight-dtypes", "bf16", "--no-decode"]
    proc = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())
    assert row["rounds"] == 2 and len(row["round_total_ms"]) == 2
    assert row["total_ms"] == pytest.approx(statistics.median(row["round_total_ms"]))
    # A peak sample before each round and one after the last.
    assert len(row["peak_samples_gflops"]) == 3
    assert row["peak_gflops"] == max(row["peak_samples_gflops"]) > 0
    assert row["speedup"] > 0 and row["torch_total_ms"] > 0
    assert "1 -> 2 threads" not in proc.stdout  # one thread count: no scaling line
    assert "2 round(s) per shape" in proc.stdout


def test_bench_without_peak_or_torch(tmp_path: Path) -> None:
    """--no-torch --no-peak (what a machine without torch gets): engine rows only, no %peak."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCH), "--shapes", "small", "--threads", "1", "--rounds", "1"]
    cmd += ["--reps", "1", "--warmup", "0", "--weight-dtypes", "bf16", "--no-decode"]
    cmd += ["--no-torch", "--no-peak", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())
    assert row["peak_gflops"] is None and row["peak_samples_gflops"] == []
    assert row["speedup"] is None and row["total_ms"] > 0
    assert "peak: not measured" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("small"))
    assert "%" not in line  # no share of a peak that was not measured
