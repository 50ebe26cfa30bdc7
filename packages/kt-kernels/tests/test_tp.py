"""tp=N: the intermediate dim split into N slices (logical partitions on a one-node machine)
against tp=1.

Not bitwise: with N slices the down projection (forward) and the gate_up^T product of dx
(backward) are sums of N partial dot products instead of one, and the dw / (dGU B) partial sums
run over differently bounded I chunks, so float32 rounding differs. The bound is 1e-5 of the
largest value per output (float32 accumulation over a few hundred terms: ~1e-6; measured
below 1e-6), far below anything a wrong or missing slice costs (O(1) of the output). Results stay
bitwise equal for any thread count at a given tp (fixed reduction orders).
"""

from __future__ import annotations

import numpy as np
import pytest
from kk_helpers import make_engine, run_and_close
from kk_reference import make_case, max_rel_err

import kt_kernels as kk

# name: (E, K, H, I, r, T, fused, weight_dtype, group_size, tp)
CASES = {
    "bf16-fused-tp3-ragged": (6, 2, 64, 72, 3, 13, True, "bf16", 128, 3),
    "int8-split-tp2": (4, 3, 96, 64, 2, 11, False, "int8", 128, 2),
    "int4-g32-skip-lora-tp3": (4, 2, 64, 96, 0, 9, True, "int4", 32, 3),
}


def results(c, wd, group, tp, threads=1):
    eng, _, grads = make_engine(c, threads=threads, weight_dtype=wd, group_size=group, tp=tp)
    assert eng.tp == tp
    return run_and_close(eng, c, grads)


@pytest.mark.parametrize("case", list(CASES))
def test_tp_matches_tp1(case: str) -> None:
    *shape, fused, wd, group, tp = CASES[case]
    c = make_case(*shape, seed=21, fused=fused)
    ref = results(c, wd, group, 1)
    got = results(c, wd, group, tp)
    for name, want in ref.items():
        assert max_rel_err(got[name], want) <= 1e-5, (name, max_rel_err(got[name], want))
    # Bitwise equal for any thread count at this tp.
    again = results(c, wd, group, tp, threads=2)
    for name in got:
        np.testing.assert_array_equal(got[name], again[name])


def test_tp_memory_same_and_none_is_per_node() -> None:
    c = make_case(2, 2, 64, 64, 0, 1, seed=1)
    sizes = []
    for tp in (1, 2):
        eng, _, _ = make_engine(c, weight_dtype="bf16", group_size=128, tp=tp)
        sizes.append(eng.memory_stats()["weight_bytes"])
        eng.close()
    assert sizes[0] == sizes[1]
    with kk.MoEEngine(2, 2, 64, 64, tp=None, num_threads=1) as eng:
        assert eng.tp >= 1
