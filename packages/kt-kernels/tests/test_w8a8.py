"""W8A8 (weight_dtype="int8", activation_dtype="int8"): forward against the NumPy reference of the
exact W8A8 math (kk_reference.forward_w8a8), the straight-through backward against the reference
backward on the dequantized weights with the W8A8 forward's activations, determinism, and the
stated error bound against the unquantized float reference.

Tolerances (max |engine - reference| / max |reference| per output array):
- Forward without LoRA: TIGHT = 1e-6. The int8 codes of x, the integer matmuls and the float32
  epilogue (float32(acc) * s_row) * s_channel are reproduced exactly by the reference, so g and u
  are bit-identical; what remains is the float32 combine over slots and, in principle, an h whose
  float32 silu lands on the other side of a bf16 rounding boundary than the reference's float64
  one (not seen on these cases; measured <= 1.3e-7).
- Forward with LoRA: OUT_TOL = 2e-3. The LoRA term is summed in float32 by the engine and in
  float64 by the reference, so now and then an element of h rounds to the other neighbouring bf16
  value; its int8 code may then move by one step (sh * |w_down| on a few outputs), or, when it is
  its row's maximum, the row's scale moves by 2**-8 and the row is requantized on a slightly
  different grid. Measured over 12 seeds of a 2100-row case: <= 9.6e-4; usually ~1e-7.
- Backward (dx, dw, LoRA grads) against the STE reference: the tolerances of the bf16 tests,
  max(1e-3, 2**-6 / sqrt(I)) (measured <= 3.5e-4).
- Against the unquantized float reference (what W8A8 costs): BOUND = 6e-2 for out, dx and dw.
  Per-row int8 activation noise is rms step / sqrt(12), step = max|row| / 127: ~0.7% of the rms of
  a Gaussian x row (H = 256: max ~2.9 sigma), ~1.5% for h (silu(g) * u has heavier tails), on top
  of the int8 weight noise (~0.6% per weight, test_quant.py); these add in quadrature through the
  dot products (~1.8% rms) and the largest error over all outputs is a few rms. Measured on
  BOUND_CASES: out 2.5e-2, dx 1.6e-2, dw 1.6e-2 (weight-only int8 on the same cases: out 1.4e-2,
  dx 1.8e-2, dw 1.5e-2: the STE backward adds little, it differs only through the cached g, u).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAST
from kk_helpers import (
    W8A8_BOUND_CASES,
    W8A8_CASES,
    flip_tol,
    isa_params,
    make_engine,
    run,
    run_and_close,
)
from kk_reference import (
    backward,
    dequantized,
    forward,
    forward_w8a8,
    make_case,
    max_rel_err,
    quantize_rows_i8,
)

import kt_kernels as kk

ISAS = isa_params()
TIGHT = 1e-6
OUT_TOL = 2e-3
BOUND = 6e-2

CASES = W8A8_CASES
if FAST:
    CASES = {k: v for k, v in CASES.items() if "t300" not in k}
BOUND_CASES = W8A8_BOUND_CASES


def w8a8_engine(c, **kw) -> tuple[kk.MoEEngine, dict[str, np.ndarray]]:
    """make_engine with int8 weights and int8 activations; returns (engine, grads)."""
    eng, _, grads = make_engine(c, weight_dtype="int8", activation_dtype="int8", **kw)
    return eng, grads


def all_results(c, **kw) -> dict:
    eng, grads = w8a8_engine(c, **kw)
    return run_and_close(eng, c, grads)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_w8a8_reference(isa: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    *shape, fused, tp = CASES[case]
    c = make_case(*shape, seed=3, fused=fused)
    monkeypatch.setenv("KT_KERNELS_ISA", isa)  # the ISA forced as users force it
    eng, grads = w8a8_engine(c, threads=2, tp=tp)
    assert eng.isa == isa and eng.tp == tp and eng.activation_dtype == "int8"
    got = run(eng, c)
    ref_out, cache = forward_w8a8(c)
    ref = backward(dequantized(c), cache)  # straight-through: the weight-only int8 gradients
    out_tol = TIGHT if c.lora is None else OUT_TOL
    assert max_rel_err(got["out"], ref_out) <= out_tol, max_rel_err(got["out"], ref_out)
    tol = flip_tol(c)
    assert max_rel_err(got["dx"], ref["dx"]) <= tol, max_rel_err(got["dx"], ref["dx"])
    assert max_rel_err(got["dw"], ref["dw"]) <= tol, max_rel_err(got["dw"], ref["dw"])
    for name, g in grads.items():
        assert max_rel_err(g, ref[name[len("grad_") :]]) <= tol, name
    eng.close()


@pytest.mark.parametrize("case", ["lora-split-k4", "skip-lora-tp3-ragged"])
def test_bitwise_across_threads_isas_and_tp(case: str) -> None:
    """Integer GEMMs are exact and everything after them is the same float32 code on every ISA,
    so forward outputs are bitwise equal across threads and ISAs. (silu's exp is the one
    ISA-dependent float op: a polynomial on every SIMD ISA, libm's on scalar; scalar is held to
    TIGHT / OUT_TOL, though on these cases it is bitwise equal too.) Backward is bitwise equal
    across thread counts for each ISA and tp. Across tp the outputs agree to float32 rounding,
    not bitwise: each slice's int32 partial is scaled on its own (on its thread group) and the
    float partials are added per token in slice order."""
    *shape, fused, tp = CASES[case]
    c = make_case(*shape, seed=8, fused=fused)
    isas = kk.available_isas()
    first = {}
    for isa in isas:
        for t in (tp, 1):
            base = None
            for threads in (1, 2, 3):
                r = all_results(c, isa=isa, threads=threads, tp=t)
                if base is None:
                    base = r
                for name, v in r.items():
                    np.testing.assert_array_equal(v, base[name], err_msg=f"{isa} tp={t} {name}")
            first.setdefault(isa, base)
            assert max_rel_err(base["out"], first[isa]["out"]) <= 1e-5, (
                f"{isa}: forward differs between tp={tp} and 1"
            )
    simd = [i for i in isas if i != "scalar"]
    for isa in simd[1:]:
        np.testing.assert_array_equal(first[isa]["out"], first[simd[0]]["out"], err_msg=isa)
    tol = TIGHT if c.lora is None else OUT_TOL
    for isa in simd:
        assert max_rel_err(first[isa]["out"], first["scalar"]["out"]) <= tol


@pytest.mark.parametrize("case", list(BOUND_CASES))
def test_error_bound_vs_unquantized(case: str) -> None:
    *shape, fused = BOUND_CASES[case]
    c = make_case(*shape, seed=13, fused=fused)
    got = all_results(c, threads=2)
    full_out, full_cache = forward(c)
    full = backward(c, full_cache)
    for key, want in (("out", full_out), ("dx", full["dx"]), ("dw", full["dw"])):
        err = max_rel_err(got[key], want)
        assert 1e-3 < err <= BOUND, (key, err)  # > 1e-3: the activations really are int8


def test_inference_padding_duplicates_and_empty() -> None:
    c = make_case(6, 3, 128, 96, 2, 25, seed=4, pad_frac=0.2, dup_frac=0.5)
    c.ids[0, :] = -1  # a token routed nowhere
    eng, _ = w8a8_engine(c, threads=2)
    saved = np.full((c.T, c.H), np.nan, np.float32)
    eng.forward(c.x, c.ids, c.w, saved)
    infer = np.full((c.T, c.H), np.nan, np.float32)
    eng.forward(c.x, c.ids, c.w, infer, save_for_backward=False)
    assert eng.cache_depth == 1
    np.testing.assert_array_equal(infer, saved)
    assert not infer[0].any()
    ref_out, _ = forward_w8a8(c)
    assert max_rel_err(infer, ref_out) <= OUT_TOL
    dx = np.empty_like(saved)
    dw = np.empty((c.T, c.K), np.float32)
    eng.backward(c.dout, dx, dw)
    assert not dx[0].any() and not dw[0].any() and not dw[c.ids == -1].any()
    # T = 0 with every phase running on empty work.
    e = np.empty((0, c.H), np.float32)
    eng.forward(e, np.empty((0, c.K), np.int64), np.empty((0, c.K), np.float32), e.copy())
    eng.backward(e, e.copy(), np.empty((0, c.K), np.float32))
    eng.close()


def test_skip_lora_and_inference_only_engine() -> None:
    c = make_case(4, 2, 64, 64, 0, 9, seed=6)
    eng, _ = w8a8_engine(c)
    out = np.empty((c.T, c.H), np.float32)
    eng.forward(c.x, c.ids, c.w, out, save_for_backward=False)
    assert eng.cache_depth == 0
    ref_out, _ = forward_w8a8(c)
    assert max_rel_err(out, ref_out) <= TIGHT
    eng.close()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("split", [False, True])
def test_prequantized_equals_load_time_quantization(
    isa: str, split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KT_KERNELS_ISA", isa)
    c = make_case(4, 2, 128, 96, 2, 13, seed=5, fused=not split)
    want = all_results(c)
    got = all_results(c, prequantized=True, split_weights=split, threads=2)
    for name, v in want.items():
        np.testing.assert_array_equal(got[name], v, err_msg=name)


def test_nan_and_inf_rows_give_nan_outputs() -> None:
    c = make_case(4, 2, 64, 64, 0, 6, seed=2, pad_frac=0.0)
    x = c.x.copy()
    x[1, 3] = np.nan
    x[4, 0] = np.inf
    eng, _ = w8a8_engine(c)
    out = np.empty((c.T, c.H), np.float32)
    eng.forward(x, c.ids, c.w, out, save_for_backward=False)
    assert np.isnan(out[1]).all() and np.isnan(out[4]).all()
    rest = [0, 2, 3, 5]
    assert np.isfinite(out[rest]).all()
    ref_out, _ = forward_w8a8(c, x)
    assert max_rel_err(out[rest], ref_out[rest]) <= TIGHT
    eng.close()


def test_reference_quantizer_rules() -> None:
    codes, s = quantize_rows_i8(np.array([[0.0, 0.0], [1.0, -2.0], [127.0, 0.5], [np.nan, 1.0]]))
    assert s[0] == 0 and not codes[0].any()
    assert s[1] == np.float32(2.0 / 127) and list(codes[1]) == [64, -127]  # 63.5 -> 64 (even)
    assert list(codes[2]) == [127, 0]  # 0.5 -> 0 (half to even)
    assert np.isnan(s[3]) and not codes[3].any()


def test_memory_timings_and_profile_phases() -> None:
    c = make_case(2, 2, 256, 256, 2, 8, seed=1)
    sizes = {}
    for act in ("bf16", "int8"):
        wd = "bf16" if act == "bf16" else "int8"
        eng = kk.MoEEngine(c.E, c.K, c.H, c.I, weight_dtype=wd, activation_dtype=act, num_threads=1)
        eng.load_weights(gate_up=c.gate_up, down=c.down)
        sizes[act] = eng.memory_stats()["weight_bytes"]
        if act == "int8":
            out = np.empty((c.T, c.H), np.float32)
            with kk.profile(clear=True):
                eng.forward(c.x, c.ids, c.w, out, save_for_backward=False)
            phases = [k.split(".", 1)[1] for k in eng.last_timings() if k.startswith("forward.")]
            assert {"quantize_x", "quantize_h"} <= set(phases)
            stats = eng.profile_stats()
            assert stats["forward.quantize_x"]["calls"] == 1
            assert stats["forward.quantize_h"]["calls"] == 1
            table = eng.profile_summary().splitlines()
            order = [ln.split()[0] for ln in table[1:]]
            assert order.index("forward.quantize_x") < order.index("forward.gather")
            assert order.index("forward.gate_up") < order.index("forward.quantize_h")
        eng.close()
    # Codes (0.5 of bf16) + per block of 16 rows: 16 int32 row sums and 16 float32 scales.
    assert 0.5 < sizes["int8"] / sizes["bf16"] <= 0.52


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("wd", ["bf16", "int4"])
def test_int8_activations_need_int8_weights(wd: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"activation_dtype='int8'.*weight_dtype='int8'.*"
        rf"got weight_dtype='{wd}'.*activation_dtype='bf16'",
    ):
        kk.MoEEngine(4, 2, 64, 32, weight_dtype=wd, activation_dtype="int8")


def test_unknown_activation_dtype() -> None:
    with pytest.raises(ValueError, match=r"activation_dtype: expected 'bf16' or 'int8', got 'fp8'"):
        kk.MoEEngine(4, 2, 64, 32, weight_dtype="int8", activation_dtype="fp8")
    with kk.MoEEngine(4, 2, 64, 32) as eng:
        assert eng.activation_dtype == "bf16" and eng._eng.activation_dtype == "bf16"


def test_prequantized_codes_of_wrong_dtype_or_shape() -> None:
    rng = np.random.default_rng(0)
    gu = rng.standard_normal((4, 64, 64)).astype(np.float32)
    d = rng.standard_normal((4, 64, 32)).astype(np.float32)
    a, sa = kk.quantize_weights(gu, "int8")
    b, sb = kk.quantize_weights(d, "int8")

    def engine():
        return kk.MoEEngine(
            4, 2, 64, 32, weight_dtype="int8", activation_dtype="int8", num_threads=1
        )

    a4, sa4 = kk.quantize_weights(gu, "int4", 32)
    with engine() as eng, pytest.raises(TypeError, match="expects int8 codes, got uint8"):
        eng.load_quantized_weights(gate_up=a4, gate_up_scale=sa, down=b, down_scale=sb)
    with engine() as eng, pytest.raises(TypeError, match="expects int8 codes, got float32"):
        eng.load_quantized_weights(
            gate_up=a.astype(np.float32), gate_up_scale=sa, down=b, down_scale=sb
        )
    with engine() as eng, pytest.raises(ValueError, match=r"down: expected shape"):
        eng.load_quantized_weights(
            gate_up=a, gate_up_scale=sa, down=b[:, :, :16].copy(), down_scale=sb
        )
    with engine() as eng, pytest.raises(ValueError, match="gate_up_scale"):
        eng.load_quantized_weights(gate_up=a, gate_up_scale=sa4, down=b, down_scale=sb)
    with engine() as eng:
        eng.load_quantized_weights(gate_up=a, gate_up_scale=sa, down=b, down_scale=sb)
        assert eng._eng.weights_loaded


def test_depth_limit_of_int32_sums() -> None:
    with pytest.raises(ValueError, match="at most 131072"):
        kk.MoEEngine(2, 1, 131073, 64, weight_dtype="int8", activation_dtype="int8")
