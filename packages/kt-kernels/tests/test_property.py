"""Property test: random shapes, routings (padding, duplicates, idle experts), LoRA layouts and
dtypes through forward/backward against the NumPy reference, on a random runnable ISA."""

from __future__ import annotations

import numpy as np
from conftest import FAST
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kk_helpers import make_engine, run
from kk_reference import BF16, make_case
from test_engine import check_all

import kt_kernels as kk

ISAS = kk.available_isas()


@st.composite
def cases(draw):
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, 6))
    H = draw(st.integers(1, 80))
    I = draw(st.integers(1, 70))  # noqa: E741 (I is the spec's name)
    r = draw(st.integers(0, 5))
    T = draw(st.integers(0, 40))
    fused = draw(st.booleans())
    c = make_case(
        E,
        K,
        H,
        I,
        r,
        T,
        seed=draw(st.integers(0, 2**31)),
        fused=fused,
        used_experts=draw(st.integers(1, E)),
        pad_frac=draw(st.sampled_from([0.0, 0.2, 1.0])),
        dup_frac=draw(st.sampled_from([0.0, 0.5])),
        alpha=draw(st.sampled_from([None, 1.0, 16.0])) if r else None,
    )
    opts = dict(
        isa=draw(st.sampled_from(ISAS)),
        threads=draw(st.sampled_from([1, 2])),
        lora_dtype=draw(st.sampled_from([np.float32, BF16])),
        peft_strided=draw(st.booleans()),
        split_weights=draw(st.booleans()),
    )
    return c, opts


@settings(
    max_examples=15 if FAST else 60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(cases())
def test_random_cases_match_reference(data) -> None:
    c, opts = data
    eng, _, grads = make_engine(c, **opts)
    if c.lora is not None and opts["lora_dtype"] is BF16:
        for k in ("a_g", "a_u", "b_g", "b_u", "a_d", "b_d"):
            setattr(c.lora, k, getattr(c.lora, k).astype(BF16).astype(np.float32))
        if c.lora.fused:
            c.lora.a_u = c.lora.a_g
    got = run(eng, c)
    check_all(c, got, grads)  # tolerance: see test_engine's docstring
    eng.close()
