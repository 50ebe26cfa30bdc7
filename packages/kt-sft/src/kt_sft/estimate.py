"""Memory sizing: how much CPU RAM a MoE model needs with kt (`kt-sft estimate`).

The formula (docs/troubleshooting.md, "How much memory do I need?"), with E routed experts per
MoE layer, L MoE layers, hidden size H, expert intermediate size I, top-k K, LoRA rank r, T tokens
per MoE call (batch × sequence), cache depth D (pending forwards per layer):

    experts      = L · E · 3·H·I · w  +  scales
                   w = 2 (bf16), 1 (int8), 0.5 (int4) bytes per weight
                   scales: int8 one fp32 per output row, L·E·(2I + H)·4;
                           int4 one fp32 per group of g inputs, L·E·3·H·I/g·4
    expert LoRA  = L · E · r·(2H + 3I) · 16      fp32 weight + grad + AdamW m and v (training)
    cache        = L · D · T · (2H + K·(6I + 8r))  saved activations for backward (training)
    scratch      = T · K · (H + 2I) · 4          one pool shared by all layers
    rest         = P_rest · b                    non-expert parameters (0 when on a GPU),
                                                  b = 4 (fp32) or 2 (bf16)
    overhead     = 1 GiB                         Python, PyTorch, transformers

    RAM ≈ experts + expert LoRA + cache + scratch + rest + overhead

It deliberately ignores PyTorch-side activations (attention, logits), which depend on the
sequence length and live on the GPU when there is one. P_rest is counted from the config: embeddings
and LM head, attention (standard or multi-head latent), dense MLP layers, shared experts, routers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GIB", "MemoryEstimate", "ModelShape", "estimate_memory", "format_estimate",
           "shape_from_config"]

GIB = 1024**3
OVERHEAD_BYTES = 1 * GIB
WEIGHT_BYTES = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class ModelShape:
    """The numbers the estimate needs. `other_params`: parameters outside the routed experts."""

    num_experts: int
    num_moe_layers: int
    hidden_size: int
    intermediate_size: int
    top_k: int = 8
    other_params: float = 0
    model_type: str | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_moe_layers", "hidden_size", "intermediate_size",
                     "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.other_params < 0:
            raise ValueError(f"other_params must be >= 0, got {self.other_params}")

    @property
    def expert_params(self) -> int:
        return self.num_moe_layers * self.num_experts * 3 * self.hidden_size * \
            self.intermediate_size

    def replace(self, **changes: Any) -> ModelShape:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MemoryEstimate:
    weight_dtype: str
    experts: float
    expert_lora: float
    cache: float
    scratch: float
    rest: float
    overhead: float

    @property
    def total(self) -> float:
        return self.experts + self.expert_lora + self.cache + self.scratch + self.rest + \
            self.overhead

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total"] = self.total
        d["total_gib"] = self.total / GIB
        return d


def estimate_memory(shape: ModelShape, *, weight_dtype: str = "bf16", lora_rank: int = 8,
                    max_tokens: int = 4096, cache_depth: int = 1, group_size: int = 128,
                    training: bool = True, non_expert_on_gpu: bool = False,
                    non_expert_bytes: int = 4) -> MemoryEstimate:
    """Bytes of CPU RAM per component; see the module docstring for the formula."""
    if weight_dtype not in WEIGHT_BYTES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_BYTES)}, got "
                         f"{weight_dtype!r}")
    for name, value in (("lora_rank", lora_rank), ("max_tokens", max_tokens),
                        ("cache_depth", cache_depth), ("group_size", group_size)):
        if value < (0 if name == "lora_rank" else 1):
            raise ValueError(f"{name} must be positive, got {value}")
    L, E, H, K = shape.num_moe_layers, shape.num_experts, shape.hidden_size, shape.top_k
    I = shape.intermediate_size  # noqa: E741 - the formula's name
    r, T = lora_rank, max_tokens
    experts = L * E * 3 * H * I * WEIGHT_BYTES[weight_dtype]
    if weight_dtype == "int8":
        experts += L * E * (2 * I + H) * 4
    elif weight_dtype == "int4":
        experts += L * E * 3 * H * I / group_size * 4
    lora = L * E * r * (2 * H + 3 * I) * 16 if training else 0
    cache = L * cache_depth * T * (2 * H + K * (6 * I + 8 * r)) if training else 0
    scratch = T * K * (H + 2 * I) * 4
    rest = 0 if non_expert_on_gpu else shape.other_params * non_expert_bytes
    return MemoryEstimate(weight_dtype, float(experts), float(lora), float(cache), float(scratch),
                          float(rest), float(OVERHEAD_BYTES))


# ---------------------------------------------------------------------------------------------

def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def _moe_layers(raw: dict[str, Any], cfg: dict[str, Any], num_layers: int) -> list[int]:
    try:
        from kt_models import get_arch_spec

        return get_arch_spec(raw).moe_layer_indices(raw)
    except Exception:  # unregistered model type: the common config conventions
        first_dense = int(cfg.get("first_k_dense_replace") or 0)
        step = int(cfg.get("decoder_sparse_step") or cfg.get("moe_layer_freq") or 1)
        skip = set(cfg.get("mlp_only_layers") or [])
        return [i for i in range(num_layers)
                if i >= first_dense and i not in skip and (i + 1) % step == 0]


def _other_params(cfg: dict[str, Any], H: int, E: int, num_layers: int, moe_layers: int) -> int:
    V = int(_get(cfg, "vocab_size", default=0))
    heads = int(_get(cfg, "num_attention_heads", "n_head", default=1))
    kv = int(_get(cfg, "num_key_value_heads", default=heads))
    hd = int(_get(cfg, "head_dim", default=H // heads))
    if cfg.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek V2/V3)
        nope = int(_get(cfg, "qk_nope_head_dim", default=hd))
        rope = int(_get(cfg, "qk_rope_head_dim", default=0))
        v = int(_get(cfg, "v_head_dim", default=hd))
        kvr = int(cfg["kv_lora_rank"])
        qr = cfg.get("q_lora_rank")
        q = H * int(qr) + int(qr) * heads * (nope + rope) if qr else H * heads * (nope + rope)
        attn = q + H * (kvr + rope) + kvr * heads * (nope + v) + heads * v * H
    else:
        attn = 2 * H * heads * hd + 2 * H * kv * hd
    dense_i = int(_get(cfg, "intermediate_size", "ffn_hidden_size", default=0))
    moe_i = int(_get(cfg, "moe_intermediate_size", "expert_intermediate_size", default=dense_i))
    shared = int(_get(cfg, "shared_expert_intermediate_size", default=0))
    if not shared and cfg.get("n_shared_experts"):
        shared = int(cfg["n_shared_experts"]) * moe_i
    embed = V * H * (1 if cfg.get("tie_word_embeddings") else 2)
    per_moe = 3 * H * shared + E * H  # shared experts + router
    dense_layers = num_layers - moe_layers
    return embed + num_layers * attn + dense_layers * 3 * H * dense_i + moe_layers * per_moe


def shape_from_config(path: str | Path) -> ModelShape:
    """Read E, L (MoE layers), H, I, K and the non-expert parameter count from a config.json (or
    a checkpoint directory holding one). Field aliases and text_config nesting are handled."""
    from kt_models.config_fields import (
        HIDDEN_SIZE_FIELDS,
        MOE_INTERMEDIATE_SIZE_FIELDS,
        NUM_EXPERTS_FIELDS,
        NUM_LAYERS_FIELDS,
        TOP_K_FIELDS,
        read_field,
        text_config,
    )

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"config not found: {p} (give a config.json or a checkpoint "
                                "directory)")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not valid JSON: {exc}") from exc
    cfg = dict(text_config(raw))
    cfg.setdefault("model_type", raw.get("model_type"))
    E = read_field(cfg, NUM_EXPERTS_FIELDS, what="number of routed experts")
    H = read_field(cfg, HIDDEN_SIZE_FIELDS, what="hidden size")
    num_layers = read_field(cfg, NUM_LAYERS_FIELDS, what="number of decoder layers")
    inter = read_field(cfg, (*MOE_INTERMEDIATE_SIZE_FIELDS, "intermediate_size"),
                       what="routed expert intermediate size")
    K = read_field(cfg, TOP_K_FIELDS, what="number of experts per token (top-k)")
    moe = _moe_layers(raw, cfg, num_layers)
    if not moe:
        raise ValueError(f"{p}: no decoder layer has routed experts")
    return ModelShape(num_experts=E, num_moe_layers=len(moe), hidden_size=H,
                      intermediate_size=inter,
                      top_k=K, other_params=_other_params(cfg, H, E, num_layers, len(moe)),
                      model_type=raw.get("model_type"), num_layers=num_layers)


def _gib(x: float) -> str:
    return f"{x / GIB:,.1f}" if x >= 0.1 * GIB else f"{x / GIB:,.2f}"


def format_estimate(shape: ModelShape, results: list[MemoryEstimate]) -> str:
    head = (f"model: {shape.model_type or 'custom'} — E={shape.num_experts} experts x "
            f"{shape.num_moe_layers} MoE layers"
            + (f" (of {shape.num_layers})" if shape.num_layers else "")
            + f", H={shape.hidden_size}, I={shape.intermediate_size}, K={shape.top_k}; "
            f"routed expert parameters {shape.expert_params / 1e9:,.2f} B, other "
            f"{shape.other_params / 1e9:,.2f} B")
    rows = [("GiB", *[r.weight_dtype for r in results])]
    for label, attr in (("routed experts", "experts"), ("expert LoRA + AdamW", "expert_lora"),
                        ("activation cache", "cache"), ("scratch", "scratch"),
                        ("non-expert weights", "rest"), ("runtime overhead", "overhead"),
                        ("total RAM", "total")):
        rows.append((label, *[_gib(getattr(r, attr)) for r in results]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[i]) for r in rows) for i in range(1, len(rows[0]))]
    lines = [head, ""]
    for i, row in enumerate(rows):
        lines.append(f"{row[0]:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in
                                                          zip(row[1:], cols)))
        if i == 0 or i == len(rows) - 2:
            lines.append("-" * (width + 2 + sum(cols) + 2 * (len(cols) - 1)))
    lines.append("")
    lines.append("formula: docs/troubleshooting.md#how-much-memory-do-i-need")
    return "\n".join(lines)
