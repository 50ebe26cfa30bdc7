"""KTMoEFunction / RoutedExperts against the fp32 reference of the operator (DESIGN §2).

Tolerances (relative L2 error): the torch backend computes the same fp32 math, so 1e-5; the
engine rounds activations to bf16 (weights are bf16 in both, fp32 accumulation), about 2^-9
relative per rounding and a few roundings per path, so 2e-2.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kt_sft.binding import LoRAFactor, LoRASource
from kt_sft.config import KTConfig
from kt_sft.function import kt_moe
from kt_sft.gpu_experts import GPUExperts
from kt_sft.peft_hooks import _factor_views
from kt_sft.reference import moe_reference
from kt_sft.routed_experts import KTCacheError, RoutedExperts
from kt_sft.testing import rel_err


def tol(backend: str) -> float:
    return 1e-5 if backend == "torch" else 2e-2


class Setup:
    def __init__(
        self,
        backend: str,
        *,
        E: int = 6,
        K: int = 2,
        H: int = 24,
        inter: int = 16,
        engine_rank: int = 4,
        rank: int = 4,
        engine_alpha: float = 8.0,
        alpha: float = 8.0,
        layout: str = "fused",
        depth: int = 2,
        num_gpu: int = 0,
        lora_dtype: torch.dtype = torch.float32,
        kinds: tuple[str, ...] = ("gate_up", "down"),
        seed: int = 0,
        max_tokens: int = 4096,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.backend, self.E, self.K, self.H, self.inter = backend, E, K, H, inter
        cfg = KTConfig(
            backend=backend,
            weight_dtype="bf16" if backend == "engine" else "fp32",
            lora_rank=engine_rank,
            lora_alpha=engine_alpha,
            lora_layout=layout,
            max_cache_depth=depth,
            num_gpu_experts=num_gpu,
            max_tokens=max_tokens,
        )
        gate_up = torch.randn(E, 2 * inter, H, generator=gen) * 0.2
        down = torch.randn(E, H, inter, generator=gen) * 0.2
        if backend == "engine":
            gate_up, down = gate_up.bfloat16().float(), down.bfloat16().float()
        self.gate_up, self.down = gate_up, down
        self.layer = RoutedExperts(
            cfg,
            num_experts=E,
            top_k=K,
            hidden_size=H,
            intermediate_size=inter,
            lora_layout=layout,
            name="test layer",
        )
        self.layer.load_weights(gate_up, down)
        if num_gpu:
            self.layer.gpu_experts = GPUExperts(gate_up[:num_gpu], down[:num_gpu])
        self.scaling = alpha / rank
        dims = {"gate_up": (H, 2 * inter), "down": (inter, H)}
        kinds_map = {}
        self.params: list[nn.Parameter] = []
        for kind in kinds:
            in_f, out_f = dims[kind]
            a = nn.Parameter((torch.randn(E * rank, in_f, generator=gen) * 0.2).to(lora_dtype))
            b = nn.Parameter((torch.randn(out_f, rank * E, generator=gen) * 0.2).to(lora_dtype))
            va, vb = _factor_views(E, rank, in_f, out_f)
            kinds_map[kind] = (LoRAFactor(a, va), LoRAFactor(b, vb))
            self.params += [a, b]
        self.source = LoRASource("fused", rank, self.scaling, kinds_map, key=("test",))

    def inputs(self, T: int, seed: int = 1, pad: bool = True) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(T, self.H, generator=gen).requires_grad_(True)
        ids = torch.randint(0, self.E, (T, self.K), generator=gen)
        if pad and T > 2:
            ids[1, 0] = ids[1, 1]  # duplicate id in a row
            ids[2, 1] = -1  # padding slot
        w = torch.rand(T, self.K, generator=gen).requires_grad_(True)
        return x, ids, w

    def reference(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        w: torch.Tensor,
        params: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        params = params if params is not None else self.params
        leaf = {id(p): q for p, q in zip(self.params, params)}
        lora = {}
        for kind in self.source.kinds:
            a, b = self.source.canonical(kind, leaf=leaf)  # type: ignore[misc]
            lora[f"a_{kind}"], lora[f"b_{kind}"] = a.float(), b.float()
        inter = self.inter
        return moe_reference(
            x,
            ids,
            w,
            self.gate_up[:, :inter],
            self.gate_up[:, inter:],
            self.down,
            lora=lora,
            scaling=self.scaling,
        )


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in params]


def _ref_grads(
    s: Setup, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)
    pr = [p.detach().float().clone().requires_grad_(True) for p in s.params]
    y = s.reference(xr, ids, wr, pr)
    grads = torch.autograd.grad(y, [xr, wr, *pr], g)
    return (y.detach(), *grads)


@pytest.mark.parametrize("T", [0, 1, 7, 33])
def test_forward_backward_match_reference(backend: str, T: int) -> None:
    s = Setup(backend)
    x, ids, w = s.inputs(T)
    y = kt_moe(s.layer, x, ids, w, s.source)
    g = torch.randn(T, s.H, generator=torch.Generator().manual_seed(5))
    y.backward(g)
    if T == 0:
        assert y.shape == (0, s.H)
        assert x.grad is None or x.grad.shape == (0, s.H)
        return
    ref = _ref_grads(s, x, ids, w, g)
    t = tol(backend)
    assert rel_err(y, ref[0]) < t
    assert rel_err(x.grad, ref[1]) < t
    assert rel_err(w.grad, ref[2]) < t
    if T > 2:
        assert w.grad[2, 1] == 0  # padding slot gets no routing gradient
    for p, r in zip(s.params, ref[3:]):
        assert rel_err(p.grad, r) < t
    assert s.layer.pending_forwards == 0


def test_lora_grads_are_zero_copy_and_accumulate(backend: str) -> None:
    s = Setup(backend)
    x, ids, w = s.inputs(9)
    g = torch.randn(9, s.H)
    kt_moe(s.layer, x, ids, w, s.source).backward(g)
    first = _grads(s.params)
    bound = [p.grad for p in s.params]
    kt_moe(s.layer, x, ids, w, s.source).backward(g)  # gradient accumulation: +=
    for p, f, b in zip(s.params, first, bound):
        assert p.grad is b  # the engine wrote in place into the bound buffer
        assert rel_err(p.grad, 2 * f) < 1e-6
    for p in s.params:  # optimizer.zero_grad(set_to_none=True)
        p.grad = None
    kt_moe(s.layer, x, ids, w, s.source).backward(g)
    for p, f, b in zip(s.params, first, bound):
        assert p.grad is b
        assert rel_err(p.grad, f) < 1e-6
    for p in s.params:  # zero_grad(set_to_none=False)
        p.grad.zero_()
    kt_moe(s.layer, x, ids, w, s.source).backward(g)
    for p, f in zip(s.params, first):
        assert rel_err(p.grad, f) < 1e-6


def test_foreign_grad_tensor_receives_gradients(backend: str) -> None:
    s = Setup(backend)
    x, ids, w = s.inputs(9)
    g = torch.randn(9, s.H)
    kt_moe(s.layer, x, ids, w, s.source).backward(g)
    first = _grads(s.params)
    foreign = [torch.ones_like(p) for p in s.params]
    for p, f in zip(s.params, foreign):
        p.grad = f
    kt_moe(s.layer, x, ids, w, s.source).backward(g)
    for p, f, expect in zip(s.params, foreign, first):
        assert p.grad is f
        assert rel_err(p.grad, expect + 1) < 1e-6


def test_optimizer_step_is_seen_by_the_engine(backend: str) -> None:
    s = Setup(backend)
    x, ids, w = s.inputs(9)
    opt = torch.optim.SGD(s.params, lr=0.5)
    kt_moe(s.layer, x, ids, w, s.source).sum().backward()
    opt.step()  # in place: version counters change, the engine re-reads
    with torch.no_grad():
        y = kt_moe(s.layer, x, ids, w, s.source)
        ref = s.reference(x, ids, w)
    assert rel_err(y, ref) < tol(backend)
    with torch.no_grad():  # replaced storage: re-bound
        s.params[0].data = s.params[0].data.clone() * 0.5
        y = kt_moe(s.layer, x, ids, w, s.source)
        ref = s.reference(x, ids, w)
    assert rel_err(y, ref) < tol(backend)


@pytest.mark.parametrize(
    "variant",
    ["smaller_rank", "other_alpha", "bf16_lora", "split_engine", "gate_up_only", "no_lora"],
)
def test_staged_bindings_match_reference(backend: str, variant: str) -> None:
    kwargs: dict = {}
    if variant == "smaller_rank":
        kwargs = {"rank": 2, "engine_rank": 4}
    elif variant == "other_alpha":
        kwargs = {"alpha": 3.0, "engine_alpha": 8.0}
    elif variant == "bf16_lora":
        kwargs = {"lora_dtype": torch.bfloat16}
    elif variant == "split_engine":
        kwargs = {"layout": "split"}
    elif variant == "gate_up_only":
        kwargs = {"kinds": ("gate_up",)}
    elif variant == "no_lora":
        kwargs = {"kinds": ()}
    s = Setup(backend, **kwargs)
    source = s.source if s.source.kinds else None
    x, ids, w = s.inputs(11)
    g = torch.randn(11, s.H, generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # second pass: accumulation through the staged path
        kt_moe(s.layer, x, ids, w, source).backward(g)
    ref = _ref_grads(s, x, ids, w, g)
    t = tol(backend) if variant != "bf16_lora" else 3e-2
    assert rel_err(x.grad, 2 * ref[1]) < t
    assert rel_err(w.grad, 2 * ref[2]) < t
    for p, r in zip(s.params, ref[3:]):
        assert p.grad.dtype == p.dtype
        assert rel_err(p.grad.float(), 2 * r) < t


def test_cache_depth_lifo_and_out_of_order(backend: str) -> None:
    s = Setup(backend, depth=2)
    x1, ids1, w1 = s.inputs(7, seed=1)
    x2, ids2, w2 = s.inputs(5, seed=2)
    g1, g2 = torch.randn(7, s.H), torch.randn(5, s.H)
    y1 = kt_moe(s.layer, x1, ids1, w1, s.source)
    y2 = kt_moe(s.layer, x2, ids2, w2, s.source)
    assert s.layer.pending_forwards == 2
    x3, ids3, w3 = s.inputs(3, seed=3)
    with pytest.raises(KTCacheError, match="max_cache_depth"):
        kt_moe(s.layer, x3, ids3, w3, s.source)
    y1.backward(g1)  # not on top: recomputed, result unchanged
    y2.backward(g2)
    r1 = _ref_grads(s, x1, ids1, w1, g1)
    r2 = _ref_grads(s, x2, ids2, w2, g2)
    t = tol(backend)
    assert rel_err(x1.grad, r1[1]) < t and rel_err(x2.grad, r2[1]) < t
    for p, a, b in zip(s.params, r1[3:], r2[3:]):
        assert rel_err(p.grad, a + b) < t
    kt_moe(s.layer, x3, ids3, w3, s.source).sum().backward()
    assert s.layer.pending_forwards == 0


def test_abandoned_forward_is_discarded(backend: str) -> None:
    s = Setup(backend, depth=1)
    x, ids, w = s.inputs(6)
    for _ in range(3):  # forwards whose graph is dropped without a backward
        kt_moe(s.layer, x, ids, w, s.source)
    g = torch.randn(6, s.H)
    for p in s.params:
        p.grad = None
    kt_moe(s.layer, x, ids, w, s.source).backward(g)
    ref = _ref_grads(s, x, ids, w, g)
    for p, r in zip(s.params, ref[3:]):
        assert rel_err(p.grad, r) < tol(backend)
    assert s.layer.pending_forwards == 0


def test_no_grad_and_frozen_inputs_do_not_cache(backend: str) -> None:
    s = Setup(backend, depth=1)
    x, ids, w = s.inputs(6)
    with torch.no_grad():
        kt_moe(s.layer, x, ids, w, s.source)
    for p in s.params:
        p.requires_grad_(False)
    y = kt_moe(s.layer, x.detach(), ids, w.detach(), s.source)
    assert not y.requires_grad
    assert s.layer.pending_forwards == 0


def test_tokens_beyond_max_tokens_grow(backend: str) -> None:
    s = Setup(backend, max_tokens=4)
    x, ids, w = s.inputs(40)
    y = kt_moe(s.layer, x, ids, w, s.source)
    y.sum().backward()
    with torch.no_grad():
        assert rel_err(y, s.reference(x, ids, w)) < tol(backend)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_same_gradients(backend: str, reentrant: bool) -> None:
    s = Setup(backend, depth=1)
    proj = nn.Linear(s.H, s.H)
    x0, ids, w = s.inputs(9)

    def block(x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(proj(x))
        return kt_moe(s.layer, h, ids, w, s.source) * 2 + h

    g = torch.randn(9, s.H)
    block(x0).backward(g)
    want = [x0.grad.clone(), proj.weight.grad.clone(), *_grads(s.params)]
    x1 = x0.detach().clone().requires_grad_(True)
    proj.zero_grad(set_to_none=True)
    for p in s.params:
        p.grad = None
    calls: list[str] = []
    backend_obj = s.layer.experts_backend
    for name in ("submit_forward", "forward", "backward", "clear_cache"):
        method = getattr(backend_obj, name)

        def counted(*args: object, _m: object = method, _n: str = name, **kwargs: object) -> None:
            saved = kwargs.get("save_for_backward", args[4] if len(args) > 4 else True)
            calls.append(f"{_n}:{'cache' if saved else 'nocache'}" if "forward" in _n else _n)
            return _m(*args, **kwargs)  # type: ignore[operator]

        setattr(backend_obj, name, counted)
    checkpoint(block, x1, use_reentrant=reentrant).backward(g)
    # reentrant: a no-grad first pass, then a cached recompute; non-reentrant: a cached first
    # pass, then an uncached recompute. Either way one cached forward, one backward, no discard.
    direct = [
        c
        for i, c in enumerate(calls)  # forward() calls not made by submit_forward()
        if c.startswith("forward") and not (i and calls[i - 1] == "submit_" + c)
    ]
    assert calls.count("submit_forward:cache") == 1 and calls.count("backward") == 1, calls
    assert not direct and "clear_cache" not in calls, calls
    got = [x1.grad, proj.weight.grad, *[p.grad for p in s.params]]
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6  # same engine, same inputs: recompute is exact
    assert s.layer.pending_forwards == 0


def test_gpu_experts_match_all_engine_run(backend: str) -> None:
    full = Setup(backend)
    split = Setup(backend, num_gpu=2)
    assert split.layer.engine_experts == full.E - 2
    x, ids, w = full.inputs(13)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    g = torch.randn(13, full.H)
    y1 = kt_moe(full.layer, x, ids, w, full.source)
    y1.backward(g)
    y2 = kt_moe(split.layer, x2, ids, w2, split.source)
    y2.backward(g)
    t = tol(backend)
    assert rel_err(y2, y1) < t
    assert rel_err(x2.grad, x.grad) < t
    assert rel_err(w2.grad, w.grad) < t
    for a, b in zip(split.params, full.params):
        assert rel_err(a.grad, b.grad) < t


def test_all_experts_on_gpu_side() -> None:
    s = Setup("torch", num_gpu=6)
    assert s.layer.experts_backend is None
    x, ids, w = s.inputs(5)
    g = torch.randn(5, s.H)
    kt_moe(s.layer, x, ids, w, s.source).backward(g)
    ref = _ref_grads(s, x, ids, w, g)
    assert rel_err(x.grad, ref[1]) < 1e-5
    for p, r in zip(s.params, ref[3:]):
        assert rel_err(p.grad, r) < 1e-5


def test_closed_layer_raises() -> None:
    s = Setup("torch")
    s.layer.close()
    x, ids, w = s.inputs(3)
    with pytest.raises(RuntimeError, match="closed"):
        kt_moe(s.layer, x, ids, w, s.source)


def test_rank_larger_than_engine_rank_is_refused() -> None:
    s = Setup("torch", rank=8, engine_rank=4)
    x, ids, w = s.inputs(3)
    with pytest.raises(ValueError, match="lora_rank=8"):
        kt_moe(s.layer, x, ids, w, s.source)
