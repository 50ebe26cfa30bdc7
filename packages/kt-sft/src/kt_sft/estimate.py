"""Memory sizing: how much CPU RAM a MoE model needs with kt (`kt-sft estimate`).

The model (docs/troubleshooting.md, "How much memory do I need?"), with E routed experts per MoE
layer, L MoE layers, hidden size H, expert intermediate size I (Ib: rounded up to 16), top-k K,
LoRA rank r, T tokens per step (batch × sequence), S = T·K routed rows:

    experts      = L · E · 3·H·I · w  +  scales
                   w = 2 (bf16), 1 (int8), 0.5 (int4) bytes per weight; bf16 adds
                   L·E·(2I·(KpH − H₃₂) + H·(KpI − I₃₂))·2 for the blocks' zero steps (KpH
                   below; KpI the same rule for I, X₃₂: X rounded up to 32)
                   scales: int8 one fp32 per output row, L·E·(2I + H)·4;
                           int4 one fp32 per group of g inputs, L·E·3·H·I/g·4
    expert LoRA  = L · E · r·(2H + 3I) · 16      fp32 weight + grad + AdamW m and v (training)
    LoRA stage   = n · E · r·(2H + 3I) · 4       the engine's fp32 kernel-layout copies of the
                   most recently run layers: n = min(L, max(1, 128 MiB / one layer's copy))
                   (KT_LORA_STAGE_MIB)
    cache        = n · entry                     engine activations kept for backward
                   entry = 2·T·KpH + S·(8·Ib + 8r + 12) under the retain policy, S·12 (the
                   routing) under recompute: backward is given x again
                   n = L · D without checkpointing (D pending forwards per layer), 1 with
                   gradient checkpointing (either kind): the first pass caches nothing
    scratch      = S·2·KpH + S·4·Ib + S·4·min(Hb, cols) + T·2·KpH + S·4·(r + c·(2r + 1))
                   (+ 2·T·KpH + 8·S·r when forwards keep no entry; + S·8·Ib with recompute:
                   [g | u] recomputed in backward)
                   one set shared by all layers (KpH: H rounded up to 32, plus 32 for bf16
                   weights when that is a multiple of 512 and at least 1024; cols: the 64 MiB
                   column budget of the down / dx passes; c = ceil(I / 96) row chunks)
    activations  = PyTorch's saved and transient tensors on the CPU (0 when the model runs on a
                   GPU): a · T·H·b per decoder layer, b the non-expert dtype's bytes; a = 19
                   without checkpointing; with it a = 6 (reentrant) or 12 (non-reentrant),
                   plus 25 or 18 once for the layer being recomputed (measured on
                   qwen3_moe-shaped models, bench/bench_memory.py)
    LM head/loss = min(T, c) · V · 14 + T·H·4    one chunk's logits (bf16, fp32, log-softmax,
                   gradient) with c = 256 MiB / (14 V) tokens (kt-sft train's chunked loss;
                   loss="full": all T tokens' logits at once); 0 when V is not known
    rest         = P_rest · b                    non-expert parameters (0 when on a GPU)
    overhead     = 1 GiB                         Python, PyTorch, transformers

    RAM ≈ experts + expert LoRA + LoRA stage + cache + scratch + activations + LM head/loss
          + rest + overhead

The ``recompute`` policy keeps no [g | u] (one more gate/up GEMM in backward); ``auto`` retains
while the retained entries fit a budget. P_rest is counted from the config: embeddings and LM
head, attention (standard or multi-head latent), dense MLP layers, shared experts, routers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "GIB",
    "MemoryEstimate",
    "ModelShape",
    "cache_entry_bytes",
    "default_activation_budget",
    "estimate_memory",
    "format_estimate",
    "live_cache_bytes",
    "rows_depth",
    "scratch_bytes",
    "shape_from_config",
]

GIB = 1024**3
OVERHEAD_BYTES = 1 * GIB
WEIGHT_BYTES = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}
POLICIES = ("retain", "recompute", "auto")
CHECKPOINTING = ("none", "reentrant", "non_reentrant")
#: PyTorch activation bytes per decoder layer, in units of T·H·(non-expert dtype bytes): saved
#: tensors (attention inputs and outputs, norms, residuals, router) plus what is alive next to
#: them at the backward peak; measured on qwen3_moe-shaped models (bench/bench_memory.py).
ACTIVATION_FACTOR = {"none": 19.0, "reentrant": 6.0, "non_reentrant": 12.0}
#: With checkpointing, the layer being recomputed (its full activations) and the backward's
#: transients come on top, once.
RECOMPUTED_LAYER_FACTOR = {"reentrant": 25.0, "non_reentrant": 18.0}
_PAGE = 4096
LORA_STAGE_BYTES = 128 << 20  # the engine's default KT_LORA_STAGE_MIB
CHUNK_BYTES = 256 << 20  # kt_sft.loss.DEFAULT_CHUNK_BYTES
_SLOT_BUDGET = 64 << 20  # the engine's column budget of the down / dx passes


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
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_moe_layers", "hidden_size", "intermediate_size", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.other_params < 0:
            raise ValueError(f"other_params must be >= 0, got {self.other_params}")

    @property
    def expert_params(self) -> int:
        return (
            self.num_moe_layers * self.num_experts * 3 * self.hidden_size * self.intermediate_size
        )

    def replace(self, **changes: Any) -> ModelShape:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by component (see the module docstring). ``step_growth``: what one training step
    adds over the loaded model (cache, scratch, activations, LoRA gradients)."""

    weight_dtype: str
    experts: float
    expert_lora: float
    cache: float
    scratch: float
    rest: float
    overhead: float
    activations: float = 0.0
    lora_grads: float = 0.0
    policy: str = "retain"
    checkpointing: str = "none"
    lora_stage: float = 0.0
    loss: float = 0.0

    @property
    def total(self) -> float:
        return (
            self.experts
            + self.expert_lora
            + self.lora_stage
            + self.loss
            + self.cache
            + self.scratch
            + self.activations
            + self.rest
            + self.overhead
        )

    @property
    def step_growth(self) -> float:
        return (
            self.cache
            + self.scratch
            + self.activations
            + self.lora_grads
            + self.lora_stage
            + self.loss
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total"] = self.total
        d["step_growth"] = self.step_growth
        d["total_gib"] = self.total / GIB
        return d


def estimate_memory(
    shape: ModelShape,
    *,
    weight_dtype: str = "bf16",
    lora_rank: int = 8,
    max_tokens: int = 4096,
    cache_depth: int = 1,
    group_size: int = 128,
    training: bool = True,
    non_expert_on_gpu: bool = False,
    non_expert_bytes: int = 4,
    policy: str = "retain",
    checkpointing: str = "none",
    budget: float | None = None,
    loss: str = "chunked",
) -> MemoryEstimate:
    """Bytes of CPU RAM per component for steps of ``max_tokens`` tokens; see the module
    docstring for the model. ``budget``: bytes the ``auto`` policy may retain (``None``: half
    the memory available now). ``loss``: ``"chunked"`` (kt-sft train: the LM head and loss a
    chunk of tokens at a time) or ``"full"`` (the model's own loss over all logits)."""
    if loss not in ("chunked", "full"):
        raise ValueError(f"loss must be chunked or full, got {loss!r}")
    if weight_dtype not in WEIGHT_BYTES:
        raise ValueError(
            f"weight_dtype must be one of {', '.join(WEIGHT_BYTES)}, got {weight_dtype!r}"
        )
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if checkpointing not in CHECKPOINTING:
        raise ValueError(
            f"checkpointing must be one of {', '.join(CHECKPOINTING)}, got {checkpointing!r}"
        )
    for name, value in (
        ("lora_rank", lora_rank),
        ("max_tokens", max_tokens),
        ("cache_depth", cache_depth),
        ("group_size", group_size),
    ):
        if value < (0 if name == "lora_rank" else 1):
            raise ValueError(f"{name} must be positive, got {value}")
    L, E, H, K = shape.num_moe_layers, shape.num_experts, shape.hidden_size, shape.top_k
    I = shape.intermediate_size  # noqa: E741 - the formula's name
    r, T = lora_rank, max_tokens
    experts = L * E * 3 * H * I * WEIGHT_BYTES[weight_dtype]
    if weight_dtype == "bf16":  # blocks stored one zero step deeper (rows_depth; down: tp = 1)
        experts += L * E * 2 * I * (rows_depth(H) - -(-H // 32) * 32) * 2
        experts += L * E * H * (rows_depth(I) - -(-I // 32) * 32) * 2
    if weight_dtype == "int8":
        experts += L * E * (2 * I + H) * 4
    elif weight_dtype == "int4":
        experts += L * E * 3 * H * I / group_size * 4
    lora = L * E * r * (2 * H + 3 * I) * 16 if training else 0
    grads = L * E * r * (2 * H + 3 * I) * 4 if training else 0
    dims = {"hidden_size": H, "intermediate_size": I, "top_k": K, "lora_rank": r}
    cache = 0.0
    recompute = policy == "recompute"
    if training:
        pending = 1 if checkpointing != "none" else L * cache_depth
        keep = cache_entry_bytes(T, policy="retain", weight_dtype=weight_dtype, **dims)
        lean = cache_entry_bytes(T, policy="recompute", weight_dtype=weight_dtype, **dims)
        if policy == "auto":
            limit = default_activation_budget() if budget is None else budget
            retained = min(pending, int(limit // keep))
            cache = retained * keep + (pending - retained) * lean
            recompute = retained < pending
        else:
            cache = pending * (lean if recompute else keep)
    scratch = scratch_bytes(
        T,
        recompute=training and recompute,
        training=training,
        uncached=checkpointing != "none",
        weight_dtype=weight_dtype,
        **dims,
    )
    layers = shape.num_layers or L
    activations = 0.0
    if training and not non_expert_on_gpu:
        factor = ACTIVATION_FACTOR[checkpointing] * layers
        if checkpointing != "none":
            factor += RECOMPUTED_LAYER_FACTOR[checkpointing]
        activations = factor * T * H * non_expert_bytes
    rest = 0 if non_expert_on_gpu else shape.other_params * non_expert_bytes
    stage = 0.0
    head = 0.0
    if training:
        per_layer = E * r * (2 * H + 3 * I) * 4
        if per_layer:
            stage = min(L, max(1, LORA_STAGE_BYTES // per_layer)) * per_layer
        V = shape.vocab_size or 0
        if V and not non_expert_on_gpu:
            rows = T if loss == "full" else min(T, max(1, CHUNK_BYTES // (14 * V)))
            head = rows * V * 14 + T * H * 4
    return MemoryEstimate(
        weight_dtype,
        float(experts),
        float(lora),
        float(cache),
        float(scratch),
        float(rest),
        float(OVERHEAD_BYTES),
        float(activations),
        float(grads),
        policy,
        checkpointing,
        float(stage),
        float(head),
    )


def rows_depth(hidden_size: int, weight_dtype: str = "bf16") -> int:
    """KpH: the engine's depth of x and dY rows (bf16). H rounded up to 32; with bf16 weights
    one 32-deep step of zeros more when that is a multiple of 512 and at least 1024 (the engine's
    gate_up blocks are stored that deep so that their stride is not a multiple of 16 KiB). The
    same rule gives the depth of the down blocks and h rows from I (one tensor-parallel slice)."""
    kp = -(-hidden_size // 32) * 32
    if weight_dtype == "bf16" and kp >= 1024 and kp % 512 == 0:
        kp += 32
    return kp


def _pages(n: float) -> int:
    """Bytes the engine allocates for a buffer of ``n``: whole 4 KiB pages (huge pages, where
    advised, cover only a buffer's whole 2 MiB pages and add nothing)."""
    return int(-(-n // _PAGE) * _PAGE)


def scratch_bytes(
    tokens: int,
    *,
    hidden_size: int,
    intermediate_size: int,
    top_k: int,
    lora_rank: int,
    recompute: bool = False,
    training: bool = True,
    max_tokens: int | None = None,
    uncached: bool = False,
    weight_dtype: str = "bf16",
) -> int:
    """Bytes of the engine's process-wide scratch after a step of ``tokens`` tokens (the
    largest of forward and backward: both use the same slots). ``uncached``: some forwards keep
    no cache entry (inference, checkpointing's first pass), so x, x A^T and h Ad^T go to
    scratch; ``recompute``: backward recomputes them and [g | u] there too."""
    T, H, K, r = tokens, hidden_size, top_k, lora_rank
    S = T * K
    ib = -(-intermediate_size // 16) * 16
    kph = rows_depth(H, weight_dtype)
    kpi, hb = -(-intermediate_size // 32) * 32, -(-H // 16) * 16
    sg = max(S, max(T, max_tokens or T) * K)

    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    def cols(tile: int) -> int:  # the engine's col_groups: H columns per pass
        nbh = hb // 16
        want = max(1, cdiv(sg * nbh * 16 * 4, _SLOT_BUDGET))
        return max(tile, cdiv(cdiv(nbh, want), tile) * tile) * 16

    rows = _pages(S * kph * 2)
    hslot = _pages(S * max(kpi, 2 * ib) * 2)
    yslot = _pages(S * cols(6) * 4)
    total = rows + hslot + yslot
    if uncached or recompute or not training:
        total += _pages(T * kph * 2) + _pages(S * 2 * r * 4)
    if training:
        chunks = -(-(ib // 16) // 6)
        total += _pages(T * kph * 2) + _pages((S * (r + chunks + chunks * r + r) + 16) * 4)
        if recompute:
            total += _pages(S * 2 * ib * 4)
    return total


def cache_entry_bytes(
    tokens: int,
    *,
    hidden_size: int,
    intermediate_size: int,
    top_k: int,
    lora_rank: int,
    policy: str = "retain",
    weight_dtype: str = "bf16",
) -> int:
    """Bytes of one engine cache entry for a forward of ``tokens`` tokens (every slot routed):
    the routing index (12 per routed row) and, under ``retain``, x as bf16 (2 KpH per token,
    :func:`rows_depth`), x A^T and h Ad^T (4r each per routed row) and [g | u] as fp32 (8I per
    routed row, I rounded up to 16). A ``recompute`` entry is recomputed from the x that
    backward is given again."""
    if policy not in ("retain", "recompute"):
        raise ValueError(f"policy must be 'retain' or 'recompute', got {policy!r}")
    rows = tokens * top_k
    if policy == "recompute":
        return 12 * rows
    ib = -(-intermediate_size // 16) * 16
    return 2 * tokens * rows_depth(hidden_size, weight_dtype) + rows * (8 * lora_rank + 12 + 8 * ib)


def live_cache_bytes() -> int:
    """Bytes of engine cache entries alive in this process now (0 without the engine)."""
    try:
        import kt_kernels

        return int(kt_kernels.memory_stats()["cache_bytes"])
    except (ImportError, AttributeError, KeyError):
        return 0


_default_budget: list[float] = []


def default_activation_budget() -> float:
    """Half the memory available (``MemAvailable``) the first time it is asked for, in bytes."""
    if not _default_budget:
        available = None
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
        if available is None:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        _default_budget.append(available / 2)
    return _default_budget[0]


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
        return [
            i
            for i in range(num_layers)
            if i >= first_dense and i not in skip and (i + 1) % step == 0
        ]


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
        raise FileNotFoundError(
            f"config not found: {p} (give a config.json or a checkpoint directory)"
        )
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not valid JSON: {exc}") from exc
    cfg = dict(text_config(raw))
    cfg.setdefault("model_type", raw.get("model_type"))
    E = read_field(cfg, NUM_EXPERTS_FIELDS, what="number of routed experts")
    H = read_field(cfg, HIDDEN_SIZE_FIELDS, what="hidden size")
    num_layers = read_field(cfg, NUM_LAYERS_FIELDS, what="number of decoder layers")
    inter = read_field(
        cfg,
        (*MOE_INTERMEDIATE_SIZE_FIELDS, "intermediate_size"),
        what="routed expert intermediate size",
    )
    K = read_field(cfg, TOP_K_FIELDS, what="number of experts per token (top-k)")
    moe = _moe_layers(raw, cfg, num_layers)
    if not moe:
        raise ValueError(f"{p}: no decoder layer has routed experts")
    return ModelShape(
        num_experts=E,
        num_moe_layers=len(moe),
        hidden_size=H,
        intermediate_size=inter,
        top_k=K,
        other_params=_other_params(cfg, H, E, num_layers, len(moe)),
        model_type=raw.get("model_type"),
        num_layers=num_layers,
        vocab_size=int(_get(cfg, "vocab_size", default=0)) or None,
    )


def _gib(x: float) -> str:
    return f"{x / GIB:,.1f}" if x >= 0.1 * GIB else f"{x / GIB:,.2f}"


def format_estimate(
    shape: ModelShape, results: list[MemoryEstimate], *, other_params_known: bool = True
) -> str:
    """The estimate as a table. `other_params_known=False` (a custom shape given without its
    non-expert parameter count) shows that row as not counted instead of 0."""
    head = (
        f"model: {shape.model_type or 'custom'} — E={shape.num_experts} experts x "
        f"{shape.num_moe_layers} MoE layers"
        + (f" (of {shape.num_layers})" if shape.num_layers else "")
        + f", H={shape.hidden_size}, I={shape.intermediate_size}, K={shape.top_k}; "
        f"routed expert parameters {shape.expert_params / 1e9:,.2f} B, other "
        + (f"{shape.other_params / 1e9:,.2f} B" if other_params_known else "not given")
    )
    rows = [("GiB", *[r.weight_dtype for r in results])]
    for label, attr in (
        ("routed experts", "experts"),
        ("expert LoRA + AdamW", "expert_lora"),
        ("engine LoRA stage", "lora_stage"),
        ("engine activation cache", "cache"),
        ("engine scratch", "scratch"),
        ("PyTorch activations", "activations"),
        ("LM head + loss", "loss"),
        ("non-expert weights", "rest"),
        ("runtime overhead", "overhead"),
        ("total RAM", "total"),
    ):
        if (attr == "rest" and not other_params_known) or (
            attr == "loss" and not shape.vocab_size and any(r.activations for r in results)
        ):
            rows.append((label, *["not counted" for _ in results]))
            continue
        rows.append((label, *[_gib(getattr(r, attr)) for r in results]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[i]) for r in rows) for i in range(1, len(rows[0]))]
    lines = [head, ""]
    for i, row in enumerate(rows):
        lines.append(f"{row[0]:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(row[1:], cols)))
        if i == 0 or i == len(rows) - 2:
            lines.append("-" * (width + 2 + sum(cols) + 2 * (len(cols) - 1)))
    lines.append("")
    if results:
        r = results[0]
        lines.append(
            f"activation policy {r.policy}, gradient checkpointing {r.checkpointing}: "
            f"a step's forward + backward peaks {_gib(r.step_growth)} GiB above the "
            "loaded model (cache, scratch, activations, LoRA gradients)"
        )
    if not other_params_known:
        lines.append(
            "non-expert weights (attention, embeddings, LM head, shared experts) are not "
            "in the total: give --other-params N, or --config PATH to read them"
        )
    lines.append("formula: docs/troubleshooting.md#how-much-memory-do-i-need")
    return "\n".join(lines)
