"""Independent NumPy reference of the MoE experts operator (docs/api/kernels.md, "The operator"), forward and the
analytic backward, in float64.

It rounds to bfloat16 exactly where the engine's contract says activations are BF16: x and
grad_out on entry, h before the down projection, and dg/du before the base-weight part of dx.
Base weights are rounded to bf16 by the caller's data (see `make_case`), LoRA weights are used as
given. Everything else is exact float64, so the only differences left against the engine are its
float32 accumulation and the rare bf16 rounding flip an fp32-vs-fp64 difference causes; that is
what the tolerances in the tests bound.

W8A8 (`forward_w8a8`): the same, with x and h quantized to int8 per row and the base products
taken as exact integer matmuls of the codes followed by the engine's float32 epilogue; with
backward_dtype "int8" (`backward_w8a8_int8`) backward's two base products likewise, on gradient
rows scaled by the weights' channel scales and quantized per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16

__all__ = [
    "BF16",
    "Act",
    "Case",
    "Lora",
    "act_backward",
    "act_forward",
    "backward",
    "backward_w8a8_int8",
    "bf16",
    "dequantized",
    "forward",
    "forward_w8a8",
    "make_case",
    "max_rel_err",
    "quantize_rows_i8",
    "quantize_rows_i8_mul",
]


def bf16(a: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest even) and return float64."""
    return np.asarray(a, dtype=np.float32).astype(BF16).astype(np.float64)


def sigmoid(g: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-g))


@dataclass(frozen=True)
class Act:
    """An activation variant (MoEEngine's activation options): h = f(min(g, limit)) *
    (cap_u(clip(u, -limit, limit)) + up_offset), silu's f = cap_g(g) * sigmoid(alpha g),
    cap_c(x) = c tanh(x / c)."""

    name: str = "silu"
    alpha: float = 1.0
    limit: float | None = None
    up_offset: float = 0.0
    gate_softcap: float | None = None
    up_softcap: float | None = None

    def kwargs(self) -> dict:
        return dict(
            activation=self.name,
            activation_alpha=self.alpha,
            activation_limit=self.limit,
            activation_up_offset=self.up_offset,
            activation_gate_softcap=self.gate_softcap,
            activation_up_softcap=self.up_softcap,
        )


def _cap(x: np.ndarray, c: float | None) -> tuple[np.ndarray, np.ndarray]:
    """c tanh(x / c) and its derivative (c None: x and 1)."""
    if c is None:
        return x, np.ones_like(x)
    t = np.tanh(x / c)
    return c * t, 1 - t * t


