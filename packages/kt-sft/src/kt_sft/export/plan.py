"""Where each LoRA delta goes on disk: in-model parameter names mapped to checkpoint keys (by
transformers' renaming rules, and through the kt-models registry for routed experts), and for
each key the operations that add its deltas."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kt_sft.export.errors import ExportError
from kt_sft.export.targets import LoraTarget
from kt_sft.export.writer import SCALE_SUFFIX

__all__ = ["MergeOp", "MergePlan", "disk_names", "plan_merges"]

#: Adds LoRA deltas to a float32 base tensor, or to its slice ``index`` (one expert) when given.
MergeOp = Callable[[torch.Tensor, "int | None"], None]


@dataclass
class MergePlan:
    """Where LoRA deltas go on disk: ``ops[disk_key]`` adds its deltas to a float32 tensor."""

    ops: dict[str, list[MergeOp]] = field(default_factory=dict)
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Base weights taken from the adapter instead of the checkpoint.
    replace: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, key: str, shape: tuple[int, ...], op: MergeOp) -> None:
        self.ops.setdefault(key, []).append(op)
        self.expected[key] = shape


def disk_names(reader: Any, model: torch.nn.Module) -> dict[str, str]:
    """In-model parameter name -> on-disk key, by transformers' own renaming rules, for every
    key that loads into one parameter as is (keys that a converter fuses, such as per-expert
    weights, are left out; the registry maps those)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = dict.fromkeys(model.state_dict())
    disk_of: dict[str, str] = {}
    for key in reader.keys():
        if key.endswith(SCALE_SUFFIX):
            continue
        renamed, pattern = rename_source_key(
            key, renamings, converters, model.base_model_prefix, meta_state
        )
        if pattern is None:
            disk_of.setdefault(renamed, key)
    return disk_of


def plan_merges(reader: Any, disk_of: dict[str, str], targets: dict[str, LoraTarget]) -> MergePlan:
    """The merge plan of every LoRA target: 2-D weights by their disk key, routed experts
    through the checkpoint layout the registry reads (per-expert or fused)."""
    spec = reader.spec
    plan = MergePlan()
    experts_of = {
        f"{spec.layers_path}.{layer}.{spec.moe_block_attr}.{spec.experts_attr}": layer
        for layer in reader.moe_layer_indices
    }
    for target in targets.values():
        owner, _, pname = target.param.rpartition(".")
        if len(target.shape) == 3:
            layer = experts_of.get(owner)
            if layer is None or pname not in ("gate_up_proj", "down_proj"):
                raise ExportError(
                    f"LoRA on the 3-D parameter {target.param}: only the routed "
                    "experts' gate_up_proj / down_proj of an MoE layer are merged"
                )
            _plan_experts(plan, reader, target, layer, pname.removesuffix("_proj"))
            continue
        if len(target.shape) != 2:
            raise ExportError(
                f"LoRA on {target.param} of shape {target.shape}: only 2-D weights "
                "and 3-D experts are merged"
            )
        key = disk_of.get(target.param)
        if key is None:
            raise ExportError(
                f"LoRA target {target.param} has no tensor of its own in the base "
                "checkpoint (a weight tied to another, e.g. lm_head with "
                "tie_word_embeddings?); such adapters cannot be merged tensor by "
                "tensor"
            )
        plan.add(key, target.shape, _adder(target.delta))
        if target.base_weight is not None:
            plan.replace[key] = target.base_weight
    return plan


def _adder(delta: Callable[[], torch.Tensor]) -> MergeOp:
    def op(t: torch.Tensor, index: int | None) -> None:
        t.add_(delta())

    return op


def _plan_experts(plan: MergePlan, reader: Any, target: LoraTarget, layer: int, which: str) -> None:
    spec = reader.spec
    num_experts, out_dim, in_dim = target.shape
    inter = out_dim // 2 if which == "gate_up" else in_dim
    if reader.layout(layer) == "per_expert":
        for e in range(num_experts):
            if which == "gate_up":
                for proj, rows in (("gate", slice(0, inter)), ("up", slice(inter, 2 * inter))):
                    key = spec.checkpoint_expert_key(layer, e, proj)
                    plan.add(
                        key,
                        (inter, in_dim),
                        _adder(lambda e=e, rows=rows: target.expert_delta(e, rows)),
                    )
            else:
                key = spec.checkpoint_expert_key(layer, e, "down")
                plan.add(key, (out_dim, in_dim), _adder(lambda e=e: target.expert_delta(e)))
    else:
        key = spec.checkpoint_fused_key(layer, which)
        stored = reader.tensor_info(key).shape
        transposed = (
            spec.checkpoint_fused_transposed
            and stored != target.shape
            and stored == (num_experts, in_dim, out_dim)
        )
        shape = (num_experts, in_dim, out_dim) if transposed else target.shape

        def op(t: torch.Tensor, index: int | None) -> None:
            # 3-D tensors are streamed one expert (index) at a time
            for e in range(num_experts) if index is None else (index,):
                d = target.expert_delta(e)
                (t if index is not None else t[e]).add_(d.t() if transposed else d)

        plan.add(key, shape, op)
