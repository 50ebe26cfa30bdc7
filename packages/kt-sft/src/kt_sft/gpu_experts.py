"""GPU experts: the first ``num_gpu_experts`` routed experts of a layer, kept in torch.

They run on the model's device beside the engine (which holds the others), on the same routing,
with the same LoRA parameters (their slices of PEFT's tensors); the outputs sum. Inside
:class:`kt_sft.function.KTMoEFunction` they are computed while the engine runs, and recomputed
with autograd in the backward while the engine runs its own backward.
"""

from __future__ import annotations

import torch
from torch import nn

from kt_sft.binding import LoRASource
from kt_sft.reference import moe_reference

__all__ = ["GPUExperts"]


class GPUExperts(nn.Module):
    """Frozen weights of experts ``[0, N)`` as (non-persistent) buffers on the model's device."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, activation: str = "silu") -> None:
        super().__init__()
        if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
            raise ValueError("GPUExperts needs gate_up N x 2I x H and down N x H x I")
        self.num_experts = int(gate_up.shape[0])
        self.intermediate_size = int(down.shape[2])
        self.activation = activation
        self.register_buffer("gate_up", gate_up.detach().clone(), persistent=False)
        self.register_buffer("down", down.detach().clone(), persistent=False)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, activation={self.activation!r}"

    def compute(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        routing_weights: torch.Tensor,
        source: LoRASource | None,
        leaf: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """fp32 output of these experts for the slots routed to them (others contribute 0)."""
        n = self.num_experts
        device = self.gate_up.device
        ids = expert_ids.to(device)
        ids = torch.where(ids < n, ids, torch.full_like(ids, -1))
        inter = self.intermediate_size
        gate_up = self.gate_up.float()
        lora = None
        scaling: dict[str, float] = {}
        if source is not None:
            lora = {}
            for kind in source.kinds:
                scaling[kind] = source.scaling_of(kind)
                views = source.canonical(kind, leaf=leaf)
                assert views is not None
                a, b = views
                lora[f"a_{kind}"] = a[:n].to(device, torch.float32)
                lora[f"b_{kind}"] = b[:n].to(device, torch.float32)
        return moe_reference(
            x.to(device, torch.float32),
            ids,
            routing_weights.to(device, torch.float32),
            gate_up[:, :inter],
            gate_up[:, inter:],
            self.down.float(),
            lora=lora,
            scaling=scaling,
            activation=self.activation,
        )
