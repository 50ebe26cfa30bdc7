"""`KTMoEFunction`: the routed experts as one autograd node.

Forward sends the tokens to the layer's engine (via pinned host buffers when they live on a
GPU), computes the GPU experts while the engine runs, and returns the sum. Backward returns the
gradients of the hidden states and of the routing weights; the engine accumulates the expert
LoRA gradients straight into the bound buffers (the parameters' ``.grad``), so the LoRA
parameters are inputs of the node only to make autograd run its backward (and to receive the
GPU experts' share of their gradients).

Which forwards cache activations in the engine (see :mod:`kt_sft.routed_experts`), so that with
gradient checkpointing at most one layer's engine activations are alive:

* no grad needed (``torch.no_grad``, eval, reentrant checkpointing's first pass): inference
  forward, no autograd node, no cache entry;
* the first pass of a non-reentrant checkpoint (``"checkpointed"``): the autograd node is built
  but the engine keeps no cache, since the layer will be recomputed before its backward;
* that recompute (``"recompute"``): the engine caches, and the original node's backward, which
  follows it, consumes the entry;
* otherwise (``"cache"``): cached; the backward pops it.
"""

from __future__ import annotations

from typing import Any

import torch

from kt_sft.binding import LoRAPlan, LoRASource
from kt_sft.routed_experts import RoutedExperts, _Holder

__all__ = ["KTMoEFunction", "forward_mode", "kt_moe"]


def _checkpoint_phase() -> str | None:
    """``"first"`` inside a non-reentrant checkpoint's first pass, ``"recompute"`` inside its
    recomputation, else ``None`` (read from the innermost saved-tensor hooks torch installs)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # pragma: no cover - older torch
        return None
    try:
        hooks = top(False)
    except TypeError:  # pragma: no cover - signature differs
        hooks = top()
    if not hooks:
        return None
    pack = hooks[0]
    name = getattr(pack, "__qualname__", "") or ""
    wrapped = getattr(pack, "__wrapped__", None)
    if wrapped is not None:
        name += " " + (getattr(wrapped, "__qualname__", "") or "")
    if "_recomputation_hook" in name:
        return "recompute"
    if "_checkpoint_hook" in name:
        return "first"
    return None


def forward_mode(
    hidden: torch.Tensor, routing_weights: torch.Tensor, params: list[torch.Tensor]
) -> str:
    """``"infer"`` (no graph), ``"checkpointed"`` (graph, no engine cache: a non-reentrant
    checkpoint will recompute the layer), ``"recompute"`` (that recomputation: cached for the
    backward that follows) or ``"cache"``."""
    if not torch.is_grad_enabled():
        return "infer"
    if not (
        hidden.requires_grad
        or routing_weights.requires_grad
        or any(p.requires_grad for p in params)
    ):
        return "infer"
    phase = _checkpoint_phase()
    if phase == "first":
        return "checkpointed"
    if phase == "recompute":
        return "recompute"
    return "cache"


class KTMoEFunction(torch.autograd.Function):
    """Autograd node of the routed experts of one layer.

    ``apply(hidden, expert_ids, routing_weights, layer, source, plan, mode, *lora_params)``:
    ``hidden: T x H`` (any device / float dtype), ``expert_ids: T x K`` (−1 = none),
    ``routing_weights: T x K``; ``layer`` the :class:`~kt_sft.routed_experts.RoutedExperts`;
    ``source`` the PEFT LoRA (or ``None``) and ``plan`` its engine binding; ``mode`` from
    :func:`forward_mode`; ``lora_params`` = ``source.params()``. Returns ``T x H`` in
    ``hidden``'s dtype. Most callers use :func:`kt_moe`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        routing_weights: torch.Tensor,
        layer: RoutedExperts,
        source: LoRASource | None,
        plan: LoRAPlan | None,
        mode: str,
        *lora_params: torch.Tensor,
    ) -> torch.Tensor:
        cache = mode in ("cache", "recompute")
        holder = _Holder() if cache else None
        out = _forward(
            layer,
            hidden,
            expert_ids,
            routing_weights,
            source,
            cache=cache,
            holder=holder,
            claimable=(mode == "recompute"),
        )
        ctx.save_for_backward(hidden, expert_ids, routing_weights)
        ctx.layer = layer
        ctx.source = source
        ctx.plan = plan
        ctx.holder = holder
        ctx.num_params = len(lora_params)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        hidden, expert_ids, routing_weights = ctx.saved_tensors
        layer: RoutedExperts = ctx.layer
        source: LoRASource | None = ctx.source
        T = hidden.shape[0]
        dx = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        dw = torch.zeros(routing_weights.shape, dtype=torch.float32, device=hidden.device)
        param_grads: list[torch.Tensor | None] = [None] * ctx.num_params

        gpu_result: list[Any] = []

        def gpu_backward() -> None:
            # Runs while the engine computes its backward (GPU work is asynchronous).
            gpu_result.append(
                _gpu_backward(layer, hidden, expert_ids, routing_weights, source, grad_out)
            )

        if T > 0 and layer.experts_backend is not None:
            ids = _engine_ids(expert_ids, layer)
            if layer.gpu_experts is not None:
                gpu_backward()
            edx, edw = layer.engine_backward(
                ctx.holder, hidden, ids, routing_weights, grad_out, ctx.plan
            )
            dx += edx
            dw += edw
        elif T > 0 and layer.gpu_experts is not None:
            gpu_backward()
        elif T == 0 and _collective(layer):
            layer.engine_backward(
                ctx.holder, hidden, expert_ids, routing_weights, grad_out, ctx.plan
            )
        if gpu_result:
            gdx, gdw, gparams = gpu_result[0]
            dx += gdx
            dw += gdw
            if source is not None:
                for i, p in enumerate(source.params()):
                    param_grads[i] = gparams.get(id(p))
        ctx.holder = None
        return (
            dx.to(hidden.dtype) if ctx.needs_input_grad[0] else None,
            None,
            dw.to(routing_weights.dtype) if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
            *param_grads,
        )


