"""W8A8 with backward_dtype="int8": backward's two base products (dY Wd and [dg | du] Wgu) run
int8 x int8 on the weights' codes, on gradient rows scaled by the weights' per-channel scales and
quantized per row (engine/w8a8.h). Checked against the NumPy reference of that exact math
(kk_reference.backward_w8a8_int8), for determinism across threads, ISAs and tp, against the
straight-through backward and the unquantized float reference (the error it adds), and for its
refusals and non-finite rows.

Tolerances (max |engine - reference| / max |reference| per array):
- Against backward_w8a8_int8: flip_tol = max(1e-3, 2**-6 / sqrt(I)), the tolerance of the bf16
  and straight-through tests. The codes, the integer sums and the float32 epilogue are reproduced
  exactly; what differs is upstream of the codes: D in float32 against float64 moves dg / du by
  float32 rounding, so now and then a dGU element rounds to the other neighbouring bf16 value and
  its code moves by one step (one weight code times the row scale max|v| / 127, on one term of a
  sum over 2I), and the float32 vs float64 LoRA terms as in the bf16 tests.
- Against the straight-through backward (backward_dtype "bf16") and the unquantized float
  reference: the int8 row quantization of dY * s_w and of [dg | du] * s_w adds noise of rms
  step / sqrt(12), step = max|row| / 127, i.e. ~0.7% of the rms of a Gaussian row (max ~3 sigma)
  and ~1.5% for the heavier-tailed dGU rows, through dot products where it adds in quadrature
  like the forward's activation noise. STE_BOUND = 4e-2 for dx, dw and the LoRA gradients against
  the straight-through backward (measured <= 1.7e-2); against the float reference the forward's
  BOUND of test_w8a8.py, 6e-2 (measured: dx 2.4e-2, dw 2.1e-2).
"""

from __future__ import annotations

import numpy as np
import pytest
from kk_helpers import W8A8_BOUND_CASES, W8A8_CASES, flip_tol, isa_params, make_engine, run
from kk_reference import (
    backward,
    backward_w8a8_int8,
    dequantized,
    forward,
    forward_w8a8,
    make_case,
    max_rel_err,
    quantize_rows_i8_mul,
)

import kt_kernels as kk

ISAS = isa_params()
STE_BOUND = 4e-2
BOUND = 6e-2

CASES = W8A8_CASES


def int8_bwd_engine(c, **kw) -> tuple[kk.MoEEngine, dict[str, np.ndarray]]:
    eng, _, grads = make_engine(
        c, weight_dtype="int8", activation_dtype="int8", backward_dtype="int8", **kw
    )
    return eng, grads


