"""Running the engine on a `kk_reference.Case`, and the ISA parametrization of the tests."""

from __future__ import annotations

import numpy as np
import pytest
from kk_reference import BF16, Case

import kt_kernels as kk

ALL_ISAS = ["scalar", "avx2", "avx512", "avx512_bf16", "amx"]


def isa_params() -> list:
    """One pytest param per ISA, id = ISA name; ISAs this CPU cannot run are skipped."""
    runnable = set(kk.available_isas())
    params = []
    for isa in ALL_ISAS:
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


def make_engine(
    c: Case,
    *,
    isa: str | None = None,
    threads: int | None = 1,
    lora_dtype=np.float32,
    peft_strided: bool = False,
    with_grads: bool = True,
    split_weights: bool = False,
    weight_dtype=np.float32,
    **kw,
) -> tuple:
    """Engine with the case's weights and LoRA bound; returns (engine, lora, grads)."""
    eng = kk.MoEEngine(
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
    if split_weights:
        eng.load_weights(
            gate=c.gate.astype(weight_dtype),
            up=c.up.astype(weight_dtype),
            down=c.down.astype(weight_dtype),
        )
    else:
        eng.load_weights(gate_up=c.gate_up.astype(weight_dtype), down=c.down.astype(weight_dtype))
    lora, grads = {}, {}
    if c.lora is not None:
        lora = lora_arrays(c, lora_dtype, peft_strided)
        grads = grad_arrays(c, peft_strided) if with_grads else {}
        eng.set_lora(**lora, **grads)
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
