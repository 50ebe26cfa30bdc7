"""Property test: random shapes, routings, ranks, alphas, layouts and dtypes through the LoRA
binding and KTMoEFunction, against the fp32 reference with autograd.

Tolerance. Torch backend (the same fp32 math; this checks kt's binding, staging and cache
logic exactly): every gradient within 1e-5 relative (+1e-7 absolute per element); 8e-3 for the
bf16 gradients of bf16 LoRA parameters (one bf16 rounding of the result). Engine (bf16
activations, H ≥ 8 and I ≥ 4): the concatenation of all gradients within 4e-2 relative — with one
or two tokens there is no averaging over roundings, and a single entry can be a near-cancelling
sum whose bf16 error is relative to its terms, not to the sum, so per-tensor bounds would
measure cancellation rather than kt (the engine's own tests and the realistic-size tests here
check it per tensor).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from kt_sft.backend import engine_available
from kt_sft.binding import LoRAFactor, LoRASource
from kt_sft.config import KTConfig
from kt_sft.function import kt_moe
from kt_sft.peft_hooks import _factor_views
from kt_sft.reference import moe_reference
from kt_sft.routed_experts import RoutedExperts
from kt_sft.testing import rel_err

BACKENDS = ["torch"] + (["engine"] if engine_available() else [])


@st.composite
def cases(draw: st.DrawFn) -> dict:
    E = draw(st.integers(1, 6))
    return {
        "backend": draw(st.sampled_from(BACKENDS)),
        "E": E,
        "K": draw(st.integers(1, min(3, E))),
        "H": draw(st.integers(1, 24)),
        "inter": draw(st.integers(1, 12)),
        "T": draw(st.integers(0, 17)),
        "engine_rank": draw(st.integers(1, 4)),
        "rank_cut": draw(st.integers(0, 2)),
        "alpha": draw(st.sampled_from([1.0, 2.0, 8.0])),
        "engine_alpha": draw(st.sampled_from([1.0, 8.0])),
        "layout": draw(st.sampled_from(["fused", "split"])),
        "kinds": draw(st.sampled_from([("gate_up", "down"), ("gate_up",), ("down",)])),
        "bf16": draw(st.booleans()),
        "num_gpu": draw(st.integers(0, 2)),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_random_bindings_match_reference(case: dict) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    backend, E, K, H, inter, T = (case[k] for k in ("backend", "E", "K", "H", "inter", "T"))
    if backend == "engine":  # no single-scalar bottleneck amplifying one bf16 rounding
        H, inter = max(H, 8), max(inter, 4)
    rank = max(1, case["engine_rank"] - case["rank_cut"])
    num_gpu = min(case["num_gpu"], E - 1)
    cfg = KTConfig(
        backend=backend,
        weight_dtype="fp32" if backend == "torch" else "bf16",
        lora_rank=case["engine_rank"],
        lora_alpha=case["engine_alpha"],
        lora_layout=case["layout"],
        num_gpu_experts=num_gpu,
    )
    gate_up = torch.randn(E, 2 * inter, H, generator=gen) * 0.3
    down = torch.randn(E, H, inter, generator=gen) * 0.3
    if backend == "engine":
        gate_up, down = gate_up.bfloat16().float(), down.bfloat16().float()
    layer = RoutedExperts(
        cfg,
        num_experts=E,
        top_k=K,
        hidden_size=H,
        intermediate_size=inter,
        lora_layout=case["layout"],
        name="property",
    )
    layer.load_weights(gate_up, down)
    if num_gpu:
        from kt_sft.gpu_experts import GPUExperts

        layer.gpu_experts = GPUExperts(gate_up[:num_gpu], down[:num_gpu])
    dtype = torch.bfloat16 if case["bf16"] else torch.float32
    dims = {"gate_up": (H, 2 * inter), "down": (inter, H)}
    kinds, params = {}, []
    for kind in case["kinds"]:
        in_f, out_f = dims[kind]
        a = nn.Parameter((torch.randn(E * rank, in_f, generator=gen) * 0.3).to(dtype))
        b = nn.Parameter((torch.randn(out_f, rank * E, generator=gen) * 0.3).to(dtype))
        va, vb = _factor_views(E, rank, in_f, out_f)
        kinds[kind] = (LoRAFactor(a, va), LoRAFactor(b, vb))
        params += [a, b]
    scaling = case["alpha"] / rank
    source = LoRASource("fused", rank, scaling, kinds, key=("prop",))
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    ids = torch.randint(-1, E, (T, K), generator=gen)
    w = torch.rand(T, K, generator=gen, requires_grad=True)
    g = torch.randn(T, H, generator=gen)
    kt_moe(layer, x, ids, w, source).backward(g)
    if T == 0:
        return
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    pr = [p.detach().float().clone().requires_grad_(True) for p in params]
    leaf = {id(p): q for p, q in zip(params, pr)}
    lora = {}
    for kind in kinds:
        va_, vb_ = source.canonical(kind, leaf=leaf)  # type: ignore[misc]
        lora[f"a_{kind}"], lora[f"b_{kind}"] = va_, vb_
    y = moe_reference(
        xr, ids, wr, gate_up[:, :inter], gate_up[:, inter:], down, lora=lora, scaling=scaling
    )
    grads = torch.autograd.grad(y, [xr, wr, *pr], g, allow_unused=True)
    pairs = [
        (x.grad, grads[0], x),
        (w.grad, grads[1], w),
        *[(p.grad, r, p) for p, r in zip(params, grads[2:])],
    ]
    got_all, want_all = [], []
    for got, want, like in pairs:
        want = want if want is not None else torch.zeros_like(like, dtype=torch.float32)
        got = got.float() if got is not None else torch.zeros_like(want)
        got_all.append(got.flatten())
        want_all.append(want.flatten())
        if backend == "torch":
            # bf16 LoRA parameters get bf16 gradients: one rounding of the result
            rtol = 8e-3 if got is not None and like.dtype == torch.bfloat16 else 1e-5
            err = float((got.double() - want.double()).norm())
            assert err <= rtol * float(want.double().norm()) + 1e-7 * want.numel() ** 0.5
    if backend == "engine":
        assert rel_err(torch.cat(got_all), torch.cat(want_all)) <= 4e-2
    assert layer.pending_forwards == 0
    layer.close()


def test_property_test_has_backends() -> None:
    assert "torch" in BACKENDS
    if not engine_available():
        pytest.skip("engine not built: the property test covers the torch backend only")
