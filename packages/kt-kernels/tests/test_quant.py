"""weight_dtype int8 / int4: forward + backward against the NumPy reference run on the
dequantized weights (same tolerances as the bf16 tests: the engine computes with exactly
bf16(code * scale)), and against the unquantized reference within a stated bound; pre-quantized
loading; resident bytes.

Bound against the unquantized weights (max |engine - ref| / max |ref| per output): rounding a
weight to its grid adds noise of rms step / sqrt(12), step = max|w| / qmax of its row (int8) or
group (int4). For Gaussian weights max|w| is about 2.6 sigma over 128 values, so the relative
noise per weight is about 0.6% (int8) and 11% (int4, group 128); it passes through the dot
products with the same relative rms, and the largest error over all outputs is a few rms.
Stated bounds: int8 2.5e-2, int4 4e-1 (measured on these cases: int8 7e-3; int4 0.17 with
group 32, 0.24 with group 128). These say what int4 costs; the exactness checks are the ones
against the dequantized reference.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from kk_helpers import (
    bind_lora,
    case_engine,
    flip_tol,
    isa_params,
    make_engine,
    run,
    run_and_close,
)
from kk_reference import BF16, backward, bf16, forward, make_case, max_rel_err

import kt_kernels as kk

ISAS = isa_params()
TOL = 1e-3
BOUND = {"int8": 2.5e-2, "int4": 4e-1}

# name: (weight_dtype, group_size, (E, K, H, I, r, T), fused)
CASES = {
    "int8-lora": ("int8", 128, (6, 2, 200, 72, 3, 11), True),
    "int4-g32-split": ("int4", 32, (4, 2, 64, 96, 2, 9), False),
    "int4-g128-skip-lora": ("int4", 128, (4, 3, 128, 128, 0, 7), True),
}


def dequantized_case(c, wd: str, group: int):
    """The case with its base weights replaced by bf16(code * scale), as the engine uses them."""

    def dq(w):
        codes, scales = kk.quantize_weights(w, wd, group)
        return bf16(kk.dequantize_weights(codes, scales, wd, group)).astype(np.float32)

    return dataclasses.replace(c, gate=dq(c.gate), up=dq(c.up), down=dq(c.down))


def quant_engine(c, wd: str, group: int, **kw) -> tuple[kk.MoEEngine, dict[str, np.ndarray]]:
    """make_engine with weight_dtype wd and group_size group; returns (engine, grads)."""
    eng, _, grads = make_engine(c, weight_dtype=wd, group_size=group, **kw)
    return eng, grads


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_matches_reference(isa: str, case: str) -> None:
    wd, group, shape, fused = CASES[case]
    c = make_case(*shape, seed=11, fused=fused)
    eng, grads = quant_engine(c, wd, group, isa=isa)
    got = run(eng, c)
    dq = dequantized_case(c, wd, group)
    tol = flip_tol(c)
    ref_out, cache = forward(dq)
    ref = backward(dq, cache)
    assert max_rel_err(got["out"], ref_out) <= tol
    assert max_rel_err(got["dx"], ref["dx"]) <= tol
    assert max_rel_err(got["dw"], ref["dw"]) <= tol
    for name, g in grads.items():
        assert max_rel_err(g, ref[name[len("grad_") :]]) <= tol, name
    # Stated bound against the unquantized weights.
    full_out, full_cache = forward(c)
    full = backward(c, full_cache)
    for key, want in (("out", full_out), ("dx", full["dx"]), ("dw", full["dw"])):
        assert max_rel_err(got[key], want) <= BOUND[wd], (key, max_rel_err(got[key], want))
    eng.close()


@pytest.mark.parametrize("wd,group", [("int8", 128), ("int4", 64)])
def test_prequantized_equals_load_time_quantization(wd: str, group: int) -> None:
    c = make_case(4, 2, 128, 128, 2, 13, seed=5)
    outs = {}
    for pre, split, threads, tp in (
        (False, False, 1, 1),
        (True, False, 2, 1),
        (True, True, 1, 1),
        (False, False, 1, 2),
        (True, True, 2, 2),
    ):
        eng, grads = quant_engine(
            c, wd, group, prequantized=pre, split_weights=split, threads=threads, tp=tp
        )
        outs.setdefault(tp, []).append(list(run_and_close(eng, c, grads).values()))
    for same_tp in outs.values():
        for other in same_tp[1:]:
            for a, b in zip(same_tp[0], other):
                np.testing.assert_array_equal(a, b)


def _strided(a: np.ndarray) -> np.ndarray:
    """The same values as a view whose last axis is not contiguous (stride != 1)."""
    return np.swapaxes(np.ascontiguousarray(np.swapaxes(a, 1, 2)), 1, 2)


# Shapes (E, K, H, I, r, T) with ragged depths and a last block of fewer than 16 rows (int8), and
# whole groups (int4).
LOAD_CASES = {
    ("int8", 128): (4, 2, 200, 72, 2, 9),
    ("int4", 32): (4, 2, 128, 96, 2, 9),
    ("int4", 64): (3, 2, 192, 128, 0, 7),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wd,group", list(LOAD_CASES))
def test_load_time_quantization_on_every_isa(
    isa: str, wd: str, group: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float weights quantized at load time on each ISA (forced as users force it) store the codes
    and scales of kk.quantize_weights: float32, bfloat16 and strided arrays, fused or split, give
    the outputs and gradients of the same values loaded as codes, bit for bit (and so do strided
    codes)."""
    monkeypatch.setenv("KT_KERNELS_ISA", isa)
    c = make_case(*LOAD_CASES[(wd, group)], seed=17)
    # bf16-valued weights, so that the bfloat16 arrays hold exactly the values quantize_weights sees
    c = dataclasses.replace(
        c, **{n: bf16(getattr(c, n)).astype(np.float32) for n in ("gate", "up", "down")}
    )

    def results(load) -> list[np.ndarray]:
        eng = case_engine(c, weight_dtype=wd, group_size=group)
        assert eng.isa == isa
        load(eng)
        _, grads = bind_lora(eng, c)
        return list(run_and_close(eng, c, grads).values())

    def codes(eng, strided: bool = False) -> None:
        arrays = {}
        for name in ("gate_up", "down"):
            q, arrays[f"{name}_scale"] = kk.quantize_weights(getattr(c, name), wd, group)
            arrays[name] = _strided(q) if strided else q
        eng.load_quantized_weights(**arrays)

    want = results(codes)
    loads = {
        "strided codes": lambda eng: codes(eng, strided=True),
        "float32": lambda eng: eng.load_weights(gate_up=c.gate_up, down=c.down),
        "bfloat16": lambda eng: eng.load_weights(
            gate_up=c.gate_up.astype(BF16), down=c.down.astype(BF16)
        ),
        "strided float32": lambda eng: eng.load_weights(
            gate_up=_strided(c.gate_up), down=_strided(c.down)
        ),
        "strided bfloat16 split": lambda eng: eng.load_weights(
            gate=_strided(c.gate.astype(BF16)),
            up=_strided(c.up.astype(BF16)),
            down=_strided(c.down.astype(BF16)),
        ),
    }
    for label, load in loads.items():
        for a, b in zip(results(load), want):
            np.testing.assert_array_equal(a, b, err_msg=label)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wd", ["int8", "int4"])