def _f_and_df(a: Act, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f(g), f'(g) in float64, written from the textbook formulas."""
    from math import erf, pi, sqrt

    if a.name == "silu":
        sg = sigmoid(a.alpha * g)
        cg, dcg = _cap(g, a.gate_softcap)
        return cg * sg, dcg * sg + a.alpha * cg * sg * (1 - sg)
    if a.name == "gelu":
        cdf = 0.5 * (1 + np.vectorize(erf)(g / sqrt(2))) if g.size else g
        return g * cdf, cdf + g * np.exp(-0.5 * g * g) / sqrt(2 * pi)
    if a.name == "gelu_tanh":
        c = sqrt(2 / pi)
        t = np.tanh(c * (g + 0.044715 * g**3))
        return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * c * (
            1 + 3 * 0.044715 * g * g
        )
    if a.name == "relu2":
        r = np.maximum(g, 0)
        return r * r, 2 * r
    raise ValueError(a.name)


def act_forward(a: Act, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    lim = np.inf if a.limit is None else a.limit
    f, _ = _f_and_df(a, np.minimum(g, lim))
    return f * (_cap(np.clip(u, -lim, lim), a.up_softcap)[0] + a.up_offset)


def act_backward(
    a: Act, g: np.ndarray, u: np.ndarray, dh: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """dg, du as torch's autograd gives them (clamp: the gradient passes at the range's ends)."""
    lim = np.inf if a.limit is None else a.limit
    f, df = _f_and_df(a, np.minimum(g, lim))
    cu, dcu = _cap(np.clip(u, -lim, lim), a.up_softcap)
    dg = np.where(g <= lim, dh * (cu + a.up_offset) * df, 0.0)
    du = np.where((u >= -lim) & (u <= lim), dh * f * dcu, 0.0)
    return dg, du


@dataclass
class Lora:
    """LoRA weights per projection (split view); the fused layout has a_g is a_u."""

    a_g: np.ndarray  # E x r x H
    a_u: np.ndarray  # E x r x H
    b_g: np.ndarray  # E x I x r
    b_u: np.ndarray  # E x I x r
    a_d: np.ndarray  # E x r x I
    b_d: np.ndarray  # E x H x r
    scaling: float
    fused: bool


@dataclass
class Case:
    E: int
    K: int
    H: int
    I: int  # noqa: E741 (I is the spec's name)
    r: int
    T: int
    gate: np.ndarray  # E x I x H (values exactly representable in bf16)
    up: np.ndarray
    down: np.ndarray  # E x H x I
    x: np.ndarray  # T x H float32
    ids: np.ndarray  # T x K int64
    w: np.ndarray  # T x K float32
    dout: np.ndarray  # T x H float32
    lora: Lora | None
    extra: dict = field(default_factory=dict)
    #: activation variant (None: SiLU) and frozen biases (E x I gate / up, E x H down; None: none)
    act: Act | None = None
    bias_g: np.ndarray | None = None
    bias_u: np.ndarray | None = None
    bias_d: np.ndarray | None = None

    @property
    def gate_up(self) -> np.ndarray:
        return np.concatenate([self.gate, self.up], axis=1)


def make_case(
    E: int,
    K: int,
    H: int,
    I: int,  # noqa: E741 (I is the spec's name)
    r: int,
    T: int,
    *,
    seed: int = 0,
    fused: bool = True,
    used_experts: int | None = None,
    pad_frac: float = 0.1,
    dup_frac: float = 0.2,
    alpha: float | None = None,
    lora_scale: float = 1.0,
) -> Case:
    """Random case: weights rounded to bf16, activations O(1), some padding ids (-1), some
    duplicate ids within a row, and experts >= used_experts never routed to."""
    rng = np.random.default_rng(seed)
    used = E if used_experts is None else max(1, min(E, used_experts))

    def rnd(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    gate = bf16(rnd(E, I, H, std=H**-0.5)).astype(np.float32)
    up = bf16(rnd(E, I, H, std=H**-0.5)).astype(np.float32)
    down = bf16(rnd(E, H, I, std=I**-0.5)).astype(np.float32)
    x = rnd(T, H, std=1.0)
    ids = rng.integers(0, used, size=(T, K)).astype(np.int64)
    if K > 1 and T > 0:
        dup = rng.random(T) < dup_frac
        ids[dup, 1] = ids[dup, 0]
    if T > 0:
        ids[rng.random((T, K)) < pad_frac] = -1
    w = rng.random((T, K)).astype(np.float32)
    dout = rnd(T, H, std=1.0)
    lora = None
    if r > 0:
        a_g = rnd(E, r, H, std=H**-0.5)
        a_u = a_g if fused else rnd(E, r, H, std=H**-0.5)
        lora = Lora(
            a_g=a_g,
            a_u=a_u,
            b_g=rnd(E, I, r, std=lora_scale * r**-0.5),
            b_u=rnd(E, I, r, std=lora_scale * r**-0.5),
            a_d=rnd(E, r, I, std=I**-0.5),
            b_d=rnd(E, H, r, std=lora_scale * r**-0.5),
            scaling=(alpha if alpha is not None else r) / r,
            fused=fused,
        )
    return Case(E, K, H, I, r, T, gate, up, down, x, ids, w, dout, lora)


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def forward(c: Case, x: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Return out (T x H, float64) and what backward needs."""

    def gate_up(e: int, tt: np.ndarray, xe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return xe @ _f64(c.gate[e]).T, xe @ _f64(c.up[e]).T

    def down(e: int, hb: np.ndarray) -> np.ndarray:
        return hb @ _f64(c.down[e]).T

    return _forward(c, x, gate_up, down)


def _forward(
    c: Case,
    x: np.ndarray | None,
    gate_up: Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    down: Callable[[int, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, dict]:
    """The forward around the base-weight products: gate_up(e, tt, xe) gives expert e's base g and
    u for the bf16 x rows xe of tokens tt, down(e, hb) its base y for the bf16 h rows hb. Routing,
    LoRA (float64 from bf16 x / h), silu, the bf16 rounding of h and the combine are the same for
    every forward. Returns out (T x H, float64) and what backward needs."""
    x = c.x if x is None else x
    xb = bf16(x)
    T, H, K = c.T, c.H, c.K
    out = np.zeros((T, H))
    per_slot: dict = {}
    L = c.lora
    s = L.scaling if L else 0.0
    for e in range(c.E):
        tt, jj = np.nonzero(c.ids == e)  # rows in (t, j) order
        if tt.size == 0:
            continue
        xe = xb[tt]
        g, u = gate_up(e, tt, xe)
        if L:
            xag = xe @ _f64(L.a_g[e]).T
            xau = xe @ _f64(L.a_u[e]).T
            g = g + s * xag @ _f64(L.b_g[e]).T
            u = u + s * xau @ _f64(L.b_u[e]).T
        else:
            xag = xau = None
        if c.bias_g is not None:
            g = g + _f64(c.bias_g[e])
            u = u + _f64(c.bias_u[e])
        hb = bf16(g * sigmoid(g) * u if c.act is None else act_forward(c.act, g, u))
        y = down(e, hb)
        had = None
        if L:
            had = hb @ _f64(L.a_d[e]).T
            y = y + s * had @ _f64(L.b_d[e]).T
        if c.bias_d is not None:
            y = y + _f64(c.bias_d[e])
        per_slot[e] = dict(tt=tt, jj=jj, xe=xe, g=g, u=u, hb=hb, y=y, xag=xag, xau=xau, had=had)
    # Combine in slot order per token (the engine's order; float64 makes order immaterial).
    for d in per_slot.values():
        np.add.at(out, d["tt"], _f64(c.w[d["tt"], d["jj"]])[:, None] * d["y"])
    return out, dict(per_slot=per_slot, T=T, H=H, K=K)


def backward(c: Case, cache: dict, dout: np.ndarray | None = None) -> dict:
    """Return dx (T x H), dw (T x K) and the LoRA gradients (split names; fused callers sum
    a_g + a_u and concatenate b_g, b_u)."""

    def down_t(e: int, dy: np.ndarray) -> np.ndarray:
        return dy @ _f64(c.down[e])

    def gate_up_t(e: int, dgb: np.ndarray, dub: np.ndarray) -> np.ndarray:
        return dgb @ _f64(c.gate[e]) + dub @ _f64(c.up[e])

    return _backward(c, cache, dout, down_t, gate_up_t)


def _backward(
    c: Case,
    cache: dict,
    dout: np.ndarray | None,
    down_t: Callable[[int, np.ndarray], np.ndarray],
    gate_up_t: Callable[[int, np.ndarray, np.ndarray], np.ndarray],
) -> dict:
    """The backward around its two base-weight products: down_t(e, dy) gives expert e's dY Wd for
    the bf16 dY rows dy, gate_up_t(e, dgb, dub) its dx base term for the bf16 dg and du rows."""
    dout = c.dout if dout is None else dout
    db = bf16(dout)
    T, H, K = c.T, c.H, c.K
    L = c.lora
    s = L.scaling if L else 0.0
    dx = np.zeros((T, H))
    dw = np.zeros((T, K))
    grads = {}
    if L:
        grads = {
            k: np.zeros(getattr(L, k).shape) for k in ("a_g", "a_u", "b_g", "b_u", "a_d", "b_d")
        }
    for e, d in cache["per_slot"].items():
        tt, jj = d["tt"], d["jj"]
        dy = db[tt]
        wv = _f64(c.w[tt, jj])[:, None]
        D = down_t(e, dy)
        if L:
            dyb = dy @ _f64(L.b_d[e])
            D = D + s * dyb @ _f64(L.a_d[e])
        dw[tt, jj] = np.sum(D * d["hb"], axis=1)
        if c.bias_d is not None:
            dw[tt, jj] += dy @ _f64(c.bias_d[e])
        dh = wv * D
        g, u = d["g"], d["u"]
        if c.act is None:
            sg = sigmoid(g)
            dg = dh * u * sg * (1 + g * (1 - sg))
            du = dh * g * sg
        else:
            dg, du = act_backward(c.act, g, u, dh)
        dxe = gate_up_t(e, bf16(dg), bf16(du))
        if L:
            dgb = dg @ _f64(L.b_g[e])
            dub = du @ _f64(L.b_u[e])
            dxe = dxe + s * (dgb @ _f64(L.a_g[e]) + dub @ _f64(L.a_u[e]))
            grads["b_d"][e] += s * (wv * dy).T @ d["had"]
            grads["a_d"][e] += s * (wv * dyb).T @ d["hb"]
            grads["b_g"][e] += s * dg.T @ d["xag"]
            grads["b_u"][e] += s * du.T @ d["xau"]
            grads["a_g"][e] += s * dgb.T @ d["xe"]
            grads["a_u"][e] += s * dub.T @ d["xe"]
        np.add.at(dx, tt, dxe)
    out = dict(dx=dx, dw=dw)
    if L:
        if L.fused:
            out["a_gate_up"] = grads["a_g"] + grads["a_u"]
            out["b_gate_up"] = np.concatenate([grads["b_g"], grads["b_u"]], axis=1)
        else:
            out["a_gate"], out["a_up"] = grads["a_g"], grads["a_u"]
            out["b_gate"], out["b_up"] = grads["b_g"], grads["b_u"]
        out["a_down"], out["b_down"] = grads["a_d"], grads["b_d"]
    return out


# ---- W8A8 (weight_dtype int8, activation_dtype int8) --------------------------------------------


def quantize_rows_i8(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 quantization of activations, in float32 as the engine does it:
    s = max|row| / 127, code = rint(row / s) clamped to [-127, 127]; a zero row has s = 0 and
    codes 0; a row with NaN or Inf has s = NaN and codes 0. Returns (codes int8, s float32)."""
    a = np.asarray(a, dtype=np.float32)
    n = a.shape[0]
    bad = ~np.all(np.isfinite(a), axis=1) if a.size else np.zeros(n, bool)
    mag = np.where(np.isfinite(a), np.abs(a), np.float32(0))
    amax = mag.max(axis=1) if a.shape[1] else np.zeros(n, np.float32)
    s = (amax / np.float32(127)).astype(np.float32)
    ok = (s > 0) & ~bad
    safe = np.where(ok, s, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(np.where(np.isfinite(a), a, 0) / safe[:, None]), -127, 127)
    codes = np.where(ok[:, None], q, 0).astype(np.int8)
    return codes, np.where(bad, np.float32(np.nan), s).astype(np.float32)


def _q_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel int8 weight quantization (kt_kernels.quantize_weights(w, "int8"))."""
    w = np.asarray(w, dtype=np.float32)
    scale = (np.max(np.abs(w), axis=-1) / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.where(scale[..., None] > 0, np.rint(w / safe[..., None]), np.float32(0))
    return np.clip(q, -127, 127).astype(np.int8), scale


def dequantized(c: Case) -> Case:
    """The case with its base weights replaced by bf16(code * scale) (weight-only int8)."""
    from dataclasses import replace

    def dq(w):
        codes, scale = _q_int8(w)
        return bf16(codes.astype(np.float32) * scale[..., None]).astype(np.float32)

    return replace(c, gate=dq(c.gate), up=dq(c.up), down=dq(c.down))


def forward_w8a8(c: Case, x: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """W8A8 forward: x (bf16) and h (bf16) quantized per row, integer matmuls of the codes (exact),
    the float32 epilogue (float32(acc) * s_row) * s_channel in the engine's order, LoRA in float64
    from bf16 x / h. Returns out and a cache for `backward` on `dequantized(c)`, which is the
    straight-through backward. Without LoRA, g and u equal the engine's float32 values bit for
    bit."""
    qx, sx = quantize_rows_i8(bf16(c.x if x is None else x))
    qg, sg = _q_int8(c.gate)
    qu, su = _q_int8(c.up)
    qd, sd = _q_int8(c.down)

    def mm(codes, s_row, w_codes, s_col):
        acc = codes.astype(np.int64) @ w_codes.astype(np.int64).T
        assert np.abs(acc).max(initial=0) < 2**31
        return ((acc.astype(np.int32).astype(np.float32) * s_row[:, None]) * s_col[None, :]).astype(
            np.float64
        )

    def gate_up(e: int, tt: np.ndarray, xe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return mm(qx[tt], sx[tt], qg[e], sg[e]), mm(qx[tt], sx[tt], qu[e], su[e])

    def down(e: int, hb: np.ndarray) -> np.ndarray:
        qh, sh = quantize_rows_i8(hb)
        return mm(qh, sh, qd[e], sd[e])

    return _forward(c, x, gate_up, down)


def quantize_rows_i8_mul(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row int8 quantization of gradient rows (backward_dtype "int8", engine/w8a8.h): as
    `quantize_rows_i8`, but code = rint(row * (127 / max|row|)) in float32, or rint(row / s)
    where that factor overflows."""
    a = np.asarray(a, dtype=np.float32)
    codes, s = quantize_rows_i8(a)
    n = a.shape[0]
    amax = np.abs(a).max(axis=1) if a.shape[1] else np.zeros(n, np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        r = (np.float32(127) / amax).astype(np.float32)
        use_mul = (s > 0) & np.isfinite(r)
        q = np.clip(np.rint(a * np.where(use_mul, r, np.float32(0))[:, None]), -127, 127)
    q = np.where(use_mul[:, None], q, np.float32(0)).astype(np.int8)
    codes = np.where(use_mul[:, None], q, codes)
    return codes, s


def backward_w8a8_int8(c: Case, cache: dict, dout: np.ndarray | None = None) -> dict:
    """W8A8 backward with backward_dtype="int8": the gradients of `backward` on `dequantized(c)`,
    except its two base products, which run on the weights' codes: per expert, the bf16 gradient
    rows times the weight's per-channel scales (float32), quantized per row
    (`quantize_rows_i8_mul`, one scale over gate and up together), an exact integer matmul with
    the codes, then float32(acc) * s_row."""
    qg, sg = _q_int8(c.gate)
    qu, su = _q_int8(c.up)
    qd, sd = _q_int8(c.down)

    def int8_product(v: np.ndarray, w_codes: np.ndarray) -> np.ndarray:
        q, s = quantize_rows_i8_mul(v)
        acc = q.astype(np.int64) @ w_codes.astype(np.int64)
        assert np.abs(acc).max(initial=0) < 2**31
        return (acc.astype(np.int32).astype(np.float32) * s[:, None]).astype(np.float64)

    def down_t(e: int, dy: np.ndarray) -> np.ndarray:
        v = dy.astype(np.float32) * sd[e][None, :]
        return int8_product(v, qd[e])

    def gate_up_t(e: int, dgb: np.ndarray, dub: np.ndarray) -> np.ndarray:
        v = np.concatenate([dgb.astype(np.float32) * sg[e], dub.astype(np.float32) * su[e]], 1)
        return int8_product(v, np.concatenate([qg[e], qu[e]], 0))

    return _backward(dequantized(c), cache, dout, down_t, gate_up_t)


def max_rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (0 when both are empty or all zero)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ref.size == 0:
        return 0.0
    scale = float(np.max(np.abs(ref)))
    err = float(np.max(np.abs(got - ref)))
    if scale == 0.0:
        return err
    return err / scale
