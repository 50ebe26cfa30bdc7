"""Cross-checks with torch: tensors through DLPack (float32, bfloat16, PEFT's strided lora_B
views) and gradients against torch.autograd of the plain float32 math (docs/api/kernels.md, "The operator").

Tolerance against autograd: TOL_AUTOGRAD = 2e-2 of the largest reference magnitude per output.
The autograd reference is float32 throughout, while the engine rounds activations to bf16 (h
before the down projection, grad_out, dg/du before the base-weight GEMM of dx): each rounding
moves an element by up to 2**-9 of itself, and a dot product of I (or H) such terms moves by about
2**-9 * sqrt(I) / sqrt(I) relative, i.e. ~2e-3 typically, with a tail; 2e-2 leaves margin without
hiding a wrong term (a missing LoRA or routing term is an O(1) error).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kk_helpers import isa_params  # noqa: E402
from kk_reference import make_case  # noqa: E402

import kt_kernels as kk  # noqa: E402

TOL_AUTOGRAD = 2e-2
ISAS = isa_params()


def rel(a, b) -> float:
    a = a.detach().double()
    b = b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    return err / scale if scale else err


def autograd_reference(c, fused: bool):
    """Plain float32 torch math with autograd: out, and grads of (out * dout).sum()."""
    t = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    L = c.lora
    x = t(c.x).to(torch.bfloat16).float().requires_grad_(True)
    w = t(c.w).requires_grad_(True)
    a_g = t(L.a_g).requires_grad_(True)
    a_u = a_g if fused else t(L.a_u).requires_grad_(True)
    b_g, b_u = t(L.b_g).requires_grad_(True), t(L.b_u).requires_grad_(True)
    a_d, b_d = t(L.a_d).requires_grad_(True), t(L.b_d).requires_grad_(True)
    Wg, Wu, Wd = t(c.gate), t(c.up), t(c.down)
    s = L.scaling
    out = torch.zeros(c.T, c.H)
    ids = torch.tensor(c.ids)
    for e in range(c.E):
        tt, jj = torch.nonzero(ids == e, as_tuple=True)
        if tt.numel() == 0:
            continue
        xe = x[tt]
        g = xe @ Wg[e].T + s * (xe @ a_g[e].T) @ b_g[e].T
        u = xe @ Wu[e].T + s * (xe @ a_u[e].T) @ b_u[e].T
        h = torch.nn.functional.silu(g) * u
        y = h @ Wd[e].T + s * (h @ a_d[e].T) @ b_d[e].T
        out = out.index_add(0, tt, w[tt, jj][:, None] * y)
    dout = t(c.dout).to(torch.bfloat16).float()
    (out * dout).sum().backward()
    grads = {"a_down": a_d.grad, "b_down": b_d.grad}
    if fused:
        grads["a_gate_up"] = a_g.grad
        grads["b_gate_up"] = torch.cat([b_g.grad, b_u.grad], 1)
    else:
        grads.update(a_gate=a_g.grad, a_up=a_u.grad, b_gate=b_g.grad, b_up=b_u.grad)
    return out, x.grad, w.grad, grads


def peft_b(b: torch.Tensor) -> torch.Tensor:
    """(E, out, r) values as a strided view of PEFT's (out, r * E) expert-fastest lora_B."""
    E, out, r = b.shape
    base = b.permute(1, 2, 0).reshape(out, r * E).contiguous()
    view = base.view(out, r, E).permute(2, 0, 1)
    assert view.stride() == (1, r * E, E)
    return view


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_autograd_cross_check(isa: str, fused: bool) -> None:
    c = make_case(8, 3, 200, 72, 3, 37, seed=41, fused=fused, used_experts=7, alpha=6.0)
    ref_out, ref_dx, ref_dw, ref_grads = autograd_reference(c, fused)

    f32 = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    eng = kk.MoEEngine(
        c.E,
        c.K,
        c.H,
        c.I,
        lora_rank=c.r,
        lora_alpha=6.0,
        lora_layout="fused" if fused else "split",
        num_threads=2,
        isa=isa,
    )
    eng.load_weights(gate_up=f32(c.gate_up).to(torch.bfloat16), down=f32(c.down))
    L = c.lora
    if fused:
        lora = dict(a_gate_up=f32(L.a_g), b_gate_up=peft_b(f32(np.concatenate([L.b_g, L.b_u], 1))))
    else:
        lora = dict(
            a_gate=f32(L.a_g), a_up=f32(L.a_u), b_gate=peft_b(f32(L.b_g)), b_up=peft_b(f32(L.b_u))
        )
    lora.update(a_down=f32(L.a_d), b_down=peft_b(f32(L.b_d)))
    grads = {
        f"grad_{k}": (torch.zeros_like(v) if k.startswith("a") else peft_b(torch.zeros_like(v)))
        for k, v in lora.items()
    }
    eng.set_lora(**lora, **grads)

    x = f32(c.x)
    out = torch.empty(c.T, c.H)
    eng.forward(x, torch.tensor(c.ids), f32(c.w), out)
    dx, dw = torch.empty(c.T, c.H), torch.empty(c.T, c.K)
    eng.backward(f32(c.dout), dx, dw)

    assert rel(out, ref_out) <= TOL_AUTOGRAD
    assert rel(dx, ref_dx) <= TOL_AUTOGRAD
    pad = torch.tensor(c.ids) < 0
    assert (dw[pad] == 0).all()
    assert rel(dw[~pad], ref_dw[~pad]) <= TOL_AUTOGRAD
    for name, g in ref_grads.items():
        assert rel(grads[f"grad_{name}"], g) <= TOL_AUTOGRAD, name


