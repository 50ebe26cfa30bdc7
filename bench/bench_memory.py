"""Host memory of LoRA training steps by depth, tokens, checkpointing and activation policy.

Each row is one training step (forward + backward, expert LoRA through PEFT) of a random
qwen3_moe-shaped model in a fresh process (kt_sft.memory_probe): peak RSS growth over the loaded
model, and the engine's peak bytes by kind (kt_kernels.memory_stats(): cache = entries of
pending forwards, scratch = the process-wide buffers) next to `kt-sft estimate`'s prediction.
Rows whose estimate does not fit in half the memory available are skipped (and say so).

Then the time of one engine layer step (forward + backward) under `recompute` against `retain`,
measured in one process, alternating, medians.

    python bench/bench_memory.py                 # the full table (takes a while)
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
    args, _ = p.parse_known_args(argv)  # nox passes the same arguments to every bench script

    from kt_sft.estimate import ModelShape, estimate_memory
    from kt_sft.memory_probe import ProbeConfig, _time_one_layer, measure

    if args.quick:
        args.layers, args.tokens = "2,4", "1024"
    layers = [int(v) for v in args.layers.split(",")]
    tokens = [int(v) for v in args.tokens.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    shape_kw = {"hidden_size": args.hidden, "intermediate_size": args.intermediate,
                "num_experts": args.experts, "top_k": args.top_k, "lora_rank": args.rank}
    print(f"qwen3_moe-shaped: H={args.hidden}, I={args.intermediate}, {args.experts} experts "
          f"top-{args.top_k}, LoRA r={args.rank} on the experts, bf16 experts, fp32 PyTorch side;"
          " MiB")
    head = (f"{'layers':>6} {'T':>5} {'mode':<13} {'RSS growth':>10} {'estimate':>9} "
            f"{'cache':>8} {'scratch':>8} {'cache+scr':>9} {'weights':>8}")
    print(head)
    print("-" * len(head))
    rows: list[dict[str, Any]] = []
    for T in tokens:
        for L in layers:
            for mode in modes:
                checkpointing, policy = MODES[mode]
                shape = ModelShape(num_experts=args.experts, num_moe_layers=L,
                                   hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   top_k=args.top_k)
                est = estimate_memory(shape, lora_rank=args.rank, max_tokens=T, policy=policy,
                                      checkpointing=checkpointing)
                row: dict[str, Any] = {"layers": L, "tokens": T, "mode": mode,
                                       "estimate": est.step_growth}
                if est.step_growth + 2 * est.experts > 0.5 * _available():
                    row["skipped"] = (f"estimate {est.step_growth / MIB:,.0f} MiB does not fit "
                                      "in half the available memory")
                    print(f"{L:>6} {T:>5} {mode:<13} skipped: {row['skipped']}", flush=True)
                    rows.append(row)
                    continue
                got = measure(ProbeConfig(layers=L, tokens=T, checkpointing=checkpointing,
                                          policy=policy, **shape_kw))
                e = got["engine"]
                row.update(rss_growth=got["rss_growth"], cache=e["cache_peak_bytes"],
                           scratch=e["scratch_peak_bytes"], weights=e["weights_bytes"],
                           engine=e)
                print(f"{L:>6} {T:>5} {mode:<13} {got['rss_growth'] / MIB:>10,.0f} "
                      f"{est.step_growth / MIB:>9,.0f} {row['cache'] / MIB:>8,.0f} "
                      f"{row['scratch'] / MIB:>8,.0f} "
                      f"{(row['cache'] + row['scratch']) / MIB:>9,.0f} "
                      f"{row['weights'] / MIB:>8,.0f}", flush=True)
                rows.append(row)
    timing: dict[str, Any] = {}
    for T in tokens:
        times = _time_one_layer(ProbeConfig(layers=1, tokens=T, **shape_kw), reps=args.time_reps)
        keep, again = statistics.median(times["retain"]), statistics.median(times["recompute"])
        timing[str(T)] = {"retain_s": keep, "recompute_s": again, "ratio": again / keep,
                          "samples": times}
        print(f"one layer step at T={T}: retain {keep * 1e3:,.1f} ms, recompute "
              f"{again * 1e3:,.1f} ms (median of {args.time_reps}, alternating): "
              f"recompute / retain = {again / keep:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "timing": timing}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
