"""Benchmark one MoE experts layer (forward + backward with LoRA) against PyTorch on this CPU.

Prints one table: our forward / backward / total milliseconds, a PyTorch eager baseline of the same
math (per-expert loop with index_select / index_add, bf16, LoRA as separate matmuls, autograd
backward), PyTorch's dense bf16 matmul GFLOP/s at a comparable shape (the practical peak of this
machine), our GFLOP/s and its share of that peak, the speed-up over PyTorch, and our peak RSS.

Every measurement runs in a fresh subprocess, so peak RSS belongs to one engine and one shape.
Rows are measured in rounds (--rounds, default 3; 1 with --quick): each round runs the peak, the
torch baseline and every engine row of a shape at every thread count, odd rounds in reverse order,
so the machine's drift reaches ours and the baseline alike. ms are medians over rounds of each run's
median step; the speed-up over torch, the ratios to bf16 and the 1 -> 2 thread scaling are medians
of the per-round ratios; the peak is the best of its samples before each round and after the last.

    python bench/bench_moe_layer.py                   # all shapes, 1 and 2 threads
    python bench/bench_moe_layer.py --quick           # fewer repetitions, 2 threads, T <= 1024
    python bench/bench_moe_layer.py --shapes small --threads 1,2
    python bench/bench_moe_layer.py --quick --weight-dtypes bf16,int8-w8a8
    python bench/bench_moe_layer.py --decode-only     # only the small-T inference rows (below)

Weight types (--weight-dtypes): bf16, int8 and int4 store the frozen weights so and compute in
bf16; int8-w8a8 is weight_dtype="int8" with activation_dtype="int8" (int8 x int8 GEMMs in forward,
straight-through backward on the weight-only int8 path); int8-w8a8-bwd8 adds backward_dtype="int8"
(backward's dx products int8 x int8 too).

Small-T rows ("decode", on by default; --no-decode skips them, --decode-tokens picks T): inference
forwards (no LoRA, no activation cache) at the qwen3-30b-a3b sizes with T = 1, 8, 32 tokens, i.e.
0.06 to 2 rows per expert, the case of decoding. Each step routes to other experts (weights come
from memory, as in decoding), and the same inputs run through bf16 weights and through int8 / int4
weights with the fused dequantize + GEMM kernels forced on and off (KT_KERNELS_FUSED_DEQUANT=1 / 0);
the ratios come from the same run. One process holds the five engines and runs them in turns, step
by step, so load from other processes disturbs all paths alike.

FLOP count (stated in the output too), per layer call, with T tokens, top-k K, hidden H,
intermediate I, LoRA rank r:
    forward  = 2 T K (3 H I + r (2 H + 3 I))        base GEMMs + LoRA (A shared by gate and up)
    backward = 2 x forward                          the convention for training steps
The backward computes dx (and dw, LoRA grads) but no base-weight grads; its own GEMM work is about
the forward's, so "2 x forward" follows the stated convention rather than the work done. The
output states both the convention and the GFLOP/s under the work actually done (forward counted
once more for backward).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Case:
    name: str
    E: int
    K: int
    H: int
    I: int  # noqa: E741
    r: int
    T: int

    def fwd_flops(self) -> float:
        return 2.0 * self.T * self.K * (3 * self.H * self.I + self.r * (2 * self.H + 3 * self.I))

    def bwd_flops(self) -> float:
        return 2.0 * self.fwd_flops()

    def weight_bytes(self) -> int:
        return self.E * 3 * self.H * self.I * 2


SHAPES: dict[str, list[Case]] = {
    "small": [Case("small", E=8, K=2, H=1024, I=512, r=8, T=512)],
    "qwen3-30b-a3b": [
        Case("qwen3-30b-a3b", E=128, K=8, H=2048, I=768, r=8, T=1024),
        Case("qwen3-30b-a3b", E=128, K=8, H=2048, I=768, r=8, T=4096),
    ],
}


# ---------------------------------------------------------------------------------------------
# Workers (run in subprocesses)
# ---------------------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(case: Case, torch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.T, case.H, generator=g).to(torch.bfloat16)
    logits = torch.randn(case.T, case.E, generator=g)
    top, ids = logits.topk(case.K, dim=-1)
    w = torch.softmax(top, dim=-1).float()
    dout = torch.randn(case.T, case.H, generator=g).to(torch.bfloat16)
    return x, ids.to(torch.int64), w, dout


def _weights(case: Case, torch):
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(case.E, 2 * case.I, case.H, generator=g) * case.H**-0.5).to(
        torch.bfloat16
    )
    down = (torch.randn(case.E, case.H, case.I, generator=g) * case.I**-0.5).to(torch.bfloat16)
    return gate_up, down


def _lora(case: Case, torch, dtype):
    g = torch.Generator().manual_seed(2)
    E, H, I, r = case.E, case.H, case.I, case.r  # noqa: E741
    return {
        "a_gate_up": (torch.randn(E, r, H, generator=g) * H**-0.5).to(dtype),
        "b_gate_up": (torch.randn(E, 2 * I, r, generator=g) * 0.01).to(dtype),
        "a_down": (torch.randn(E, r, I, generator=g) * I**-0.5).to(dtype),
        "b_down": (torch.randn(E, H, r, generator=g) * 0.01).to(dtype),
    }


def _time_loop(step, warmup: int, reps: int) -> list[tuple[float, float]]:
    for _ in range(warmup):
        step()
    return [step() for _ in range(reps)]


def worker_ours(
    case: Case, threads: int, warmup: int, reps: int, isa: str | None, weight_dtype: str = "bf16"
) -> dict:
    """Our engine, fed NumPy arrays (no torch in this process, so its RSS is the engine's)."""
    import ml_dtypes
    import numpy as np

    import kt_kernels as kk

    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    E, K, H, I, r, T = case.E, case.K, case.H, case.I, case.r, case.T  # noqa: E741

    def randn(shape, scale, dtype):
        out = np.empty(shape, dtype=dtype)
        for e in range(shape[0]):  # one expert at a time: no full-size fp32 temporary
            out[e] = (rng.standard_normal(shape[1:], dtype=np.float32) * scale).astype(dtype)
        return out

    gate_up = randn((E, 2 * I, H), H**-0.5, bf16)
    down = randn((E, H, I), I**-0.5, bf16)
    activation_dtype = backward_dtype = "bf16"
    if weight_dtype == "int8-w8a8":
        weight_dtype, activation_dtype = "int8", "int8"
    elif weight_dtype == "int8-w8a8-bwd8":
        weight_dtype, activation_dtype, backward_dtype = "int8", "int8", "int8"
    eng = kk.MoEEngine(
        E,
        K,
        H,
        I,
        lora_rank=r,
        lora_alpha=2.0 * r,
        max_tokens=T,
        num_threads=threads,
        isa=isa,
        weight_dtype=weight_dtype,
        activation_dtype=activation_dtype,
        backward_dtype=backward_dtype,
    )
    eng.load_weights(gate_up=gate_up, down=down)
    del gate_up, down  # the engine owns its packed copy; the source goes
    load_peak = _peak_rss_bytes()
    lora = {
        "a_gate_up": randn((E, r, H), H**-0.5, np.float32),
        "b_gate_up": randn((E, 2 * I, r), 0.01, np.float32),
        "a_down": randn((E, r, I), I**-0.5, np.float32),
        "b_down": randn((E, H, r), 0.01, np.float32),
    }
    grads = {f"grad_{k}": np.zeros_like(v) for k, v in lora.items()}
    eng.set_lora(**lora, **grads)
    x = rng.standard_normal((T, H), dtype=np.float32).astype(bf16)
    logits = rng.standard_normal((T, E), dtype=np.float32)
    ids = np.argsort(-logits, axis=1)[:, :K].astype(np.int64)
    top = np.take_along_axis(logits, ids, axis=1)
    w = np.exp(top - top.max(axis=1, keepdims=True))
    w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    dout = rng.standard_normal((T, H), dtype=np.float32).astype(bf16)
    out = np.empty((T, H), dtype=bf16)
    dx = np.empty((T, H), dtype=bf16)
    dw = np.empty((T, K), dtype=np.float32)
    reset = _reset_peak_rss()

    cpu = []

    def step():
        c0, t0 = time.process_time(), time.perf_counter()
        eng.forward(x, ids, w, out, save_for_backward=True)
        t1 = time.perf_counter()
        eng.backward(dout, dx, dw)
        t2 = time.perf_counter()
        cpu.append(time.process_time() - c0)
        return t1 - t0, t2 - t1

    times = _time_loop(step, warmup, reps)
    res = {
        "fwd": [t[0] for t in times],
        "bwd": [t[1] for t in times],
        "isa": eng.isa,
        "cpu": cpu[warmup:],
        "peak_rss": _peak_rss_bytes(),
        "peak_rss_is_run_only": reset,
        "load_peak_rss": load_peak,
        "phases": eng.last_timings(),
        "resident_weight_bytes": eng.memory_stats().get("weight_bytes"),
        "load_average": os.getloadavg()[0],
    }
    eng.close()
    return res


def worker_torch(case: Case, threads: int, warmup: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    gate_up, down = _weights(case, torch)
    lora = {k: v.requires_grad_() for k, v in _lora(case, torch, torch.bfloat16).items()}
    x0, ids, w0, dout = _inputs(case, torch)
    scale = 2.0  # alpha / r
    I = case.I  # noqa: E741

    def forward(x, w):
        out = torch.zeros_like(x)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=case.E).tolist()
        tok = order // case.K
        wsel = w.reshape(-1).index_select(0, order)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = tok[start : start + n]
            xe = x.index_select(0, rows)
            gu = xe @ gate_up[e].T + scale * (
                (xe @ lora["a_gate_up"][e].T) @ lora["b_gate_up"][e].T
            )
            g, u = gu[:, :I], gu[:, I:]
            h = F.silu(g) * u
            y = h @ down[e].T + scale * ((h @ lora["a_down"][e].T) @ lora["b_down"][e].T)
            out = out.index_add(0, rows, y * wsel[start : start + n, None].to(y.dtype))
            start += n
        return out

    cpu = []

    def step():
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        c0, t0 = time.process_time(), time.perf_counter()
        out = forward(x, w)
        t1 = time.perf_counter()
        out.backward(dout)
        t2 = time.perf_counter()
        cpu.append(time.process_time() - c0)
        return t1 - t0, t2 - t1

    times = _time_loop(step, warmup, reps)
    return {"fwd": [t[0] for t in times], "bwd": [t[1] for t in times], "cpu": cpu[warmup:]}


def worker_peak(case: Case, threads: int, warmup: int, reps: int) -> dict:
    """Dense bf16 matmul GFLOP/s: all T tokens through one gate_up-sized product (T x H x 2I)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(case.T, case.H).to(torch.bfloat16)
    b = torch.randn(case.H, 2 * case.I).to(torch.bfloat16)
    flops = 2.0 * case.T * case.H * 2 * case.I
    inner = max(1, int(2e10 / flops))  # ~20 GFLOP per sample

    def step():
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        return (time.perf_counter() - t0) / inner, 0.0

    times = _time_loop(step, warmup + 1, max(reps, 3) * 2)
    return {"gflops": flops / min(t[0] for t in times) / 1e9, "shape": [case.T, case.H, 2 * case.I]}


DECODE_CASE = Case("qwen3-30b-a3b", E=128, K=8, H=2048, I=768, r=0, T=1)
# (label, weight_dtype, KT_KERNELS_FUSED_DEQUANT) per decode column.
DECODE_PATHS = [
    ("bf16", "bf16", "auto"),
    ("int8 dequant", "int8", "0"),
    ("int8 fused", "int8", "1"),
    ("int4 dequant", "int4", "0"),
    ("int4 fused", "int4", "1"),
]


def worker_decode(
    case: Case, tokens: list[int], threads: int, warmup: int, reps: int, isa: str | None
) -> dict:
    """Inference forwards at small T through every path of DECODE_PATHS, taking turns."""
    import ml_dtypes
    import numpy as np

    import kt_kernels as kk

    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    E, K, H, I = case.E, case.K, case.H, case.I  # noqa: E741

    def randn(shape, scale):
        out = np.empty(shape, dtype=bf16)
        for e in range(shape[0]):
            out[e] = (rng.standard_normal(shape[1:], dtype=np.float32) * scale).astype(bf16)
        return out

    gate_up = randn((E, 2 * I, H), H**-0.5)
    down = randn((E, H, I), I**-0.5)
    steps = max(warmup + reps, 8)  # distinct routings, cycled: each step reads other experts

    def inputs(T):
        xs, idss, ws = [], [], []
        for _ in range(steps):
            logits = rng.standard_normal((T, E), dtype=np.float32)
            ids = np.argsort(-logits, axis=1)[:, :K].astype(np.int64)
            top = np.take_along_axis(logits, ids, axis=1)
            w = np.exp(top - top.max(axis=1, keepdims=True))
            xs.append(rng.standard_normal((T, H), dtype=np.float32).astype(bf16))
            idss.append(ids)
            ws.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
        return xs, idss, ws

    data = {T: inputs(T) for T in tokens}
    res: dict = {"paths": {}, "load_ms": {}}
    engines = {}
    for label, wd, mode in DECODE_PATHS:
        os.environ["KT_KERNELS_FUSED_DEQUANT"] = mode  # read when the engine is created
        eng = kk.MoEEngine(
            E,
            K,
            H,
            I,
            max_tokens=max(tokens),
            num_threads=threads,
            isa=isa,
            weight_dtype=wd,
            group_size=128,
        )
        eng.load_weights(gate_up=gate_up, down=down)
        res["isa"] = eng.isa
        res["load_ms"][label] = {
            k: v for k, v in eng.last_timings().items() if k.startswith("load.")
        }
        engines[label] = eng
    # The paths take turns step by step, so a change in the machine's load hits all of them alike.
    for T in tokens:
        xs, idss, ws = data[T]
        out = np.empty((T, H), dtype=bf16)
        times: dict[str, list[float]] = {label: [] for label in engines}
        for i in range(warmup + reps):
            j = i % steps
            for label, eng in engines.items():
                t0 = time.perf_counter()
                eng.forward(xs[j], idss[j], ws[j], out, save_for_backward=False)
                times[label].append(time.perf_counter() - t0)
        for label in engines:
            res["paths"].setdefault(label, {})[str(T)] = min(times[label][warmup:])
    for eng in engines.values():
        eng.close()
    return res


def print_decode(
    case: Case, tokens: list[int], threads: int, res: dict, steps: str = "step"
) -> list[dict]:
    labels = [p[0] for p in DECODE_PATHS]
    print(
        f"\nsmall T (decode-like): inference forward, no LoRA, {case.name} sizes (E={case.E} "
        f"K={case.K} H={case.H} I={case.I}), {threads} threads, isa {res['isa']}; ms per forward "
        f"(best {steps}; every step routes to other experts); load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    header = f"{'T':>4}{'rows/exp':>9}" + "".join(f"{lb:>14}" for lb in labels)
    header += f"{'int8 f/d':>10}{'int4 f/d':>10}{'int8 f/bf16':>12}{'int4 f/bf16':>12}"
    print(header)
    print("-" * len(header))
    rows = []
    for T in tokens:
        ms = {lb: 1e3 * res["paths"][lb][str(T)] for lb in labels}
        sp = {
            "int8": ms["int8 dequant"] / ms["int8 fused"],
            "int4": ms["int4 dequant"] / ms["int4 fused"],
        }
        vs = {"int8": ms["bf16"] / ms["int8 fused"], "int4": ms["bf16"] / ms["int4 fused"]}
        print(
            f"{T:>4}{T * case.K / case.E:>9.2f}"
            + "".join(f"{ms[lb]:>14.2f}" for lb in labels)
            + f"{sp['int8']:>9.2f}x{sp['int4']:>9.2f}x{vs['int8']:>11.2f}x{vs['int4']:>11.2f}x"
        )
        rows.append({"decode": True, "T": T, "threads": threads, "isa": res["isa"], "ms": ms})
    print(
        "f/d: fused over dequantize + gemm_bf16 (same weights, KT_KERNELS_FUSED_DEQUANT=1 vs 0); "
        "f/bf16: fused int8 / int4 over bf16 weights; > 1 means faster."
    )
    loads = res["load_ms"]
    print(
        "weight load, ms (load.* phases): "
        + "; ".join(
            f"{lb}: " + ", ".join(f"{k[5:]} {v:.0f}" for k, v in loads[lb].items())
            for lb in ("bf16", "int8 fused", "int4 fused")
        )
    )
    return rows


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def run_worker(
    kind: str,
    case: Case,
    threads: int,
    warmup: int,
    reps: int,
    isa: str | None,
    weight_dtype: str | None = None,
    decode_tokens: list[int] | None = None,
) -> dict:
    """Run one worker (--worker KIND: ours, torch, peak or decode) in a fresh process with
    `threads` threads and return the JSON result it prints. weight_dtype goes to the "ours"
    worker, decode_tokens to the "decode" worker."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--case",
        json.dumps(asdict(case)),
        "--threads",
        str(threads),
        "--warmup",
        str(warmup),
        "--reps",
        str(reps),
    ]
    if isa:
        cmd += ["--isa", isa]
    if weight_dtype is not None:
        cmd += ["--weight-dtypes", weight_dtype]
    if decode_tokens is not None:
        cmd += ["--decode-tokens", ",".join(map(str, decode_tokens))]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), KT_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed for {case} threads={threads}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _round_times(res: dict) -> dict:
    """One worker run (one round of one row): median forward, backward and step seconds of its
    timed steps."""
    return {
        "fwd": statistics.median(res["fwd"]),
        "bwd": statistics.median(res["bwd"]),
        "total": statistics.median([f + b for f, b in zip(res["fwd"], res["bwd"])]),
    }