def test_bf16_tensors_roundtrip() -> None:
    c = make_case(4, 2, 64, 32, 0, 9, seed=43)
    eng = kk.MoEEngine(c.E, c.K, c.H, c.I, num_threads=1)
    eng.load_weights(gate=torch.tensor(c.gate), up=torch.tensor(c.up), down=torch.tensor(c.down))
    x = torch.tensor(c.x).to(torch.bfloat16)
    out_bf = torch.empty(c.T, c.H, dtype=torch.bfloat16)
    out_f = torch.empty(c.T, c.H)
    eng.forward(
        x,
        torch.tensor(c.ids, dtype=torch.int32),
        torch.tensor(c.w).to(torch.bfloat16),
        out_bf,
        save_for_backward=False,
    )
    eng.forward(
        x.float(),
        torch.tensor(c.ids),
        torch.tensor(c.w).to(torch.bfloat16).float(),
        out_f,
        save_for_backward=False,
    )
    assert torch.equal(out_bf, out_f.to(torch.bfloat16))


def test_requires_grad_and_device_errors() -> None:
    c = make_case(4, 2, 64, 32, 0, 3, seed=45)
    eng = kk.MoEEngine(c.E, c.K, c.H, c.I, num_threads=1)
    eng.load_weights(gate_up=torch.tensor(c.gate_up), down=torch.tensor(c.down))
    x = torch.tensor(c.x, requires_grad=True)
    out = torch.empty(c.T, c.H)
    with pytest.raises(ValueError, match=r"x: could not be exported through DLPack"):
        eng.forward(x, torch.tensor(c.ids), torch.tensor(c.w), out)
    with pytest.raises(ValueError, match=r"x: .*CPU array"):
        eng.forward(
            torch.empty(c.T, c.H, device="meta"), torch.tensor(c.ids), torch.tensor(c.w), out
        )
    with pytest.raises(TypeError, match=r"x: expected dtype float32 or bfloat16, got float16"):
        eng.forward(x.detach().half(), torch.tensor(c.ids), torch.tensor(c.w), out)


def test_kernels_import_no_torch_needed() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import kt_kernels; "
        "assert 'torch' not in sys.modules, 'kt_kernels imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