def test_non_finite_weights_raise_on_every_isa(
    isa: str, wd: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KT_KERNELS_ISA", isa)
    E, H, inter = 3, 96, 64
    for dtype in (np.float32, BF16):
        for where, bad in (((2, 5, 95), np.inf), ((1, 127, 0), np.nan), ((0, 0, 33), -np.inf)):
            gu = np.full((E, 2 * inter, H), 0.5, np.float32)
            gu[where] = bad
            with kk.MoEEngine(E, 2, H, inter, num_threads=2, weight_dtype=wd, group_size=32) as eng:
                assert eng.isa == isa
                with pytest.raises(ValueError, match=f"expert {where[0]} has a NaN or infinite"):
                    eng.load_weights(
                        gate_up=gu.astype(dtype),
                        down=np.ones((E, H, inter), np.float32).astype(dtype),
                    )


def test_resident_bytes() -> None:
    c = make_case(2, 2, 256, 256, 0, 1, seed=1)
    sizes = {}
    for wd in ("bf16", "int8", "int4"):
        eng = kk.MoEEngine(c.E, c.K, c.H, c.I, weight_dtype=wd, group_size=128, num_threads=1)
        eng.load_weights(gate_up=c.gate_up, down=c.down)
        sizes[wd] = eng.memory_stats()["weight_bytes"]
        eng.close()
    assert 0.49 <= sizes["int8"] / sizes["bf16"] <= 0.51
    assert 0.25 <= sizes["int4"] / sizes["bf16"] <= 0.27


def test_quantize_roundtrip_format() -> None:
    w = np.array([[[1.0, -2.0, 3.0, 7.0] * 8, [0.0] * 32]], dtype=np.float32)  # (1, 2, 32)
    codes, scales = kk.quantize_weights(w, "int4", 32)
    assert codes.dtype == np.uint8 and codes.shape == (1, 2, 16) and scales.shape == (1, 2, 1)
    assert scales[0, 0, 0] == np.float32(1.0) and scales[0, 1, 0] == 0.0
    assert codes[0, 0, 0] == (1 | ((-2 & 0xF) << 4))  # even k low nibble, two's complement
    np.testing.assert_array_equal(kk.dequantize_weights(codes, scales, "int4", 32), w)
    c8, s8 = kk.quantize_weights(w, "int8")
    assert c8.dtype == np.int8 and s8.shape == (1, 2) and c8[0, 0, 3] == 127