def summarize_row(
    case: Case,
    threads: int,
    weight_dtype: str,
    ours_rounds: list[dict],
    peak_samples: list[float],
    torch_rounds: list[dict] | None,
) -> dict:
    """One table row from its rounds: ms are medians over rounds of each run's median step; the
    speed-up over torch is the median of the per-round ratios (each round's torch run is the
    neighbour of that round's engine runs); the peak is the best of every peak sample of the case
    and thread count, taken before each round and after the last."""
    ours = [_round_times(r) for r in ours_rounds]
    total = statistics.median([o["total"] for o in ours])
    torch_total = speedup = torch_cpu = None
    if torch_rounds:
        tt = [_round_times(r)["total"] for r in torch_rounds]
        torch_total = statistics.median(tt)
        speedup = statistics.median([t / o["total"] for t, o in zip(tt, ours)])
        torch_cpu = statistics.median([statistics.median(r["cpu"]) for r in torch_rounds])
    last = ours_rounds[-1]
    return {
        "case": asdict(case),
        "threads": threads,
        "weight_dtype": weight_dtype,
        "isa": last["isa"],
        "rounds": len(ours_rounds),
        "fwd_ms": statistics.median([o["fwd"] for o in ours]) * 1e3,
        "bwd_ms": statistics.median([o["bwd"] for o in ours]) * 1e3,
        "total_ms": total * 1e3,
        "round_total_ms": [o["total"] * 1e3 for o in ours],
        "torch_total_ms": torch_total * 1e3 if torch_total else None,
        "speedup": speedup,
        "peak_gflops": max(peak_samples) if peak_samples else None,
        "peak_samples_gflops": list(peak_samples),
        "gflops": (case.fwd_flops() + case.bwd_flops()) / total / 1e9,
        "work_gflops": 2 * case.fwd_flops() / total / 1e9,
        "peak_rss_bytes": max(r["peak_rss"] for r in ours_rounds),
        "load_peak_rss_bytes": max(r["load_peak_rss"] for r in ours_rounds),
        "weight_bytes": case.weight_bytes(),
        "resident_weight_bytes": last.get("resident_weight_bytes"),
        "phases_ms": last.get("phases", {}),
        "cpu_s_per_step": statistics.median([statistics.median(r["cpu"]) for r in ours_rounds]),
        "torch_cpu_s_per_step": torch_cpu,
        "load_average": max(r.get("load_average", 0.0) for r in ours_rounds),
    }


