"""Activation variants and frozen biases (MoEEngine activation* options, set_biases) against the
NumPy float64 reference (kk_reference.act_forward / act_backward), on every ISA, for bf16, int8
and int4 weights, fused and split LoRA.

The variants are the expert activations of the transformers MoE families kt runs: gpt-oss's
clamped GLU (``(clip(u) + 1) * g * sigmoid(1.702 g)``, g clamped above, biases on gate/up and
down), the clamped SwiGLU of DeepSeek-V4 / HY-V4, MiniMax-M3's unbiased clamped GLU, Inkling-2's
soft-capped SwiGLU (``cap(g) * sigmoid(g) * cap(u)``, ``cap(x) = c tanh(x / c)``), and the
plain GELU (erf and tanh forms) and ReLU^2 activations. The limit of these cases (0.75) is small
next to the spread of g and u (std ~1), so a large share of the elements sit in each clamped
region and the zero-gradient rule is exercised on both sides.

Tolerance: as test_engine.py (``max(1e-3, 2**-6 / sqrt(I))`` per array, relative to the array's
largest value). The reference rounds to bf16 where the engine does (x, grad_out, h, dg/du), uses
the weights the engine uses (quantized cases: ``bf16(dequantize_weights(...))``, the values the
engine's bf16 GEMM sees), and adds the biases at the engine's points, so what remains is float32
accumulation and rare bf16 rounding flips. A g or u within float32 rounding of the clamp limit
could land on the other side of it; with continuous data that has probability ~1e-7 per element,
and the fixed seeds below have none.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
from kk_helpers import bind_lora, case_engine, flip_tol, isa_params, run
from kk_reference import BF16, Act, backward, bf16, forward, make_case, max_rel_err

import kt_kernels as kk

ISAS = isa_params()

VARIANTS = {
    "gpt_oss": (Act("silu", 1.702, 0.75, 1.0), True),
    "clamped_swiglu": (Act("silu", 1.0, 0.75, 0.0), False),
    "clamped_glu": (Act("silu", 1.702, 0.75, 1.0), False),
    "gelu": (Act("gelu"), False),
    "gelu_tanh_bias": (Act("gelu_tanh"), True),
    "relu2": (Act("relu2"), False),
    # Inkling-2's soft-capped SwiGLU (caps 4 / 25 there; smaller here so tanh bends on O(1) data)
    "softcapped_swiglu": (Act("silu", gate_softcap=0.8, up_softcap=1.2), False),
}
# (E, K, H, I, r, T): ragged H and I (last blocks of fewer than 16) for bf16 / int8, whole int4
# groups of 32.
SHAPES = {
    "bf16": (5, 2, 72, 40, 3, 13),
    "int8": (5, 2, 72, 40, 3, 13),
    "int4": (4, 2, 64, 96, 2, 9),
}


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _case(variant: str, wd: str, fused: bool):
    act, biased = VARIANTS[variant]
    name = f"{variant}-{wd}-{'fused' if fused else 'split'}"
    c = make_case(*SHAPES[wd], seed=_seed(name), fused=fused, alpha=2.0 * SHAPES[wd][4])
    rng = np.random.default_rng(_seed(name) + 1)
    if wd != "bf16":
        # The weights the engine's GEMM sees: bf16 of the dequantized codes.
        def dq(w: np.ndarray) -> np.ndarray:
            codes, scales = kk.quantize_weights(w, wd, 32)
            return bf16(kk.dequantize_weights(codes, scales, wd, 32)).astype(np.float32)

        c = dataclasses.replace(c, gate=dq(c.gate), up=dq(c.up), down=dq(c.down))
    extra = {}
    if biased:
        extra = dict(
            bias_g=(rng.standard_normal((c.E, c.I)) * 0.5).astype(np.float32),
            bias_u=(rng.standard_normal((c.E, c.I)) * 0.5).astype(np.float32),
            bias_d=(rng.standard_normal((c.E, c.H)) * 0.5).astype(np.float32),
        )
    return dataclasses.replace(c, act=act, **extra)


def _engine(c, isa: str, wd: str, *, fused_bias: bool = True, **kw):
    eng = case_engine(c, isa=isa, weight_dtype=wd, group_size=32, **c.act.kwargs(), **kw)
    eng.load_weights(gate=c.gate, up=c.up, down=c.down)
    if c.bias_g is not None:
        if fused_bias:
            eng.set_biases(gate_up=np.concatenate([c.bias_g, c.bias_u], 1), down=c.bias_d)
        else:
            eng.set_biases(gate=c.bias_g.astype(BF16), up=c.bias_u, down=c.bias_d)
    return eng


def _check(c, got: dict, grads: dict) -> None:
    ref_out, cache = forward(c)
    ref = backward(c, cache)
    tol = flip_tol(c)
    for k in ("out", "dx", "dw"):
        assert max_rel_err(got[k], ref_out if k == "out" else ref[k]) <= tol, (k, got[k])
    for name, g in grads.items():
        err = max_rel_err(g, ref[name[len("grad_") :]])
        assert err <= tol, (name, err)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wd", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_forward_backward_lora(isa: str, wd: str, variant: str) -> None:
    """out, dx, dw and every LoRA gradient of each variant match the reference, fused LoRA."""
    c = _case(variant, wd, fused=True)
    eng = _engine(c, isa, wd)
    assert eng.isa == isa
    _, grads = bind_lora(eng, c)
    got = run(eng, c)
    eng.close()
    _check(c, got, grads)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", ["gpt_oss", "relu2"])
def test_variant_split_lora_and_split_biases(isa: str, variant: str) -> None:
    """Split LoRA (A per gate / up) and biases given as gate / up arrays (one of them bf16)."""
    c = _case(variant, "bf16", fused=False)
    eng = _engine(c, isa, "bf16", fused_bias=False)
    _, grads = bind_lora(eng, c)
    got = run(eng, c)
    eng.close()
    _check(c, got, grads)


@pytest.mark.parametrize("policy", ["retain", "recompute"])
@pytest.mark.parametrize("tp", [1, 2])
def test_variant_recompute_and_tp(policy: str, tp: int) -> None:
    """activation_policy="recompute" gives the retain path's bits (biases included in the
    recomputed gate/up); tp=2 slices match the reference (the down bias is added once)."""
    c = _case_i64()
    results = []
    for pol in ("retain", policy):
        eng = _engine(c, None, "bf16", tp=tp, activation_policy=pol)
        _, grads = bind_lora(eng, c)
        out = np.zeros((c.T, c.H), np.float32)
        eng.forward(c.x, c.ids, c.w, out)
        dx = np.zeros((c.T, c.H), np.float32)
        dw = np.zeros((c.T, c.K), np.float32)
        if pol == "recompute":
            eng.backward(c.dout, dx, dw, x=c.x)
        else:
            eng.backward(c.dout, dx, dw)
        eng.close()
        results.append((out, dx, dw, grads))
    for a, b in zip(results[0][:3], results[1][:3]):
        np.testing.assert_array_equal(a, b)
    for k in results[0][3]:
        np.testing.assert_array_equal(results[0][3][k], results[1][3][k])
    out, dx, dw, grads = results[1]
    _check(c, dict(out=out, dx=dx, dw=dw), grads)


def _case_i64():
    """gpt-oss variant with I = 64 (two 32-column slices for tp=2)."""
    act, _ = VARIANTS["gpt_oss"]
    c = make_case(4, 2, 48, 64, 2, 11, seed=_seed("gpt_oss-tp"), fused=True)
    rng = np.random.default_rng(_seed("gpt_oss-tp-bias"))
    return dataclasses.replace(
        c,
        act=act,
        bias_g=(rng.standard_normal((c.E, c.I)) * 0.5).astype(np.float32),
        bias_u=(rng.standard_normal((c.E, c.I)) * 0.5).astype(np.float32),
        bias_d=(rng.standard_normal((c.E, c.H)) * 0.5).astype(np.float32),
    )


def test_clamp_gradient_at_the_limit_matches_torch() -> None:
    """At g == limit and u == +-limit exactly, the gradient passes (torch.clamp's rule); above
    the limit it is zero. One expert, identity-like weights put chosen values into g and u."""
    torch = pytest.importorskip("torch")
    lim = 0.75
    H = I = 16  # noqa: E741
    g_vals = np.array([lim, lim + 0.25, -2.0, 0.5] * 4, np.float32)
    u_vals = np.array([lim, -lim, 1.5, -1.5] * 4, np.float32)
    eye = np.eye(I, H, dtype=np.float32)
    eng = kk.MoEEngine(
        1,
        1,
        H,
        I,
        activation_alpha=1.702,
        activation_limit=lim,
        activation_up_offset=1.0,
        num_threads=1,
    )
    # g = x through an identity gate; u = a bias over a zero up weight (both exact).
    eng.load_weights(gate=eye[None], up=np.zeros((1, I, H), np.float32), down=eye.T[None].copy())
    eng.set_biases(gate=np.zeros((1, I), np.float32), up=u_vals[None])
    x = g_vals[None]
    ids = np.zeros((1, 1), np.int64)
    w = np.ones((1, 1), np.float32)
    out = np.zeros((1, H), np.float32)
    eng.forward(x, ids, w, out)
    dout = np.ones((1, H), np.float32)
    dx = np.zeros((1, H), np.float32)
    dw = np.zeros((1, 1), np.float32)
    eng.backward(dout, dx, dw)
    eng.close()
    gt = torch.tensor(g_vals, dtype=torch.float64, requires_grad=True)
    gc = gt.clamp(max=lim)
    h = (
        (torch.tensor(u_vals, dtype=torch.float64).clamp(-lim, lim) + 1)
        * gc
        * torch.sigmoid(1.702 * gc)
    )
    h.sum().backward()
    # bf16 results of float32 math: within one bf16 rounding (2**-8) of the float64 values.
    np.testing.assert_allclose(out[0], h.detach().numpy(), rtol=2**-8, atol=0)
    # dx = dg (bf16) through the identity gate weight: zero exactly where g > limit.
    np.testing.assert_allclose(dx[0], gt.grad.numpy(), rtol=2**-8, atol=0)
    assert (dx[0][g_vals > lim] == 0).all() and (dx[0][g_vals == lim] != 0).all()


def test_default_options_are_the_silu_kernels() -> None:
    """The default options report SiLU without clamp or offset, and an explicitly spelled
    default gives the same bits as the implicit one (it takes the same ISA kernels)."""
    c = make_case(4, 2, 48, 40, 2, 9, seed=_seed("default-bits"))
    outs = []
    for kw in ({}, dict(activation="silu", activation_alpha=1.0, activation_limit=None)):
        eng = case_engine(c, **kw)
        assert eng.activation == {
            "name": "silu",
            "alpha": 1.0,
            "limit": None,
            "up_offset": 0.0,
            "gate_softcap": None,
            "up_softcap": None,
        }
        assert eng.has_biases == (False, False)
        eng.load_weights(gate_up=c.gate_up, down=c.down)
        _, grads = bind_lora(eng, c)
        outs.append({**run(eng, c), **grads})
        eng.close()
    for k in outs[0]:
        np.testing.assert_array_equal(outs[0][k], outs[1][k])


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(activation="swiglu"), "activation: expected 'silu', 'gelu', 'gelu_tanh' or 'relu2'"),
        (dict(activation="gelu", activation_alpha=1.5), "only the 'silu' activation"),
        (dict(activation_alpha=0.0), "activation_alpha: expected a finite number > 0"),
        (dict(activation_limit=0.0), "activation_limit: expected None or a number > 0"),
        (dict(activation_limit=float("nan")), "activation_limit"),
        (dict(activation_up_offset=float("inf")), "activation_up_offset: expected a finite"),
        (dict(activation_gate_softcap=0.0), "activation_gate_softcap: expected None or a number"),
        (dict(activation="relu2", activation_up_softcap=3.0), "soft-caps go with the 'silu'"),
    ],
)
def test_bad_activation_options(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        kk.MoEEngine(4, 2, 32, 32, **kw)


def test_bad_biases() -> None:
    eng = kk.MoEEngine(4, 2, 32, 48, num_threads=1)
    z = np.zeros
    with pytest.raises(ValueError, match="gate_up"):
        eng.set_biases(gate_up=z((4, 48), np.float32))
    with pytest.raises(ValueError, match="not both"):
        eng.set_biases(gate_up=z((4, 96), np.float32), gate=z((4, 48), np.float32))
    with pytest.raises(ValueError, match="go together"):
        eng.set_biases(gate=z((4, 48), np.float32))
    with pytest.raises(ValueError, match="down"):
        eng.set_biases(down=z((4, 48), np.float32))
    with pytest.raises(TypeError):
        eng.set_biases(down=z((4, 32), np.int32))
    eng.set_biases(down=z((4, 32), np.float32))
    assert eng.has_biases == (False, True)
    eng.set_biases(gate_up=z((4, 96), np.float32))
    assert eng.has_biases == (True, False)
    eng.close()
