"""MoEEngine forward/backward against the NumPy float64 reference (kk_reference), on every ISA.

Tolerances (max |engine - reference| / max |reference|, per output array):
- float32 outputs and gradients: TOL = 1e-3. The reference rounds to bf16 at the same points as
  the engine (x, grad_out, h, dg/du before the base GEMM) and uses the same bf16 weights, so what
  is left is float32 accumulation (~sqrt(K) * 2**-24, K <= 2048: < 1e-5) plus, rarely, an
  intermediate that lands on the other side of a bf16 rounding boundary (one of the I or 2I terms
  of a dot product moves by 2**-8 of itself: ~2**-8 / sqrt(I) < 5e-4 of the largest output).
  For small I a flipped term is a larger share of its dot product, so the bound used is
  max(TOL, 2**-6 / sqrt(I)) (I = 1: 1.6e-2; I >= 256: TOL). Still far below what a wrong or
  missing term costs (the LoRA and routing terms of these cases are O(1) of the output).
- bfloat16 outputs: that bound + 2**-8, the rounding of the result itself.

A flip is a property of the data, so every case draws fixed data: its seed is the CRC-32 of the
case name (stable across processes, unlike `hash()` of a string). Per ISA the engine's arithmetic
is IEEE float32/bf16 in a fixed order (exp is a polynomial, no vendor-specific approximate
instructions), so an ISA path gives the same bits on every CPU that runs it: a case that passes
here on each ISA passes on AMD and Intel machines alike. Over 1 000 seeds of `odd-split-bf16`
(I = 72, bound 1.8e-3) one seed has a flipped term carrying ~1/6 of its output (dw 2.9e-3); the
fixed seeds keep such a draw from appearing at random.
"""

from __future__ import annotations

import gc
import zlib

import numpy as np
import pytest
from conftest import FAST
from kk_helpers import flip_tol, grad_arrays, isa_params, lora_arrays, make_engine, run
from kk_reference import BF16, backward, forward, make_case, max_rel_err

import kt_kernels as kk

TOL = 1e-3

ISAS = isa_params()

# name: (E, K, H, I, r, T, fused, lora dtype, PEFT-strided LoRA)
CASES = {
    "odd-fused-f32": (8, 4, 200, 72, 3, 7, True, np.float32, False),
    "odd-split-bf16": (8, 2, 200, 72, 3, 7, False, BF16, False),
    "k1-t1": (4, 1, 64, 40, 2, 1, True, np.float32, False),
    "t0": (4, 2, 64, 40, 2, 0, True, np.float32, False),
    "skip-lora-k8": (16, 8, 96, 48, 0, 7, True, np.float32, False),
    "t513-e64-k8-peft": (64, 8, 200, 72, 3, 513, True, np.float32, True),
    "split-peft-bf16": (12, 3, 48, 80, 5, 33, False, BF16, True),
    # ~4,600 routed rows x 2I = 2048 fp32: a cached [g | u] over 32 MiB, written with non-temporal
    # stores (engine_internal.h, kStreamMinBytes) and read back by backward.
    "t2560-streamed-gu": (4, 2, 64, 1024, 2, 2560, True, np.float32, False),
    # H = 2048 and ~9,000 routed rows: y and backward's dx partials over 32 MiB, streamed too, and so are
    # the x and dY rows gathered in expert order (~9,000 x 2,080 bf16).
    "t5500-streamed-y-rows": (4, 2, 2048, 64, 2, 5500, True, np.float32, False),
    # H = 1024 and I = 1024: bf16 gate_up and down blocks (and the x, dY and h rows) are stored
    # one zero step deeper, 1056 (quant::unaliased_depth); backward's transposed products keep
    # depth 1024.
    "hi1024-zero-step": (4, 2, 1024, 1024, 2, 9, False, np.float32, False),
}
if FAST:
    CASES = {k: v for k, v in CASES.items() if "t513" not in k}


