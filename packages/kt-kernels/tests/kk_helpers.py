"""Running the engine on a `kk_reference.Case`, and the ISA parametrization of the tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from kk_reference import BF16, Case
from numpy.typing import DTypeLike

import kt_kernels as kk


def flip_tol(c: Case) -> float:
    """The engine-vs-reference tolerance of float32 outputs and gradients: max(1e-3, 2**-6 /
    sqrt(I)). float32 accumulation is < 1e-5; what remains is an intermediate that lands on the
    other side of a bf16 rounding boundary than the float64 reference's, moving one of the I or
    2I terms of a dot product by 2**-8 of itself (~2**-8 / sqrt(I) of the largest output), a
    larger share for small I (test_engine.py states the model)."""
    return max(1e-3, 2.0**-6 / np.sqrt(c.I))


# W8A8 cases shared by test_w8a8.py and test_w8a8_int8_backward.py.
# name: (E, K, H, I, r, T, fused, tp)
W8A8_CASES = {
    "lora-fused": (6, 2, 200, 72, 3, 11, True, 1),
    "lora-split-k4": (8, 4, 200, 72, 3, 40, False, 1),
    "lora-fused-tp2": (6, 3, 128, 160, 2, 17, True, 2),
    "skip-lora": (4, 3, 128, 128, 0, 30, True, 1),
    "skip-lora-tp3-ragged": (5, 2, 96, 150, 0, 21, True, 3),
    "t0": (4, 2, 64, 40, 2, 0, True, 1),
    "k8-t300": (16, 8, 256, 192, 4, 300, True, 1),
}
# Against the unquantized float reference: name: (E, K, H, I, r, T, fused).
W8A8_BOUND_CASES = {
    "lora-fused-h256": (16, 8, 256, 192, 4, 120, True),
    "skip-lora-h512": (8, 4, 512, 256, 0, 64, True),
}


def isa_params() -> list:
    """One pytest param per ISA of kk.ISAS, id = ISA name; ISAs this CPU cannot run are
    skipped."""
    runnable = set(kk.available_isas())
    params = []
    for isa in kk.ISAS:
        marks = []
        if isa not in runnable:
            reason = "no AMX on this CPU" if isa == "amx" else f"no {isa} on this CPU"
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(isa, id=isa, marks=marks))
    return params


def lora_arrays(c: Case, dtype=np.float32, peft_strided: bool = False) -> dict[str, np.ndarray]:
    """The LoRA weights of a case in the engine's argument names. With peft_strided, each B is a
    strided view of PEFT's (out, r * E) expert-fastest lora_B and each A a view of (E * r, in)."""
    L = c.lora
    assert L is not None

    def b_view(b: np.ndarray) -> np.ndarray:  # E x out x r  ->  view of out x (r * E)
        if not peft_strided:
            return np.ascontiguousarray(b.astype(dtype))
        E, out, r = b.shape
        peft = np.ascontiguousarray(b.transpose(1, 2, 0).reshape(out, r * E).astype(dtype))
        view = peft.reshape(out, r, E).transpose(2, 0, 1)
        assert view.strides == tuple(s * peft.itemsize for s in (1, r * E, E))
        return view

    def a_view(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.astype(dtype))

    if L.fused:
        d = dict(a_gate_up=a_view(L.a_g), b_gate_up=b_view(np.concatenate([L.b_g, L.b_u], 1)))
    else:
        d = dict(a_gate=a_view(L.a_g), a_up=a_view(L.a_u), b_gate=b_view(L.b_g), b_up=b_view(L.b_u))
    d["a_down"] = a_view(L.a_d)
    d["b_down"] = b_view(L.b_d)
    return d


def grad_arrays(c: Case, peft_strided: bool = False) -> dict[str, np.ndarray]:
    """Zeroed float32 gradient arrays (grad_<name>) in the same layouts as lora_arrays."""
    return {
        f"grad_{k}": np.zeros_like(v, dtype=np.float32) if not peft_strided else _zeros_like_view(v)
        for k, v in lora_arrays(c, np.float32, peft_strided).items()
    }


def _zeros_like_view(v: np.ndarray) -> np.ndarray:
    # Same strides as the weight view: zero the base array and view it the same way.
    base = v.base if v.base is not None else v
    while base.base is not None:
        base = base.base
    z = np.zeros(base.shape, dtype=np.float32)
    return np.lib.stride_tricks.as_strided(z, shape=v.shape, strides=v.strides)


def case_engine(
    c: Case, *, isa: str | None = None, threads: int | None = 1, **kw: Any
) -> kk.MoEEngine:
    """A MoEEngine shaped for the case (E, K, H, I, LoRA rank, alpha and layout), nothing loaded
    yet. kw go to MoEEngine as they are (weight_dtype, group_size, activation_dtype, tp, ...)."""
    return kk.MoEEngine(
        c.E,
        c.K,
        c.H,
        c.I,
        lora_rank=c.r,
        lora_alpha=(c.lora.scaling * c.r if c.lora else None),
        lora_layout="fused" if (c.lora is None or c.lora.fused) else "split",
        num_threads=threads,
        isa=isa,
        **kw,
    )