def round_ratios(num: list[float], den: list[float]) -> float:
    """The median over rounds of num[i] / den[i] (two rows measured in the same rounds)."""
    return statistics.median([a / b for a, b in zip(num, den)])


def _print_row(r: dict) -> None:
    c = r["case"]
    total = r["total_ms"]
    torch_total = r["torch_total_ms"]
    speed = f"{r['speedup']:7.2f}x" if r["speedup"] else f"{'-':>8}"
    tms = f"{torch_total:10.1f}" if torch_total else f"{'-':>10}"
    busy = r["load_average"] > (os.cpu_count() or 1) + 0.5
    peak = r["peak_gflops"]
    rss = r["peak_rss_bytes"]

    def share(gflops: float) -> str:
        return f"{100 * gflops / peak:6.0f}%" if peak else f"{'-':>7}"

    peak_col = f"{peak:8.0f}" if peak else f"{'-':>8}"
    print(
        f"{c['name']:<15}{c['T']:>6}{r['threads']:>4} {r['isa']:<12}{r['weight_dtype']:>10}"
        f"{r['fwd_ms']:9.1f}{r['bwd_ms']:9.1f}{total:9.1f}{tms}{speed}{peak_col}"
        f"{r['gflops']:9.0f}{share(r['gflops'])}{r['work_gflops']:10.0f}"
        f"{share(r['work_gflops'])}{rss / 2**30:8.2f}"
        f"{rss / r['weight_bytes']:7.2f}{'  (busy machine)' if busy else ''}",
        flush=True,
    )