def check_all(c, got, grads, tol=None, out_tol=None):
    tol = flip_tol(c) if tol is None else tol
    ref_out, cache = forward(c)
    ref = backward(c, cache)
    out_tol = tol if out_tol is None else out_tol
    assert max_rel_err(got["out"], ref_out) <= out_tol, max_rel_err(got["out"], ref_out)
    assert max_rel_err(got["dx"], ref["dx"]) <= out_tol, max_rel_err(got["dx"], ref["dx"])
    assert max_rel_err(got["dw"], ref["dw"]) <= tol, max_rel_err(got["dw"], ref["dw"])
    for name, g in grads.items():
        err = max_rel_err(g, ref[name[len("grad_") :]])
        assert err <= tol, (name, err)
    return ref_out, ref


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(isa: str, case: str) -> None:
    E, K, H, I, r, T, fused, ldt, peft = CASES[case]  # noqa: E741 (I is the spec's name)
    c = make_case(
        E,
        K,
        H,
        I,
        r,
        T,
        seed=zlib.crc32(case.encode()) % 1000,
        fused=fused,
        used_experts=E - 1,
        alpha=2.0 * r if r else None,
    )
    eng, _, grads = make_engine(c, isa=isa, lora_dtype=ldt, peft_strided=peft)
    assert eng.isa == isa
    if ldt is BF16:
        # The engine reads bf16 LoRA weights exactly; give the reference the same values.
        for k in ("a_g", "a_u", "b_g", "b_u", "a_d", "b_d"):
            setattr(c.lora, k, getattr(c.lora, k).astype(BF16).astype(np.float32))
        if c.lora.fused:
            c.lora.a_u = c.lora.a_g
    got = run(eng, c)
    check_all(c, got, grads)
    assert eng.cache_depth == 0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("top_k", range(1, 9))
def test_top_k_range(isa: str, top_k: int) -> None:
    c = make_case(10, top_k, 40, 24, 2, 7, seed=100 + top_k, fused=top_k % 2 == 0, used_experts=7)
    eng, _, grads = make_engine(c, isa=isa)
    check_all(c, run(eng, c), grads)


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_activations_and_split_weights(isa: str) -> None:
    """x / out / grad_out / grad_input in bfloat16 (NumPy + ml_dtypes), base weights given split
    and in bfloat16."""
    c = make_case(6, 2, 80, 40, 2, 9, seed=3, fused=True)
    eng, _, grads = make_engine(c, isa=isa, split_weights=True, weight_array_dtype=BF16)
    got = run(eng, c, act_dtype="bf16")
    check_all(c, got, grads, out_tol=flip_tol(c) + 2.0**-8)


@pytest.mark.parametrize("isa", ISAS)
def test_threads_bitwise_equal(isa: str) -> None:
    c = make_case(16, 4, 120, 56, 3, 65, seed=5, fused=False, used_experts=12)
    results = []
    # 3 and 4 threads oversubscribe this 2-core machine and grow the shared pool after it ran.
    for threads in (1, 2, 3, 4):
        eng, _, grads = make_engine(c, isa=isa, threads=threads)
        got = run(eng, c)
        results.append((got, {k: v.copy() for k, v in grads.items()}))
    g1, gr1 = results[0]
    for g2, gr2 in results[1:]:
        for k in g1:
            assert np.array_equal(g1[k], g2[k], equal_nan=True), k
        for k in gr1:
            assert np.array_equal(gr1[k], gr2[k]), k
    # And run to run.
    eng, _, grads = make_engine(c, isa=isa, threads=2)
    g3 = run(eng, c)
    for k in g1:
        assert np.array_equal(g1[k], g3[k]), k


