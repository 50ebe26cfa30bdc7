"""Measure the host memory of one LoRA training step on a random model of a given shape.

Each measurement runs in a fresh Python process (``python -m kt_sft.memory_probe JSON``), so
allocator state of earlier runs does not leak into it: the model is built (random weights, the
tiny-model configs of ``kt_models.tiny`` with the requested widths), wrapped, given expert LoRA
through PEFT, then the peak-RSS mark is reset and one forward + backward of ``tokens`` tokens
runs. The result is the peak RSS growth over the loaded model and the engine's own peak bytes by
kind (``kt_kernels.memory_stats()``). ``bench/bench_memory.py`` and the test of
``kt-sft estimate`` use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ProbeConfig", "measure", "run_probe"]

CHECKPOINTING = ("none", "reentrant", "non_reentrant")


@dataclass(frozen=True)
class ProbeConfig:
    """One measured training step. ``checkpointing``: ``none``, ``reentrant`` or
    ``non_reentrant`` (HF gradient checkpointing of every decoder layer)."""

    layers: int = 2
    tokens: int = 2048
    hidden_size: int = 512
    intermediate_size: int = 512
    num_experts: int = 16
    top_k: int = 8
    lora_rank: int = 8
    weight_dtype: str = "bf16"
    policy: str = "retain"
    checkpointing: str = "none"
    num_heads: int = 4
    vocab_size: int = 256
    model_type: str = "qwen3_moe"
    seed: int = 0
    steps: int = 1
    time_layer: bool = False

    def __post_init__(self) -> None:
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(
                f"checkpointing must be one of {', '.join(CHECKPOINTING)}, got "
                f"{self.checkpointing!r}"
            )


def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    cur = peak = 0
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def run_probe(cfg: ProbeConfig) -> dict[str, Any]:
    """Run the measurement in this process (see the module docstring); returns a dict."""
    import gc

    import torch
    from peft import LoraConfig

    import kt_kernels as kk
    import kt_sft
    from kt_models import tiny
    from kt_sft.testing import lora_config_kwargs

    torch.manual_seed(cfg.seed)
    model = tiny.build(
        cfg.model_type,
        seed=cfg.seed,
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.intermediate_size,
        intermediate_size=cfg.intermediate_size,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        num_hidden_layers=cfg.layers,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        vocab_size=cfg.vocab_size,
    )
    kcfg = kt_sft.KTConfig(
        weight_dtype=cfg.weight_dtype,
        lora_rank=cfg.lora_rank,
        lora_alpha=float(2 * cfg.lora_rank),
        max_tokens=cfg.tokens,
        activation_policy=cfg.policy,
    )
    kt_sft.wrap_model(model, kcfg)
    kwargs = lora_config_kwargs(
        model, r=cfg.lora_rank, lora_alpha=2.0 * cfg.lora_rank, attention=False, router=False
    )
    pm = kt_sft.get_peft_model(model, LoraConfig(**kwargs))
    pm.train()
    if cfg.checkpointing != "none":
        pm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": cfg.checkpointing == "reentrant"}
        )
        pm.enable_input_require_grads()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (1, cfg.tokens), generator=gen)
    gc.collect()
    kk.trim_memory()
    base, _ = _rss()
    _reset_peak()
    kk.reset_memory_peaks()
    for _ in range(cfg.steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
    _, peak = _rss()
    stats = kk.memory_stats()
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "rss_base": base,
        "rss_peak": peak,
        "rss_growth": peak - base,
        "engine": stats,
    }
    if cfg.time_layer:
        result["layer_times"] = _time_one_layer(cfg)
    return result


def _time_one_layer(cfg: ProbeConfig, reps: int = 7) -> dict[str, list[float]]:
    """Forward + backward of one engine layer at the probe's shape, retain and recompute
    alternating, ``reps`` times each; seconds per step."""
    import time

    import numpy as np

    import kt_kernels as kk

    rng = np.random.default_rng(cfg.seed)
    E, K, H, inter, r, T = (
        cfg.num_experts,
        cfg.top_k,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.lora_rank,
        cfg.tokens,
    )
    engine = kk.MoEEngine(E, K, H, inter, lora_rank=r, weight_dtype=cfg.weight_dtype, max_tokens=T)
    engine.load_weights(
        gate_up=(rng.standard_normal((E, 2 * inter, H)) * 0.05).astype(np.float32),
        down=(rng.standard_normal((E, H, inter)) * 0.05).astype(np.float32),
    )
    lora = {
        "a_gate_up": (E, r, H),
        "b_gate_up": (E, 2 * inter, r),
        "a_down": (E, r, inter),
        "b_down": (E, H, r),
    }
    arrays = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in lora.items()}
    arrays.update({"grad_" + k: np.zeros(s, np.float32) for k, s in lora.items()})
    engine.set_lora(**arrays)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    w = rng.random((T, K)).astype(np.float32)
    out = np.empty((T, H), np.float32)
    dx = np.empty((T, H), np.float32)
    dw = np.empty((T, K), np.float32)
    times: dict[str, list[float]] = {"retain": [], "recompute": []}
    for rep in range(reps + 1):
        for policy in ("retain", "recompute"):
            engine.activation_policy = policy
            t0 = time.perf_counter()
            engine.forward(x, ids, w, out)
            engine.backward(x, dx, dw, x=x)
            if rep:  # the first round warms up
                times[policy].append(time.perf_counter() - t0)
    engine.close()
    return times


def measure(
    cfg: ProbeConfig, *, timeout: float = 1800.0, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """:func:`run_probe` in a fresh Python process; returns its dict."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "kt_sft.memory_probe", json.dumps(asdict(cfg))],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {cfg} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_probe(ProbeConfig(**json.loads(sys.argv[1])))))