def run_case(
    case: Case,
    thread_list: list[int],
    dtypes: list[str],
    rounds: int,
    warmup: int,
    reps: int,
    isa: str | None,
    no_torch: bool,
    no_peak: bool = False,
) -> list[dict]:
    """Every row of one case, measured in `rounds` rounds. A round runs the peak, the torch
    baseline and the engine for every weight type at every thread count, each in its own process;
    odd rounds run that sequence in reverse, so no row always follows the same neighbour and the
    machine's drift reaches ours and the baseline alike. One more peak sample per thread count
    follows the last round (no peak at all with no_peak). Prints the case's rows and returns
    them."""
    peaks: dict[int, list[float]] = {t: [] for t in thread_list}
    torch_runs: dict[int, list[dict]] = {t: [] for t in thread_list}
    ours_runs: dict[tuple[int, str], list[dict]] = {
        (t, wd): [] for t in thread_list for wd in dtypes
    }
    for rnd in range(rounds):
        seq: list[tuple[str, int, str | None]] = []
        for threads in thread_list:
            if not no_peak:
                seq.append(("peak", threads, None))
            if not no_torch:
                seq.append(("torch", threads, None))
            seq += [("ours", threads, wd) for wd in dtypes]
        if rnd % 2 == 1:
            seq.reverse()
        for kind, threads, wd in seq:
            if kind == "peak":
                peaks[threads].append(
                    run_worker("peak", case, threads, warmup, reps, None)["gflops"]
                )
            elif kind == "torch":
                torch_runs[threads].append(run_worker("torch", case, threads, warmup, reps, None))
            else:
                ours_runs[(threads, wd)].append(
                    run_worker("ours", case, threads, warmup, reps, isa, wd)
                )
    for threads in thread_list:
        if not no_peak:
            peaks[threads].append(run_worker("peak", case, threads, warmup, reps, None)["gflops"])
    rows = []
    for threads in thread_list:
        for wd in dtypes:
            rows.append(
                summarize_row(
                    case,
                    threads,
                    wd,
                    ours_runs[(threads, wd)],
                    peaks[threads],
                    None if no_torch else torch_runs[threads],
                )
            )
            _print_row(rows[-1])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes",
        default=None,
        help="comma list of shapes: small, qwen3-30b-a3b (T=1024 and 4096), or "
        "qwen3-30b-a3b:T for one token count (default: all)",
    )
    p.add_argument("--threads", default=None, help="comma list of thread counts (default: 1,2)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 warm-up + 2 timed steps, 2 threads, qwen3 only at T=1024",
    )
    p.add_argument("--reps", type=int, default=None, help="timed steps per measurement")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of every row of a shape, alternating (default 3; 1 with --quick)",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    p.add_argument("--isa", default=None, help="force the engine's ISA (default: best runnable)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager baseline")
    p.add_argument(
        "--no-peak",
        action="store_true",
        help="skip PyTorch's dense matmul peak (and the %%peak columns); implied, with --no-torch, "
        "where torch is not installed",
    )
    p.add_argument(
        "--weight-dtypes",
        default="bf16,int8,int4,int8-w8a8,int8-w8a8-bwd8",
        help="comma list of frozen-weight storage types to run (bf16, int8, int4; "
        "int8-w8a8: int8 weights and int8 activations; int8-w8a8-bwd8: also "
        'backward_dtype="int8")',
    )
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--no-decode", action="store_true", help="skip the small-T inference rows")
    p.add_argument("--decode-only", action="store_true", help="only the small-T inference rows")
    p.add_argument(
        "--decode-tokens", default="1,8,32", help="T of the small-T rows (default 1,8,32)"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    decode_tokens = [int(t) for t in args.decode_tokens.split(",") if t.strip()]
    if args.worker:
        case = Case(**json.loads(args.case))
        threads = int(args.threads)
        fn = {
            "ours": lambda: worker_ours(
                case, threads, args.warmup, args.reps, args.isa, args.weight_dtypes
            ),
            "torch": lambda: worker_torch(case, threads, args.warmup, args.reps),
            "peak": lambda: worker_peak(case, threads, args.warmup, args.reps),
            "decode": lambda: worker_decode(
                case, decode_tokens, threads, args.warmup, args.reps, args.isa
            ),
        }[args.worker]
        print(json.dumps(fn()))
        return 0

    warmup = args.warmup if args.warmup is not None else 1
    reps = args.reps if args.reps is not None else (2 if args.quick else 3)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1 or reps < 1:
        p.error("--rounds and --reps must be at least 1")
    if args.threads:
        thread_list = [int(t) for t in args.threads.split(",")]
    else:
        thread_list = [2] if args.quick else [1, 2]
    cases: list[Case] = []
    names = args.shapes.split(",") if args.shapes else list(SHAPES)
    for name in names:
        base, _, tokens = name.partition(":")
        if base not in SHAPES:
            p.error(f"--shapes: unknown shape {base!r}; expected one of {', '.join(SHAPES)}")
        for c in SHAPES[base]:
            if tokens and c.T != int(tokens):
                continue
            if args.quick and not tokens and c.T > 1024:
                continue
            cases.append(c)
        if tokens and not any(c.name == base and c.T == int(tokens) for c in cases):
            cases.append(Case(**{**asdict(SHAPES[base][0]), "T": int(tokens)}))

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    import kt_kernels as kk

    if importlib.util.find_spec("torch") is None and not args.decode_only:
        if not args.no_torch:
            p.error(
                "torch is not installed: pass --no-torch (the engine rows need only kt-kernels)"
            )
        args.no_peak = True
    print(f"kt-kernels {kk.__version__}, CPU: {cpu}, {os.cpu_count()} logical CPUs")
    if not args.decode_only:
        print(
            f"{rounds} round(s) per shape, each running every row (peak, torch, ours per weight "
            f"type and thread count) in its own process, odd rounds in reverse order; per run "
            f"{reps} timed steps after {warmup} warm-up; ms are medians over rounds of each run's "
            f"median step; speed-ups and ratios are medians of the per-round ratios; load average "
            f"now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print(
            "FLOPs: forward = 2 T K (3 H I + r (2 H + 3 I)); backward = 2 x forward (convention); "
            "total = fwd + bwd."
        )
        peak_note = (
            "peak: not measured (--no-peak, or torch not installed). "
            if args.no_peak
            else "peak: PyTorch dense bf16 matmul T x H x 2I, same threads, best of its samples "
            "before each round and after the last. "
        )
        print(peak_note + "'work GFLOP/s' counts backward as 1 x forward (no base-weight grads).\n")

    dtypes = [d.strip() for d in args.weight_dtypes.split(",") if d.strip()]
    if args.decode_only:
        cases = []
    header = (
        f"{'shape':<15}{'T':>6}{'thr':>4} {'isa':<12}{'weights':>10}{'fwd ms':>9}{'bwd ms':>9}{'total':>9}"
        f"{'torch ms':>10}{'speedup':>8}{'peak':>8}{'GFLOP/s':>9}{'%peak':>7}"
        f"{'work GF/s':>10}{'%peak':>7}{'RSS GB':>8}{'RSS/W':>7}"
    )
    if cases:
        print(header)
        print("-" * len(header))
    results = []
    for case in cases:
        results += run_case(
            case, thread_list, dtypes, rounds, warmup, reps, args.isa, args.no_torch, args.no_peak
        )
    by_key = {
        (r["case"]["name"], r["case"]["T"], r["threads"]): r
        for r in results
        if r["weight_dtype"] == "bf16"
    }
    quant = [
        (r, by_key.get((r["case"]["name"], r["case"]["T"], r["threads"])))
        for r in results
        if r["weight_dtype"] != "bf16"
    ]
    if any(base for _, base in quant):
        print(
            "\nspeed vs bf16 (same shape and threads; median over rounds of the per-round "
            "ratio): "
            + ", ".join(
                f"{r['weight_dtype']} {r['case']['name']} T={r['case']['T']} thr={r['threads']}: "
                f"{round_ratios(base['round_total_ms'], r['round_total_ms']):.2f}x"
                for r, base in quant
                if base
            )
        )
    every = {
        (r["weight_dtype"], r["case"]["name"], r["case"]["T"], r["threads"]): r for r in results
    }
    scaling = [
        (k, round_ratios(every[(*k[:3], 1)]["round_total_ms"], r["round_total_ms"]))
        for k, r in every.items()
        if k[3] == 2 and (*k[:3], 1) in every
    ]
    if scaling:
        print(
            "\n1 -> 2 threads (median over rounds of the per-round ratio): "
            + ", ".join(f"{wd} {n} T={t}: {s:.2f}x" for (wd, n, t, _), s in scaling)
        )
    if cases:
        print(
            "RSS: peak resident set during forward/backward (after loading; the source weights "
            "freed); RSS/W: that over the bf16 bytes of the base weights."
        )
    if not args.no_decode:
        decode_reps = max(3 * reps, 9)  # forwards of a few tokens: cheap, so more samples
        for threads in thread_list:
            res = run_worker(
                "decode",
                DECODE_CASE,
                threads,
                2,
                decode_reps,
                args.isa,
                decode_tokens=decode_tokens,
            )
            steps = f"of {decode_reps} timed steps after 2 warm-up steps"
            results += print_decode(DECODE_CASE, decode_tokens, threads, res, steps)
    print(
        f"load average at the end: {os.getloadavg()[0]:.1f}. '(busy machine)': the load average "
        "exceeded the CPU count during that row, so other processes shared the cores."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