@pytest.mark.parametrize("isa", ISAS)
def test_cache_depth_two_lifo(isa: str) -> None:
    c = make_case(8, 2, 64, 32, 2, 11, seed=7)
    c2 = make_case(8, 2, 64, 32, 2, 5, seed=8)  # a second batch (other T) through the same engine
    c2.gate, c2.up, c2.down, c2.lora = c.gate, c.up, c.down, c.lora
    eng, _, grads = make_engine(c, isa=isa, max_cache_depth=2)
    out1 = np.empty((c.T, c.H), np.float32)
    out2 = np.empty((c2.T, c2.H), np.float32)
    eng.forward(c.x, c.ids, c.w, out1)
    eng.forward(c2.x, c2.ids, c2.w, out2)
    assert eng.cache_depth == 2
    with pytest.raises(RuntimeError, match="max_cache_depth=2"):
        eng.forward(c.x, c.ids, c.w, out1)
    # LIFO: the second forward's backward first (its T = 5).
    with pytest.raises(ValueError, match="grad_out"):
        eng.backward(c.dout, np.empty_like(c.dout), np.empty((c.T, c.K), np.float32))
    dx2, dw2 = np.empty((c2.T, c2.H), np.float32), np.empty((c2.T, c2.K), np.float32)
    eng.backward(c2.dout, dx2, dw2)
    g2 = {k: v.copy() for k, v in grads.items()}
    dx1, dw1 = np.empty((c.T, c.H), np.float32), np.empty((c.T, c.K), np.float32)
    eng.backward(c.dout, dx1, dw1)
    assert eng.cache_depth == 0
    ref1_out, cache1 = forward(c)
    ref1 = backward(c, cache1)
    ref2_out, cache2 = forward(c2)
    ref2 = backward(c2, cache2)
    assert max_rel_err(out1, ref1_out) <= TOL and max_rel_err(out2, ref2_out) <= TOL
    assert max_rel_err(dx1, ref1["dx"]) <= TOL and max_rel_err(dx2, ref2["dx"]) <= TOL
    assert max_rel_err(dw1, ref1["dw"]) <= TOL and max_rel_err(dw2, ref2["dw"]) <= TOL
    for k, v in grads.items():
        name = k[len("grad_") :]
        assert max_rel_err(g2[k], ref2[name]) <= TOL, k
        assert max_rel_err(v, ref1[name] + ref2[name]) <= TOL, k


@pytest.mark.parametrize("isa", ISAS)
def test_gradient_accumulation_two_steps(isa: str) -> None:
    c = make_case(8, 3, 64, 48, 4, 13, seed=9, fused=True)
    eng, _, grads = make_engine(c, isa=isa)
    run(eng, c)
    once = {k: v.copy() for k, v in grads.items()}
    run(eng, c)
    for k, v in grads.items():
        # Same inputs twice: exactly twice the single-step gradient (x + x is exact in fp32).
        assert np.array_equal(v, 2 * once[k]), k


def test_isa_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_KERNELS_ISA", "scalar")
    assert kk.active_isa() == "scalar"
    c = make_case(4, 2, 48, 32, 2, 5, seed=11)
    eng, _, grads = make_engine(c, isa=None)
    assert eng.isa == "scalar"
    check_all(c, run(eng, c), grads)
    monkeypatch.setenv("KT_KERNELS_ISA", "not-an-isa")
    with pytest.raises(ValueError, match="KT_KERNELS_ISA"):
        kk.MoEEngine(4, 2, 48, 32)


def test_explicit_isa_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_KERNELS_ISA", "scalar")
    best = kk.available_isas()[-1]
    assert kk.MoEEngine(4, 2, 48, 32, isa=best).isa == best
    with pytest.raises(ValueError, match="isa"):
        kk.MoEEngine(4, 2, 48, 32, isa="sse9")


def test_available_and_active_isa() -> None:
    isas = kk.available_isas()
    assert isas[0] == "scalar"
    assert kk.active_isa() in isas
    # ISAS: every name, lowest first; the runnable ones are a subsequence of it.
    assert kk.ISAS[0] == "scalar" and len(set(kk.ISAS)) == len(kk.ISAS)
    assert [i for i in kk.ISAS if i in isas] == isas
    with pytest.raises(ValueError, match="expected one of " + ", ".join(kk.ISAS)):
        kk.MoEEngine(4, 2, 48, 32, isa="sse9")


