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

`--full-size` (not run by CI or nox: it writes about 57 GiB) is the full-size proof: it writes a
48-layer Qwen3-30B-A3B-shaped random checkpoint in the hub layout (per-expert bf16 tensors,
`model.safetensors.index.json`) tensor by tensor, so at most one tensor is in memory, then in a
fresh process loads it with `kt_sft.load_model` (int4 experts), puts PEFT LoRA on the experts and
the attention projections and trains 2 AdamW steps on random token ids; it reports the load
time, the RSS after loading, the peak RSS, the step time and the engine's bytes by kind.

    python bench/bench_memory.py --full-size --dir /data/qwen3-30b-a3b-random
    python bench/bench_memory.py --full-size --layers 2 --dir /tmp/fs2 --cleanup  # try it small
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _random_checkpoint import write_full_size_checkpoint

MIB = 1024**2
GIB = 1024**3
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
    # The caller's arrays are resident before the baseline (written here, not first by the
    # engine): their bytes are not the engine's.
    out = np.full((T, H), 0.0, np.float32)
    dx = np.full((T, H), 0.0, np.float32)
    dw = np.full((T, K), 0.0, np.float32)
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
    p.add_argument(
        "--layers",
        default=None,
        help="comma list of depths (default 2,8,16,32; with --full-size one depth, default 48)",
    )
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
    full = p.add_argument_group(
        "full-size proof (--full-size; --layers is one depth, default 48; --rank and --json "
        "apply too)"
    )
    full.add_argument(
        "--full-size",
        action="store_true",
        help="write a Qwen3-30B-A3B-shaped random checkpoint and train LoRA on it",
    )
    full.add_argument(
        "--dir",
        default=FULL_SIZE_DIR,
        help=f"checkpoint directory (default {FULL_SIZE_DIR}); an existing complete "
        "checkpoint of the same shape is reused, not rewritten",
    )
    full.add_argument("--steps", type=int, default=2, help="optimizer steps (default 2)")
    full.add_argument("--seq-len", type=int, default=1024, help="tokens per step (default 1024)")
    full.add_argument(
        "--weight-dtype",
        default="int4",
        choices=("bf16", "int8", "int4"),
        help="packed expert dtype (default int4)",
    )
    full.add_argument(
        "--policy",
        default="auto",
        choices=("retain", "recompute", "auto"),
        help="engine activation policy (default auto)",
    )
    full.add_argument(
        "--checkpointing",
        default="non_reentrant",
        choices=("none", "reentrant", "non_reentrant"),
        help="gradient checkpointing of the decoder layers (default non_reentrant)",
    )
    full.add_argument(
        "--loss",
        default="chunked",
        choices=("chunked", "full"),
        help="chunked: LM head + loss a few hundred tokens at a time, as kt-sft train does "
        "(default); full: the model's own loss over the whole logits tensor",
    )
    full.add_argument(
        "--shard-gib", type=float, default=4.0, help="shard size of the written checkpoint"
    )
    keep = full.add_mutually_exclusive_group()
    keep.add_argument(
        "--keep", dest="keep", action="store_true", default=True, help="keep it (default)"
    )
    keep.add_argument(
        "--cleanup", dest="keep", action="store_false", help="delete the checkpoint afterwards"
    )
    full.add_argument("--full-size-run", default=None, help=argparse.SUPPRESS)
    args, _ = p.parse_known_args(argv)  # nox passes the same arguments to every bench script
    if args.engine_row:
        print(json.dumps(engine_row(json.loads(args.engine_row))))
        return 0
    if args.full_size_run:
        print(json.dumps(full_size_train(json.loads(args.full_size_run))))
        return 0
    if args.full_size:
        if args.layers is not None and not args.layers.isdigit():
            p.error(f"--full-size takes one depth in --layers, got {args.layers!r}")
        return full_size(args)

    from kt_sft.estimate import ModelShape, estimate_memory
    from kt_sft.memory_probe import ProbeConfig, _time_one_layer, measure

    if args.quick:
        args.layers, args.tokens = "2,4", "1024"
    args.layers = args.layers or "2,8,16,32"
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


