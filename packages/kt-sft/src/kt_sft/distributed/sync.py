"""Expert LoRA parameters across ranks: left out of DDP / FSDP, broadcast at the start, their
gradients reduced before the optimizer step; and the same for loops without DDP. See
:mod:`kt_sft.distributed`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from kt_sft.distributed.context import DistributedContext, KTDistributedError, current_context
from kt_sft.hf_experts import experts_layers
from kt_sft.peft_hooks import lora_parameters

__all__ = [
    "all_reduce_gradients",
    "broadcast_expert_lora",
    "broadcast_parameters",
    "expert_lora_parameters",
    "ignore_expert_lora_in_ddp",
    "kt_managed_parameters",
    "reduce_expert_lora_grads",
]


def expert_lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters whose gradients kt's engines write (not autograd): the expert
    LoRA bound to kt engines. kt's LoRA experts (torch modules) are not among them."""
    return [p for p in lora_parameters(model, include_lora_experts=False) if p.requires_grad]


def ignore_expert_lora_in_ddp(model: torch.nn.Module) -> list[str]:
    """Tell DDP (before it wraps ``model``) to leave the expert LoRA parameters alone; returns
    their names. :func:`reduce_expert_lora_grads` reduces them instead."""
    ids = {id(p) for p in expert_lora_parameters(model)}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    previous = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []) or [])
    merged = previous + [n for n in names if n not in previous]
    setter = getattr(
        torch.nn.parallel.DistributedDataParallel,
        "_set_params_and_buffers_to_ignore_for_model",
        None,
    )
    if callable(setter):
        setter(model, merged)
    else:  # pragma: no cover - the attribute DDP reads
        model._ddp_params_and_buffers_to_ignore = merged
    return names


def _buckets(tensors: list[torch.Tensor], limit: int = 1 << 26) -> Iterable[list[torch.Tensor]]:
    """Tensors grouped by (device, dtype), at most ``limit`` elements per group."""
    groups: dict[tuple[Any, Any], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for items in groups.values():
        bucket: list[torch.Tensor] = []
        count = 0
        for t in items:
            if bucket and count + t.numel() > limit:
                yield bucket
                bucket, count = [], 0
            bucket.append(t)
            count += t.numel()
        if bucket:
            yield bucket


def _flatten(bucket: list[torch.Tensor], device: Any) -> torch.Tensor:
    """One contiguous copy of a bucket's tensors on ``device`` (the collective's device)."""
    return torch.cat([t.reshape(-1) for t in bucket]).to(device)


def _unflatten_into(flat: torch.Tensor, bucket: list[torch.Tensor]) -> None:
    """Copies the result of a collective on ``_flatten(bucket)`` back into the bucket's tensors."""
    flat = flat.to(bucket[0].device)
    offset = 0
    with torch.no_grad():
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _collective(ctx: DistributedContext, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except KTDistributedError:
        raise
    except Exception as exc:
        t = ctx.topology
        raise KTDistributedError(
            f"kt distributed: rank {t.rank} failed during the {what}: {exc}. A peer process "
            f"probably crashed or is stuck (timeout {ctx.timeout:g}s, KT_DIST_TIMEOUT)"
        ) from exc


def broadcast_expert_lora(model: torch.nn.Module, *, src: int = 0) -> None:
    """Copy the expert LoRA values of global rank ``src`` to every rank (collective). DDP does
    this for the parameters it manages; these it does not."""
    broadcast_parameters(
        expert_lora_parameters(model), src=src, what="broadcast of the expert LoRA weights"
    )


def broadcast_parameters(
    params: Iterable[torch.Tensor], *, src: int = 0, what: str = "broadcast of parameters"
) -> None:
    """Copy the values of ``params`` on global rank ``src`` to every rank, in place
    (collective: every rank passes the same parameters in the same order). A no-op for one
    process."""
    import torch.distributed as dist

    ctx = current_context()
    if ctx is None:
        return
    for bucket in _buckets([p.data for p in params]):
        flat = _flatten(bucket, ctx._reduce_device)
        _collective(
            ctx, what, lambda flat=flat: dist.broadcast(flat, src=src, group=ctx._world_group)
        )
        _unflatten_into(flat, bucket)


def all_reduce_gradients(params: Iterable[torch.Tensor], *, average: bool = True) -> None:
    """Sum (``average``: and divide by the world size) the gradients of ``params`` over every
    rank, in place (collective: every rank passes the same parameters in the same order). A
    parameter without a gradient takes part with zeros and gets the result. For loops without
    DDP; a no-op for one process."""
    import torch.distributed as dist

    ctx = current_context()
    if ctx is None:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = ctx.topology.world_size
    for bucket in _buckets([p.grad for p in params]):
        flat = _flatten(bucket, ctx._reduce_device)
        _collective(
            ctx,
            "all-reduce of gradients",
            lambda flat=flat: dist.all_reduce(flat, group=ctx._world_group),
        )
        if average:
            flat.div_(world)
        _unflatten_into(flat, bucket)


def kt_managed_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that kt, not DDP or FSDP, looks after: the expert LoRA bound to kt
    engines (see :func:`expert_lora_parameters`) and the empty placeholders that stand for the
    expert weights the engines hold. FSDP must leave them out of sharding (``ignored_params``):
    the engines read and write them in place."""
    seen: set[int] = set()
    out: list[torch.nn.Parameter] = []
    for p in expert_lora_parameters(model):
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    for p in model.parameters():
        if getattr(p, "kt_released", False) and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _members_contribute(model: torch.nn.Module) -> bool:
    """Whether node members hold expert LoRA gradients of their own (GPU experts run in torch
    on every rank); otherwise only the leaders' are non-zero."""
    return any(layer.gpu_experts is not None for _, _, layer in experts_layers(model))


def reduce_expert_lora_grads(model: torch.nn.Module, *, average: bool = True) -> None:
    """Make every rank's expert LoRA gradients the global ones (collective; call after the last
    backward of an optimizer step, before clipping). kt-accelerate calls it for you.

    Members' share goes to their leader (when they have one), the leaders all-reduce, and each
    leader sends the sum to its members. With ``average`` the sum is divided by the world size,
    as DDP averages the other gradients.
    """
    import torch.distributed as dist

    ctx = current_context()
    if ctx is None:
        return
    t = ctx.topology
    params = expert_lora_parameters(model)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    node_size = len(t.node_ranks)
    gather_members = node_size > 1 and _members_contribute(model)
    for bucket in _buckets([p.grad for p in params]):
        flat = _flatten(bucket, ctx._reduce_device)
        if gather_members:
            _collective(
                ctx,
                "reduction of expert LoRA gradients within the node",
                lambda flat=flat: dist.reduce(flat, dst=t.leader, group=ctx._node_group),
            )
        if t.is_leader and len(t.leaders) > 1:
            _collective(
                ctx,
                "all-reduce of expert LoRA gradients among node leaders",
                lambda flat=flat: dist.all_reduce(flat, group=ctx._leaders_group),
            )
        if node_size > 1:
            _collective(
                ctx,
                "broadcast of expert LoRA gradients within the node",
                lambda flat=flat: dist.broadcast(flat, src=t.leader, group=ctx._node_group),
            )
        if average:
            flat.div_(t.world_size)
        _unflatten_into(flat, bucket)
