"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the parameters kt does not own.

Under accelerate's FSDP2 the non-expert parameters of a kt model (attention, router, shared
experts, embeddings, LM head, their PEFT LoRA and kt's LoRA experts) are sharded across the ranks
as usual. The parameters kt looks after stay out of sharding
(:func:`kt_sft.distributed.kt_managed_parameters`): the expert LoRA, which the engines read and
write in place and whose gradients :func:`kt_sft.distributed.reduce_expert_lora_grads` reduces
(leader serving + leader all-reduce, as under DDP), and the empty placeholders that stand for the
expert weights the engines hold. They are handed to ``fully_shard(..., ignored_params=...)``
through accelerate's ``FullyShardedDataParallelPlugin.ignored_modules``, which accelerate turns
into parameters with ``module.parameters()``: :class:`KTManagedParameters` is a module holding
exactly those parameters (registered by reference; it is not part of the model).

FSDP2 shards every rank's own copy of a parameter (it does not broadcast like DDP), so
:func:`prepare_for_fsdp2` also makes the trainable parameters equal on all ranks first (rank 0's
values), which matters for randomly initialised LoRA. It also routes a ``PeftModel``'s
``save_pretrained`` through :func:`kt_sft.adapter.save_adapter`, which gathers the sharded
adapter tensors (call it on every rank; rank 0 writes the standard, unsharded adapter).

accelerate itself turns FSDP on only for accelerator devices (``MULTI_GPU`` and the like); with
``KTAccelerator(cpu=True)`` and an FSDP2 plugin (or ``accelerate launch`` with an FSDP2 config)
kt runs the same accelerate FSDP2 path on the CPU over gloo (see :mod:`kt_accelerate.accelerator`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kt_sft import distributed as kt_distributed

__all__ = [
    "KTManagedParameters",
    "exclude_kt_parameters",
    "prepare_for_fsdp2",
    "separate_kt_parameters",
    "use_fsdp_on_cpu",
]


class KTManagedParameters(nn.Module):
    """A module whose ``parameters()`` are the given parameters (the same tensors, not
    copies): how kt's parameters reach accelerate's ``ignored_modules``."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)

    def forward(self) -> None:  # pragma: no cover - a holder, never called
        raise RuntimeError("KTManagedParameters only lists parameters for FSDP's ignored_params")


def _user_modules(ignored: Any, model: nn.Module) -> list[nn.Module]:
    """The plugin's own ``ignored_modules`` as modules (a regex string is matched against the
    model's module names with fullmatch, as accelerate does)."""
    if ignored is None:
        return []
    if isinstance(ignored, str):
        pattern = re.compile(ignored)
        return [m for n, m in model.named_modules() if pattern.fullmatch(n)]
    return list(ignored)


def exclude_kt_parameters(fsdp_plugin: Any, model: nn.Module) -> list[nn.Parameter]:
    """Add the parameters kt looks after in ``model`` to ``fsdp_plugin.ignored_modules`` (kept
    alongside the modules the plugin already ignores); returns them."""
    params = kt_distributed.kt_managed_parameters(model)
    if not params:
        return []
    modules = _user_modules(getattr(fsdp_plugin, "ignored_modules", None), model)
    held = {id(p) for m in modules if isinstance(m, KTManagedParameters) for p in m.parameters()}
    fresh = [p for p in params if id(p) not in held]
    if fresh:
        modules.append(KTManagedParameters(fresh))
    fsdp_plugin.ignored_modules = modules
    return params


def prepare_for_fsdp2(
    model: nn.Module, fsdp_plugin: Any, device: torch.device | str | None = None
) -> nn.Module:
    """Get a kt model ready for accelerate's FSDP2 sharding (collective): kt's trainable
    parameters on ``device`` (``fully_shard`` moves the parameters it manages there, not the
    ones it ignores; DDP's preparation moves them all), rank 0's trainable values everywhere,
    kt's parameters out of sharding, ``save_pretrained`` gathering the sharded adapter. Call
    after :func:`kt_accelerate.integration.prepare_model` and before ``fully_shard``."""
    from peft import PeftModel

    from kt_sft.adapter import install_save

    managed = exclude_kt_parameters(fsdp_plugin, model)
    if device is not None:
        target = torch.device(device)
        with torch.no_grad():
            for p in managed:
                if p.requires_grad and p.device != target:
                    p.data = p.data.to(target)
    if isinstance(model, PeftModel):
        install_save(model)
    ids = {id(p) for p in managed}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    with torch.no_grad():
        kt_distributed.broadcast_parameters(
            trainable, what="broadcast of the trainable parameters before FSDP2 sharding"
        )
    return model


def use_fsdp_on_cpu(accelerator: Any, fsdp_plugin: Any = None) -> Any:
    """Put a CPU (``MULTI_CPU``) ``accelerator`` on accelerate's FSDP path; returns the plugin.

    accelerate's state enables FSDP only for accelerator devices and keeps ``MULTI_CPU``
    otherwise; this sets the fields it would have set (``distributed_type`` and
    ``fsdp_plugin``; ``fsdp_plugin=None`` builds one from the launcher's ``FSDP_*``
    variables). The process state gets the type too, since every new ``AcceleratorState()``
    copies it over the accelerator state's. FSDP2 itself then runs on a CPU device mesh over
    gloo."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if fsdp_plugin is None:
        fsdp_plugin = FullyShardedDataParallelPlugin()
    if accelerator.state.mixed_precision != "no":
        fsdp_plugin.set_mixed_precision(accelerator.state.mixed_precision)
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = fsdp_plugin
    return fsdp_plugin


def separate_kt_parameters(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Move the parameters kt looks after in ``model`` into param groups of their own (same
    settings as the group they came from); returns how many groups were added.

    After ``fully_shard`` the other parameters are ``DTensor``s while kt's stay plain tensors,
    and fused optimizers (the Trainer's default ``adamw_torch_fused``) refuse a group mixing
    both. Call before the optimizer is prepared and before any state exists."""
    ids = {id(p) for p in kt_distributed.kt_managed_parameters(model)}
    if not ids:
        return 0
    added = []
    for group in optimizer.param_groups:
        kt_params = [p for p in group["params"] if id(p) in ids]
        if kt_params and len(kt_params) < len(group["params"]):
            group["params"] = [p for p in group["params"] if id(p) not in ids]
            added.append({**{k: v for k, v in group.items() if k != "params"}, "params": kt_params})
    for group in added:
        optimizer.add_param_group(group)
    return len(added)