# ---- --full-size -------------------------------------------------------------------------------

FULL_SIZE_DIR = "/tmp/kt-qwen3-30b-a3b-random"


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def full_size_train(cfg: dict[str, Any]) -> dict[str, Any]:
    """The training half of --full-size, in this (fresh) process: load, LoRA, ``steps`` AdamW
    steps on random token ids; returns the measurements."""
    import torch
    from peft import LoraConfig

    import kt_kernels as kk
    import kt_sft
    from kt_sft.host_memory import malloc_tuned
    from kt_sft.loss import ChunkedCausalLMLoss

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(0)
    rank, T = cfg["rank"], cfg["tokens"]
    t0 = time.perf_counter()
    model = kt_sft.load_model(
        cfg["dir"],
        kt_sft.KTConfig(
            weight_dtype=cfg["weight_dtype"],
            lora_rank=rank,
            lora_alpha=2.0 * rank,
            max_tokens=T,
            activation_policy=cfg["policy"],
        ),
    )
    load_s = time.perf_counter() - t0
    rss_load, hwm_load = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    log(f"loaded in {load_s:,.1f} s: RSS {rss_load / GIB:,.2f} GiB, peak {hwm_load / GIB:,.2f} GiB")
    lora = LoraConfig(
        r=rank,
        lora_alpha=2.0 * rank,
        lora_dropout=0.0,
        # attention by leaf name; the experts through target_parameters (kt's engines)
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        **kt_sft.default_expert_lora_targets(model),
    )
    pm = kt_sft.get_peft_model(model, lora)
    pm.train()
    if cfg["checkpointing"] != "none":
        pm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": cfg["checkpointing"] == "reentrant"}
        )
        pm.enable_input_require_grads()
    # chunked: the LM head and loss a few hundred tokens at a time (as `kt-sft train` does);
    # full: the model's own loss over the whole logits tensor
    token_loss = ChunkedCausalLMLoss(pm) if cfg.get("loss", "chunked") == "chunked" else None
    params = [p for p in pm.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, pm.config.vocab_size, (1, T), generator=gen)
    rss_lora = _status_bytes("VmRSS")
    kk.reset_memory_peaks()
    steps: list[dict[str, float]] = []
    for step in range(cfg["steps"]):
        t = time.perf_counter()
        if token_loss is None:
            loss = pm(input_ids=ids, labels=ids).loss
        else:
            loss = token_loss(ids, None, ids) / (T - 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        value = loss.detach().item()
        steps.append(
            {
                "seconds": dt,
                "loss": value,
                "rss": _status_bytes("VmRSS"),
                # file-backed: the mmapped non-expert bf16 weights (clean, reclaimable pages)
                "rss_anon": _status_bytes("RssAnon"),
                "rss_file": _status_bytes("RssFile"),
                "peak_rss": _status_bytes("VmHWM"),
            }
        )
        log(
            f"step {step + 1}: {dt:,.1f} s ({T / dt:,.0f} tokens/s), loss {value:.4f}, "
            f"peak RSS {steps[-1]['peak_rss'] / GIB:,.2f} GiB"
        )
        del loss
    return {
        "config": cfg,
        "load_seconds": load_s,
        "rss_after_load": rss_load,
        "peak_rss_load": hwm_load,
        "rss_after_lora": rss_lora,
        "peak_rss": _status_bytes("VmHWM"),
        "trainable_params": trainable,
        "malloc_tuned": malloc_tuned(),
        "steps": steps,
        "engine": kk.memory_stats(),
    }


def full_size(args: argparse.Namespace) -> int:
    """--full-size: write (or reuse) the checkpoint, train on it in a fresh process, report."""
    from kt_sft.estimate import estimate_memory, shape_from_config

    layers = int(args.layers or 48)
    directory = Path(args.dir).expanduser().resolve()
    probe = directory
    while not probe.exists():
        probe = probe.parent
    print(f"free disk space at {probe}: {shutil.disk_usage(probe).free / GIB:,.1f} GiB")
    t0 = time.perf_counter()
    wrote = write_full_size_checkpoint(directory, layers, args.shard_gib)
    write_s = time.perf_counter() - t0
    cfg = {
        "dir": str(directory),
        "layers": layers,
        "tokens": args.seq_len,
        "steps": args.steps,
        "rank": args.rank,
        "weight_dtype": args.weight_dtype,
        "policy": args.policy,
        "checkpointing": args.checkpointing,
        "loss": args.loss,
    }
    est = estimate_memory(
        shape_from_config(directory),
        weight_dtype=args.weight_dtype,
        lora_rank=args.rank,
        max_tokens=args.seq_len,
        non_expert_bytes=2,  # the checkpoint's bf16
        policy=args.policy,
        checkpointing=args.checkpointing,
    )
    print(
        f"training {args.steps} steps of {args.seq_len} tokens in a fresh process ("
        f"{args.weight_dtype} experts, LoRA r={args.rank} on experts + attention, policy "
        f"{args.policy}, checkpointing {args.checkpointing}, {args.loss} loss); kt-sft estimate: "
        f"{est.total / GIB:,.2f} GiB",
        flush=True,
    )
    if est.total > _available():
        print(
            f"warning: the estimate is above the {_available() / GIB:,.1f} GiB available now; "
            "a smaller --rank or --seq-len lowers it",
            flush=True,
        )
    proc = subprocess.run(
        [sys.executable, __file__, "--full-size-run", json.dumps(cfg)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    if not args.keep:
        shutil.rmtree(directory)
    kept = f"kept: {directory} ({size / GIB:,.1f} GiB)" if args.keep else f"deleted {directory}"
    if proc.returncode != 0:
        print(f"training failed (exit status {proc.returncode}); checkpoint {kept}")
        return 1
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    e = r["engine"]
    secs = [s["seconds"] for s in r["steps"]]
    last = r["steps"][-1]
    rows = [
        (
            "checkpoint",
            f"{size / GIB:,.1f} GiB, " + (f"written in {write_s:,.0f} s" if wrote else "reused"),
        ),
        ("load time", f"{r['load_seconds']:,.1f} s"),
        ("RSS after load", f"{r['rss_after_load'] / GIB:,.2f} GiB"),
        ("peak RSS while loading", f"{r['peak_rss_load'] / GIB:,.2f} GiB"),
        ("peak RSS", f"{r['peak_rss'] / GIB:,.2f} GiB (kt-sft estimate {est.total / GIB:,.2f})"),
        (
            "RSS after the last step",
            f"{last['rss'] / GIB:,.2f} GiB (anonymous {last['rss_anon'] / GIB:,.2f}, "
            f"file-backed {last['rss_file'] / GIB:,.2f})",
        ),
        ("trainable parameters", f"{r['trainable_params'] / 1e6:,.1f} M"),
        (
            "malloc mmap threshold",
            "fixed at 1 MiB (kt_sft.host_memory)"
            if r.get("malloc_tuned")
            else "glibc default (KT_MALLOC_TUNING=1 fixes it)",
        ),
        *[
            (
                f"step {i + 1}",
                f"{s:,.1f} s, {args.seq_len / s:,.0f} tokens/s, loss {r['steps'][i]['loss']:.4f}",
            )
            for i, s in enumerate(secs)
        ],
        *[
            (
                f"engine {kind}",
                f"{e[kind + '_bytes'] / GIB:,.2f} GiB live, "
                f"{e[kind + '_peak_bytes'] / GIB:,.2f} GiB peak",
            )
            for kind in ("weights", "lora", "cache", "pool", "scratch", "total")
        ],
    ]
    print(f"Qwen3-30B-A3B-shaped, {layers} layers:")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"checkpoint {kept}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**r, "estimate": est.to_dict(), "checkpoint_bytes": size}, f, indent=1)
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