@pytest.mark.parametrize("isa", ISAS)
def test_submit_sync_matches_forward(isa: str) -> None:
    c = make_case(8, 2, 64, 32, 2, 17, seed=13)
    eng, _, _ = make_engine(c, isa=isa, threads=2)
    ref = np.empty((c.T, c.H), np.float32)
    eng.forward(c.x, c.ids, c.w, ref, save_for_backward=False)
    out = np.empty_like(ref)
    eng.submit_forward(c.x, c.ids, c.w, out)
    with pytest.raises(RuntimeError, match="sync_forward"):
        eng.forward(c.x, c.ids, c.w, out)
    eng.sync_forward()
    assert np.array_equal(out, ref)
    assert eng.cache_depth == 1
    with pytest.raises(RuntimeError, match="no submitted forward"):
        eng.sync_forward()


def test_submit_checks_arguments_before_returning() -> None:
    c = make_case(4, 2, 48, 32, 0, 3, seed=1)
    eng, _, _ = make_engine(c)
    with pytest.raises(ValueError, match="expert_ids"):
        eng.submit_forward(c.x, np.full((3, 2), 9), c.w, np.empty((3, 48), np.float32))
    eng.close()  # nothing pending


def test_inference_path_leaves_no_cache() -> None:
    c = make_case(6, 2, 64, 32, 2, 9, seed=17)
    eng, _, _ = make_engine(c, max_cache_depth=1)
    out = np.empty((c.T, c.H), np.float32)
    for _ in range(3):
        eng.forward(c.x, c.ids, c.w, out, save_for_backward=False)
    assert eng.cache_depth == 0
    assert max_rel_err(out, forward(c)[0]) <= TOL
    with pytest.raises(RuntimeError, match="no forward is pending"):
        eng.backward(c.dout, np.empty_like(c.dout), np.empty((c.T, c.K), np.float32))


def test_lora_updated_rereads_values() -> None:
    c = make_case(6, 2, 64, 32, 2, 9, seed=19)
    eng, lora, _ = make_engine(c)
    out0 = np.empty((c.T, c.H), np.float32)
    eng.forward(c.x, c.ids, c.w, out0, save_for_backward=False)
    lora["b_down"] *= 3.0  # in place, as an optimizer step does
    out1 = np.empty_like(out0)
    eng.forward(c.x, c.ids, c.w, out1, save_for_backward=False)
    assert np.array_equal(out0, out1)  # not re-read yet
    eng.lora_updated()
    eng.forward(c.x, c.ids, c.w, out1, save_for_backward=False)
    c.lora.b_d = c.lora.b_d * 3.0
    assert max_rel_err(out1, forward(c)[0]) <= TOL


def test_grads_optional() -> None:
    c = make_case(6, 2, 64, 32, 2, 9, seed=21)
    eng, _, grads = make_engine(c, with_grads=False)
    assert grads == {}
    got = run(eng, c)
    check_all(c, got, {})


def test_bound_arrays_outlive_caller_references() -> None:
    """Lifetime rule: the engine holds references to bound LoRA arrays, so dropping the caller's
    references frees nothing while bound."""
    c = make_case(6, 2, 64, 32, 2, 9, seed=23)
    eng, lora, grads = make_engine(c)
    keep_grads = grads  # read back below through our reference
    del lora
    gc.collect()
    got = run(eng, c)
    check_all(c, got, keep_grads)


def test_t_above_max_tokens_grows() -> None:
    c = make_case(4, 2, 48, 32, 2, 40, seed=25)
    eng, _, grads = make_engine(c, max_tokens=8)
    got = run(eng, c)
    check_all(c, got, grads)
    stats = eng.memory_stats()
    assert stats["weight_bytes"] > 0 and stats["lora_bytes"] > 0
    # The entry held the 40-token forward while it was pending; backward returned it to the pool.
    assert stats["cache_peak_bytes"] > 0 and stats["cache_bytes"] == 0


