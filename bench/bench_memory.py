"""Host memory of LoRA training steps by depth, tokens, checkpointing and activation policy.

Each row is one training step (forward + backward, expert LoRA through PEFT) of a random
qwen3_moe-shaped model in a fresh process (kt_sft.memory_probe): peak RSS growth over the loaded
model, and the engine's peak bytes by kind (kt_kernels.memory_stats(): cache = entries of
pending forwards, scratch = the process-wide buffers) next to `kt-sft estimate`'s prediction.
Rows whose estimate does not fit in half the memory available are skipped (and say so).

Then the time of one engine layer step (forward + backward) under `recompute` against `retain`,
measured in one process, alternating, medians.

`--engine-only` runs the engines alone (no PyTorch model): L engines, and the order of engine
calls each mode makes (no checkpointing: L cached forwards, then L backwards; checkpointing: L
forwards without cache, then per layer a cached forward and its backward), with the same peak
bytes by kind and the process's peak RSS growth — fast enough for every depth.

    python bench/bench_memory.py                 # the full table (takes a while)
    python bench/bench_memory.py --engine-only   # the engine's part for every depth
    python bench/bench_memory.py --quick         # 2 and 4 layers at T=1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

MIB = 1024**2
MODES = {  # label -> (checkpointing, policy)
    "none": ("none", "retain"),
    "reentrant": ("reentrant", "retain"),
    "non-reentrant": ("non_reentrant", "retain"),
    "recompute": ("none", "recompute"),
}


def _available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def engine_row(cfg: dict[str, Any]) -> dict[str, Any]:
    """One --engine-only row, in this process (see the module docstring)."""
    import gc

    import numpy as np

    import kt_kernels as kk
    from kt_sft.memory_probe import _reset_peak, _rss

    L, T, mode = cfg["layers"], cfg["tokens"], cfg["mode"]
    E, K, H, inter, r = (
        cfg["experts"],
        cfg["top_k"],
        cfg["hidden"],
        cfg["intermediate"],
        cfg["rank"],
    )
    checkpointing, policy = MODES[mode]
    rng = np.random.default_rng(0)
    engines, keep = [], []
    shapes = {
        "a_gate_up": (E, r, H),
        "b_gate_up": (E, 2 * inter, r),
        "a_down": (E, r, inter),
        "b_down": (E, H, r),
    }
    for _ in range(L):
        eng = kk.MoEEngine(E, K, H, inter, lora_rank=r, max_tokens=T, activation_policy=policy)
        eng.load_weights(
            gate_up=(rng.standard_normal((E, 2 * inter, H), np.float32) * 0.05),
            down=(rng.standard_normal((E, H, inter), np.float32) * 0.05),
        )
        arrays = {k: rng.standard_normal(v, np.float32) * 0.05 for k, v in shapes.items()}
        arrays.update({"grad_" + k: np.zeros(v, np.float32) for k, v in shapes.items()})
        eng.set_lora(**arrays)
        engines.append(eng)
        keep.append(arrays)
    x = rng.standard_normal((T, H), np.float32)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    w = rng.random((T, K), np.float32)
    out = np.empty((T, H), np.float32)
    dx = np.empty((T, H), np.float32)
    dw = np.empty((T, K), np.float32)
    gc.collect()
    base, _ = _rss()
    _reset_peak()
    kk.reset_memory_peaks()
    if checkpointing == "none":
        for eng in engines:
            eng.forward(x, ids, w, out, save_for_backward=True)
        for eng in reversed(engines):
            eng.backward(x, dx, dw, x=x)
    else:
        for eng in engines:
            eng.forward(x, ids, w, out, save_for_backward=False)
        for eng in reversed(engines):
            eng.forward(x, ids, w, out, save_for_backward=True)
            eng.backward(x, dx, dw, x=x)
    _, peak = _rss()
    return {"rss_growth": peak - base, "engine": kk.memory_stats()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="2,8,16,32", help="comma list of depths")
    p.add_argument("--tokens", default="2048,8192", help="comma list of tokens per step")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="2 and 4 layers at T=1024")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--time-reps", type=int, default=7, help="timed steps per policy")
    p.add_argument(
        "--engine-only",
        action="store_true",
        help="the engines alone, no PyTorch model (see the module docstring)",
    )
    p.add_argument(
        "--timing-only",
        action="store_true",
        help="only the recompute / retain step time of one layer",
    )
    p.add_argument("--engine-row", default=None, help=argparse.SUPPRESS)
    args, _ = p.parse_known_args(argv)  # nox passes the same arguments to every bench script
    if args.engine_row:
        print(json.dumps(engine_row(json.loads(args.engine_row))))
        return 0

    from kt_sft.estimate import ModelShape, estimate_memory
    from kt_sft.memory_probe import ProbeConfig, _time_one_layer, measure

    if args.quick:
        args.layers, args.tokens = "2,4", "1024"
    layers = [int(v) for v in args.layers.split(",")]
    tokens = [int(v) for v in args.tokens.split(",")]
    modes = [] if args.timing_only else [m.strip() for m in args.modes.split(",")]
    shape_kw = {
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_experts": args.experts,
        "top_k": args.top_k,
        "lora_rank": args.rank,
    }
    print(
        ("engines only (no PyTorch model), " if args.engine_only else "")
        + f"qwen3_moe-shaped: H={args.hidden}, I={args.intermediate}, {args.experts} experts "
        f"top-{args.top_k}, LoRA r={args.rank} on the experts, bf16 experts"
        + ("" if args.engine_only else ", fp32 PyTorch side")
        + "; MiB"
    )
    head = (
        f"{'layers':>6} {'T':>5} {'mode':<13} {'RSS growth':>10} {'estimate':>9} "
        f"{'cache':>8} {'scratch':>8} {'cache+scr':>9} {'weights':>8}"
    )
    print(head)
    print("-" * len(head))
    rows: list[dict[str, Any]] = []
    for T in tokens:
        for L in layers:
            for mode in modes:
                checkpointing, policy = MODES[mode]
                shape = ModelShape(
                    num_experts=args.experts,
                    num_moe_layers=L,
                    hidden_size=args.hidden,
                    intermediate_size=args.intermediate,
                    top_k=args.top_k,
                )
                est = estimate_memory(
                    shape,
                    lora_rank=args.rank,
                    max_tokens=T,
                    policy=policy,
                    checkpointing=checkpointing,
                    non_expert_on_gpu=args.engine_only,
                )
                row: dict[str, Any] = {
                    "layers": L,
                    "tokens": T,
                    "mode": mode,
                    "estimate": est.step_growth,
                }
                if est.step_growth + 2 * est.experts > 0.5 * _available():
                    row["skipped"] = (
                        f"estimate {est.step_growth / MIB:,.0f} MiB does not fit "
                        "in half the available memory"
                    )
                    print(f"{L:>6} {T:>5} {mode:<13} skipped: {row['skipped']}", flush=True)
                    rows.append(row)
                    continue
                if args.engine_only:
                    got = _engine_row_process(
                        {
                            "layers": L,
                            "tokens": T,
                            "mode": mode,
                            "experts": args.experts,
                            "top_k": args.top_k,
                            "hidden": args.hidden,
                            "rank": args.rank,
                            "intermediate": args.intermediate,
                        }
                    )
                else:
                    got = measure(
                        ProbeConfig(
                            layers=L,
                            tokens=T,
                            checkpointing=checkpointing,
                            policy=policy,
                            **shape_kw,
                        )
                    )
                e = got["engine"]
                row.update(
                    rss_growth=got["rss_growth"],
                    cache=e["cache_peak_bytes"],
                    scratch=e["scratch_peak_bytes"],
                    weights=e["weights_bytes"],
                    engine=e,
                )
                print(
                    f"{L:>6} {T:>5} {mode:<13} {got['rss_growth'] / MIB:>10,.0f} "
                    f"{est.step_growth / MIB:>9,.0f} {row['cache'] / MIB:>8,.0f} "
                    f"{row['scratch'] / MIB:>8,.0f} "
                    f"{(row['cache'] + row['scratch']) / MIB:>9,.0f} "
                    f"{row['weights'] / MIB:>8,.0f}",
                    flush=True,
                )
                rows.append(row)
    timing: dict[str, Any] = {}
    for T in tokens:
        times = _time_one_layer(ProbeConfig(layers=1, tokens=T, **shape_kw), reps=args.time_reps)
        keep, again = statistics.median(times["retain"]), statistics.median(times["recompute"])
        timing[str(T)] = {
            "retain_s": keep,
            "recompute_s": again,
            "ratio": again / keep,
            "samples": times,
        }
        print(
            f"one layer step at T={T}: retain {keep * 1e3:,.1f} ms, recompute "
            f"{again * 1e3:,.1f} ms (median of {args.time_reps}, alternating): "
            f"recompute / retain = {again / keep:.2f}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "timing": timing}, f, indent=1)
    return 0


def _engine_row_process(cfg: dict[str, Any]) -> dict[str, Any]:
    import subprocess

    proc = subprocess.run(
        [sys.executable, __file__, "--engine-row", json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"engine row {cfg} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