def _collective(layer: RoutedExperts) -> bool:
    """Whether the layer's backend exchanges tokens with other ranks (kt_sft.distributed)."""
    return layer.experts_backend is not None and layer.experts_backend.collective


def _engine_ids(expert_ids: torch.Tensor, layer: RoutedExperts) -> torch.Tensor:
    n = layer.num_gpu_experts
    if n == 0:
        return expert_ids
    return torch.where(expert_ids >= n, expert_ids - n, torch.full_like(expert_ids, -1))


def _forward(
    layer: RoutedExperts,
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    routing_weights: torch.Tensor,
    source: LoRASource | None,
    *,
    cache: bool,
    holder: _Holder | None,
    claimable: bool = False,
) -> torch.Tensor:
    T = hidden.shape[0]
    if T == 0:
        if _collective(layer):  # the node's other ranks wait for this call, tokens or not
            layer.engine_forward(
                hidden, expert_ids, routing_weights, cache=cache, holder=holder, claimable=claimable
            )
        return hidden.new_zeros(hidden.shape)

    def gpu_forward() -> torch.Tensor:
        with torch.no_grad():
            return layer.gpu_experts.compute(hidden, expert_ids, routing_weights, source)

    out: torch.Tensor | None = None
    if layer.experts_backend is not None:
        overlap = gpu_forward if layer.gpu_experts is not None else None
        out, gpu_out = layer.engine_forward(
            hidden,
            _engine_ids(expert_ids, layer),
            routing_weights,
            cache=cache,
            holder=holder,
            overlap=overlap,
            claimable=claimable,
        )
        if gpu_out is not None:
            out = out + gpu_out
    elif layer.gpu_experts is not None:
        out = gpu_forward()
    assert out is not None
    return out.to(hidden.dtype)


def _gpu_backward(
    layer: RoutedExperts,
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    routing_weights: torch.Tensor,
    source: LoRASource | None,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    params = source.params() if source is not None else []
    leaf = {id(p): p.detach().requires_grad_(p.requires_grad) for p in params}
    x = hidden.detach().requires_grad_(True)
    w = routing_weights.detach().requires_grad_(True)
    with torch.enable_grad():
        y = layer.gpu_experts.compute(x, expert_ids, w, source, leaf=leaf)
        wanted = [x, w] + [t for t in leaf.values() if t.requires_grad]
        grads = torch.autograd.grad(y, wanted, grad_out.to(y.device, y.dtype), allow_unused=True)
    dx = grads[0] if grads[0] is not None else torch.zeros_like(x)
    dw = grads[1] if grads[1] is not None else torch.zeros_like(w)
    out: dict[int, torch.Tensor] = {}
    i = 2
    for p in params:
        if leaf[id(p)].requires_grad:
            g = grads[i]
            i += 1
            if g is not None:
                out[id(p)] = g.to(p.dtype)
    return dx.float().to(hidden.device), dw.float().to(hidden.device), out


def kt_moe(
    layer: RoutedExperts,
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    routing_weights: torch.Tensor,
    source: LoRASource | None = None,
) -> torch.Tensor:
    """Routed experts of ``layer`` on ``hidden: T x H`` with autograd (the usual entry point)."""
    layer.check_open()
    params = source.params() if source is not None else []
    plan = layer.plan_for(source)
    mode = forward_mode(hidden, routing_weights, params)
    if mode == "infer":
        with torch.no_grad():
            return _forward(
                layer, hidden, expert_ids, routing_weights, source, cache=False, holder=None
            )
    return KTMoEFunction.apply(
        hidden, expert_ids, routing_weights, layer, source, plan, mode, *params
    )