def load_case_weights(
    eng: kk.MoEEngine, c: Case, *, split: bool = False, array_dtype: DTypeLike = np.float32
) -> None:
    """load_weights with the case's base weights cast to array_dtype (the engine stores them in
    its own weight_dtype); split: gate and up as two arrays instead of the concatenated gate_up."""
    if split:
        eng.load_weights(
            gate=c.gate.astype(array_dtype),
            up=c.up.astype(array_dtype),
            down=c.down.astype(array_dtype),
        )
    else:
        eng.load_weights(gate_up=c.gate_up.astype(array_dtype), down=c.down.astype(array_dtype))


def load_case_codes(
    eng: kk.MoEEngine,
    c: Case,
    weight_dtype: str,
    group_size: int | None = None,
    *,
    split: bool = False,
) -> None:
    """load_quantized_weights with the case's base weights quantized by kk.quantize_weights
    (weight_dtype 'int8' / 'int4'; group_size left to its default when None); split as in
    load_case_weights."""

    def codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if group_size is None:
            return kk.quantize_weights(w, weight_dtype)
        return kk.quantize_weights(w, weight_dtype, group_size)

    arrays: dict[str, np.ndarray] = {}
    for name in ("gate", "up", "down") if split else ("gate_up", "down"):
        arrays[name], arrays[f"{name}_scale"] = codes(getattr(c, name))
    eng.load_quantized_weights(**arrays)


def bind_lora(
    eng: kk.MoEEngine,
    c: Case,
    *,
    lora_dtype: DTypeLike = np.float32,
    peft_strided: bool = False,
    with_grads: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """set_lora with the case's LoRA weights (lora_arrays) and, with_grads, zeroed gradient arrays
    (grad_arrays) that the engine's backward accumulates into. Returns (lora, grads); both are
    empty for a case without LoRA, which binds nothing."""
    lora: dict[str, np.ndarray] = {}
    grads: dict[str, np.ndarray] = {}
    if c.lora is not None:
        lora = lora_arrays(c, lora_dtype, peft_strided)
        grads = grad_arrays(c, peft_strided) if with_grads else {}
        eng.set_lora(**lora, **grads)
    return lora, grads


def make_engine(
    c: Case,
    *,
    isa: str | None = None,
    threads: int | None = 1,
    lora_dtype: DTypeLike = np.float32,
    peft_strided: bool = False,
    with_grads: bool = True,
    split_weights: bool = False,
    weight_array_dtype: DTypeLike = np.float32,
    prequantized: bool = False,
    **kw: Any,
) -> tuple[kk.MoEEngine, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Engine with the case's weights and LoRA bound; returns (engine, lora, grads).

    kw go to MoEEngine (see case_engine). The base weights are loaded as float arrays of
    weight_array_dtype (load_case_weights) or, with prequantized, as codes from
    kk.quantize_weights for kw's weight_dtype and group_size (load_case_codes); split_weights
    loads gate and up separately. LoRA as in bind_lora."""
    eng = case_engine(c, isa=isa, threads=threads, **kw)
    if prequantized:
        load_case_codes(eng, c, kw["weight_dtype"], kw.get("group_size"), split=split_weights)
    else:
        load_case_weights(eng, c, split=split_weights, array_dtype=weight_array_dtype)
    lora, grads = bind_lora(
        eng, c, lora_dtype=lora_dtype, peft_strided=peft_strided, with_grads=with_grads
    )
    return eng, lora, grads


def run(eng: kk.MoEEngine, c: Case, *, x=None, dout=None, act_dtype=np.float32) -> dict:
    """forward + backward; returns out, dx, dw (float64 copies)."""
    x = c.x if x is None else x
    dout = c.dout if dout is None else dout
    dt = BF16 if act_dtype == "bf16" else act_dtype
    out = np.full((c.T, c.H), np.nan, dtype=dt)
    eng.forward(x.astype(dt), c.ids, c.w, out)
    dx = np.full((c.T, c.H), np.nan, dtype=dt)
    dw = np.full((c.T, c.K), np.nan, dtype=np.float32)
    eng.backward(dout.astype(dt), dx, dw)
    return dict(out=out.astype(np.float64), dx=dx.astype(np.float64), dw=dw.astype(np.float64))


def run_and_close(
    eng: kk.MoEEngine, c: Case, grads: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """run (forward + backward), then close the engine. Returns out, dx, dw followed by the
    gradient arrays grads that the backward accumulated into (grad_<name>), in that order."""
    r = run(eng, c)
    eng.close()
    return {**r, **grads}
