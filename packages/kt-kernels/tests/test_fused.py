"""Fused dequantize + GEMM for int8 / int4 weights (KT_KERNELS_FUSED_DEQUANT).

The forward gate_up and down tiles of a quantized engine either dequantize their weight blocks
into a bf16 copy and run the bf16 GEMM, or run the fused kernel that forms each weight in
registers. Both give the same bits on every ISA, so forcing either path (or leaving the choice to
the row-count threshold) must not change any output: forward, and the backward that reuses the
forward's cache.
"""

from __future__ import annotations

import numpy as np
import pytest
from kk_helpers import isa_params, make_engine, run_and_close
from kk_reference import make_case

import kt_kernels as kk

ISAS = isa_params()
MODES = ("0", "1", "auto")

# name: (weight_dtype, group_size, (E, K, H, I, r, T)): small T gives 1-3 rows per expert (the
# fused path under "auto"), large T some 40-70 rows per expert (the dequantize path).
CASES = {
    "int8-small-T": ("int8", 128, (4, 2, 192, 128, 2, 3)),
    "int8-large-T": ("int8", 128, (4, 2, 192, 128, 2, 130)),
    "int4-g32-small-T": ("int4", 32, (4, 2, 128, 96, 0, 2)),
    "int4-g128-large-T": ("int4", 128, (4, 3, 256, 256, 2, 90)),
}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("isa", ISAS)
def test_fused_and_dequant_paths_give_the_same_bits(
    isa: str, case: str, tp: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    wd, group, shape = CASES[case]
    c = make_case(*shape, seed=17)
    results = {}
    for mode in MODES:
        monkeypatch.setenv("KT_KERNELS_FUSED_DEQUANT", mode)
        eng, _, grads = make_engine(c, isa=isa, threads=2, weight_dtype=wd, group_size=group, tp=tp)
        assert eng.tp == tp
        results[mode] = list(run_and_close(eng, c, grads).values())
    assert np.all(np.isfinite(results["0"][0]))
    for mode in MODES[1:]:
        for got, want in zip(results[mode], results["0"]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("wd", ["int8", "int4"])
def test_fused_inference_forward_same_bits(wd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Decode-like: one token, many experts, no LoRA, no cache; bf16 activations.
    c = make_case(16, 4, 256, 128, 0, 1, seed=3, pad_frac=0.0)
    outs = []
    for mode in ("0", "1"):
        monkeypatch.setenv("KT_KERNELS_FUSED_DEQUANT", mode)
        eng, _, _ = make_engine(c, threads=2, weight_dtype=wd, group_size=64, tp=1)
        out = np.zeros((c.T, c.H), dtype=np.float32)
        eng.forward(c.x, c.ids, c.w, out, save_for_backward=False)
        outs.append(out)
        eng.close()
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.any(outs[0] != 0)


@pytest.mark.parametrize("value", ["2", "yes", "fused"])
def test_bad_fused_dequant_env(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_KERNELS_FUSED_DEQUANT", value)
    with pytest.raises(ValueError, match="KT_KERNELS_FUSED_DEQUANT"):
        kk.MoEEngine(2, 1, 64, 64, weight_dtype="int8", num_threads=1)
    for ok in (" ON ", "off", "Auto", ""):
        monkeypatch.setenv("KT_KERNELS_FUSED_DEQUANT", ok)
        kk.MoEEngine(2, 1, 64, 64, weight_dtype="int8", num_threads=1).close()


def test_w8a8_engines_ignore_the_fused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # W8A8 forwards run int8 x int8 GEMMs on their own block layout; forcing the fused path on or
    # off must change nothing (forward and the straight-through backward).
    c = make_case(4, 2, 128, 128, 2, 5, seed=23)
    results = []
    for mode in ("0", "1"):
        monkeypatch.setenv("KT_KERNELS_FUSED_DEQUANT", mode)
        eng, _, grads = make_engine(c, weight_dtype="int8", activation_dtype="int8")
        results.append(list(run_and_close(eng, c, grads).values()))
    for got, want in zip(results[1], results[0]):
        np.testing.assert_array_equal(got, want)