def results(c, backward_dtype: str = "int8", **kw) -> dict:
    """forward + backward (x passed again, for activation_policy="recompute"), then close."""
    eng, _, grads = make_engine(
        c, weight_dtype="int8", activation_dtype="int8", backward_dtype=backward_dtype, **kw
    )
    out = np.empty((c.T, c.H), np.float32)
    dx = np.empty((c.T, c.H), np.float32)
    dw = np.empty((c.T, c.K), np.float32)
    eng.forward(c.x, c.ids, c.w, out)
    eng.backward(c.dout, dx, dw, x=c.x)
    eng.close()
    return {"out": out, "dx": dx, "dw": dw, **grads}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_int8_backward_reference(
    isa: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    *shape, fused, tp = CASES[case]
    c = make_case(*shape, seed=3, fused=fused)
    monkeypatch.setenv("KT_KERNELS_ISA", isa)
    eng, grads = int8_bwd_engine(c, threads=2, tp=tp)
    assert eng.isa == isa and eng.backward_dtype == "int8"
    got = run(eng, c)
    _, cache = forward_w8a8(c)
    ref = backward_w8a8_int8(c, cache)
    tol = flip_tol(c)
    assert max_rel_err(got["dx"], ref["dx"]) <= tol, max_rel_err(got["dx"], ref["dx"])
    assert max_rel_err(got["dw"], ref["dw"]) <= tol, max_rel_err(got["dw"], ref["dw"])
    for name, g in grads.items():
        assert max_rel_err(g, ref[name[len("grad_") :]]) <= tol, name
    if c.T > 0:  # the reference is not the straight-through one: the test can tell them apart
        ste = backward(dequantized(c), cache)
        assert max_rel_err(ste["dx"], ref["dx"]) > 3 * tol
    eng.close()


def test_reference_is_the_exact_int8_math() -> None:
    """The reference against a direct evaluation of its definition on one expert's rows."""
    rng = np.random.default_rng(5)
    v = (rng.standard_normal((7, 50)) * np.array([1, 1e-3, 1, 1, 1e3, 1, 1])[:, None]).astype(
        np.float32
    )
    v[2] = 0.0
    v[3, 4] = np.nan
    v[5, :] = np.float32(1e-38)  # 127 / max overflows: the division rule
    codes, s = quantize_rows_i8_mul(v)
    for row in (0, 1, 4, 6):
        amax = np.float32(np.abs(v[row]).max())
        assert s[row] == np.float32(amax / np.float32(127))
        want = np.clip(np.rint(v[row] * (np.float32(127) / amax)), -127, 127)
        np.testing.assert_array_equal(codes[row], want.astype(np.int8))
        assert np.abs(codes[row]).max() == 127
    assert s[2] == 0 and not codes[2].any()
    assert np.isnan(s[3]) and not codes[3].any()
    assert np.all(codes[5] == 127) and s[5] == np.float32(np.float32(1e-38) / np.float32(127))


@pytest.mark.parametrize("case", ["lora-split-k4", "skip-lora-tp3-ragged"])
def test_bitwise_across_threads_isas_and_retain_recompute(case: str) -> None:
    """Codes and integer sums are exact, so backward is bitwise equal across thread counts and
    activation policies for each ISA; across SIMD ISAs too without LoRA (the LoRA products' float32
    order is per ISA, test_vec.py). Across tp the slices' int32 partials are scaled on their own and
    added in float32: equal to float32 rounding."""
    *shape, fused, tp = CASES[case]
    c = make_case(*shape, seed=8, fused=fused)
    first = {}
    for isa in kk.available_isas():
        for t in (tp, 1):
            base = None
            for threads, policy in ((1, "retain"), (2, "recompute"), (3, "retain")):
                r = results(c, isa=isa, threads=threads, tp=t, activation_policy=policy)
                if base is None:
                    base = r
                for name, v in r.items():
                    np.testing.assert_array_equal(v, base[name], err_msg=f"{isa} tp={t} {name}")
            first.setdefault(isa, base)
            for key in ("dx", "dw"):
                assert max_rel_err(base[key], first[isa][key]) <= 1e-5, (isa, t, key)
    simd = [i for i in kk.available_isas() if i != "scalar"]
    if c.lora is None:
        for isa in simd[1:]:
            for key in ("dx", "dw"):
                np.testing.assert_array_equal(first[isa][key], first[simd[0]][key], err_msg=isa)


@pytest.mark.parametrize("case", list(W8A8_BOUND_CASES))
def test_error_against_straight_through_and_float(case: str) -> None:
    *shape, fused = W8A8_BOUND_CASES[case]
    c = make_case(*shape, seed=13, fused=fused)
    got = results(c, threads=2)
    ste = results(c, backward_dtype="bf16", threads=2)
    np.testing.assert_array_equal(got["out"], ste["out"])  # forward is unchanged
    names = ["dx", "dw"] + [n for n in got if n.startswith("grad_") and "down" not in n]
    for key in names:
        err = max_rel_err(got[key], ste[key])
        assert 1e-3 < err <= STE_BOUND, (key, err)  # > 1e-3: the gradients really are int8
    for key in [n for n in got if n.startswith("grad_") and "down" in n]:
        # The down projection's LoRA gradients read dY and h, not the int8 products.
        np.testing.assert_array_equal(got[key], ste[key], err_msg=key)
    _, full_cache = forward(c)
    full = backward(c, full_cache)
    for key in ("dx", "dw"):
        err = max_rel_err(got[key], full[key])
        assert err <= BOUND, (key, err)


def test_nonfinite_gradient_rows_give_nan_for_their_tokens_only() -> None:
    c = make_case(6, 2, 128, 96, 2, 12, seed=21, fused=True)
    dout = c.dout.copy()
    dout[3, 5] = np.nan
    dout[7, 0] = np.inf
    eng, _ = int8_bwd_engine(c, threads=2)
    got = run(eng, c, dout=dout)
    eng.close()
    bad = np.zeros(c.T, bool)
    bad[[3, 7]] = True
    assert np.all(np.isnan(got["dx"][bad]).any(axis=1))
    assert np.all(np.isfinite(got["dx"][~bad])) and np.all(np.isfinite(got["dw"][~bad]))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(weight_dtype="int8"), "needs activation_dtype='int8'"),
        (dict(weight_dtype="bf16"), "needs activation_dtype='int8'"),
        (
            dict(weight_dtype="int8", activation_dtype="int8", backward_dtype="fp8"),
            "'bf16' or 'int8'",
        ),
    ],
)
def test_refusals(kw: dict, match: str) -> None:
    kw = {"backward_dtype": "int8", **kw}
    with pytest.raises(ValueError, match=match):
        kk.MoEEngine(4, 2, 64, 64, **kw)


def test_default_and_property() -> None:
    eng = kk.MoEEngine(4, 2, 64, 64, weight_dtype="int8", activation_dtype="int8")
    assert eng.backward_dtype == "bf16"
    eng.close()
    eng = kk.MoEEngine(
        4, 2, 64, 64, weight_dtype="int8", activation_dtype="int8", backward_dtype="int8"
    )
    assert eng.backward_dtype == "int8"
    eng.close()