def test_memory_stats_weights_once() -> None:
    E, K, H, I = 4, 2, 64, 48  # noqa: E741 (I is the spec's name)
    c = make_case(E, K, H, I, 0, 3, seed=27)
    eng, _, _ = make_engine(c)
    stats = eng.memory_stats()
    bf16_bytes = E * 3 * H * I * 2
    assert bf16_bytes <= stats["weight_bytes"] <= 1.5 * bf16_bytes + 4096


@pytest.mark.parametrize("isa", ISAS)
def test_nan_inf_propagate(isa: str) -> None:
    c = make_case(4, 2, 48, 32, 2, 6, seed=29, pad_frac=0.0)
    eng, _, _ = make_engine(c, isa=isa)
    x = c.x.copy()
    x[1, 3] = np.nan
    x[2, 5] = np.inf
    got = run(eng, c, x=x)
    assert np.isnan(got["out"][1]).any()
    assert not np.isfinite(got["out"][2]).all()
    ok_rows = [t for t in range(c.T) if t not in (1, 2)]
    assert np.isfinite(got["out"][ok_rows]).all()
    dout = c.dout.copy()
    dout[0, 0] = np.nan
    eng.forward(c.x, c.ids, c.w, np.empty((c.T, c.H), np.float32))
    dx, dw = np.empty((c.T, c.H), np.float32), np.empty((c.T, c.K), np.float32)
    eng.backward(dout, dx, dw)
    assert np.isnan(dw[0]).any() and np.isnan(dx[0]).any()


def test_context_manager_and_close() -> None:
    c = make_case(4, 2, 48, 32, 2, 3, seed=31)
    eng, _, _ = make_engine(c)
    with eng:
        pass
    assert eng.closed
    eng.close()  # twice is fine
    assert "closed" in repr(eng)
    for call in (
        lambda: eng.forward(c.x, c.ids, c.w, np.empty((3, 48), np.float32)),
        lambda: eng.backward(c.dout, np.empty((3, 48), np.float32), np.empty((3, 2), np.float32)),
        lambda: eng.load_weights(gate_up=c.gate_up, down=c.down),
        lambda: eng.set_lora(**lora_arrays(c)),
        eng.lora_updated,
        eng.sync_forward,
        eng.memory_stats,
        lambda: eng.isa,
    ):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_close_waits_for_submitted_forward() -> None:
    c = make_case(8, 2, 64, 32, 2, 64, seed=33)
    eng, _, _ = make_engine(c, threads=2)
    out = np.empty((c.T, c.H), np.float32)
    eng.submit_forward(c.x, c.ids, c.w, out, save_for_backward=False)
    eng.close()
    assert max_rel_err(out, forward(c)[0]) <= TOL


def test_grad_arrays_helper_layouts() -> None:
    c = make_case(4, 2, 48, 32, 2, 3, seed=35, fused=True)
    g = grad_arrays(c, peft_strided=True)
    assert g["grad_b_gate_up"].strides[0] == 4


def test_self_test_failure_falls_back_with_runtime_warning() -> None:
    """A SIMD ISA that fails its self-test is replaced by the next one down, with a
    RuntimeWarning (fresh process: self-tests run once per process)."""
    import subprocess
    import sys

    simd = [i for i in kk.available_isas() if i != "scalar"]
    if not simd:
        pytest.skip("no SIMD ISA runs on this CPU")
    best = simd[-1]
    code = (
        "import warnings, kt_kernels as kk\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    eng = kk.MoEEngine(4, 2, 32, 16, isa={best!r})\n"
        "assert eng.isa != " + repr(best) + ", eng.isa\n"
        "msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]\n"
        f"assert any({best!r} in m and 'self-test' in m for m in msgs), msgs\n"
        "print(eng.isa)\n"
    )
    env = dict(__import__("os").environ, KT_KERNELS_FAIL_SELF_TEST=best)
    env.pop("KT_KERNELS_ISA", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in kk.available_isas()
