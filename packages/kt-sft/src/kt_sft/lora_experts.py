"""LoRA experts: N extra always-active trainable SwiGLU experts beside the routed experts.

Every token goes through all of them; their outputs are averaged and added to the routed
experts' output. The down projections start at zero, so training starts from the base model.
They are ordinary torch parameters (computed on the model's device), saved with the adapter
(``kt_lora_experts.safetensors``) and loaded back by :func:`kt_sft.load_adapter`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kt_sft.reference import ACTIVATIONS

__all__ = ["LoRAExperts"]


class LoRAExperts(nn.Module):
    """``num_experts`` SwiGLU MLPs ``hidden -> width -> hidden``; output = their mean."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        width: int,
        *,
        activation: str = "silu",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1 or width < 1:
            raise ValueError("LoRAExperts needs num_experts >= 1 and width >= 1")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.width = width
        self.activation = activation
        self.w_gate_up = nn.Parameter(
            torch.empty(num_experts, 2 * width, hidden_size, dtype=dtype, device=device)
        )
        self.w_down = nn.Parameter(
            torch.zeros(num_experts, hidden_size, width, dtype=dtype, device=device)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Gate/up like ``nn.Linear`` (uniform ±1/sqrt(H)); down zero."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.w_gate_up.uniform_(-bound, bound)
            self.w_down.zero_()

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"width={self.width}, activation={self.activation!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: T x H`` -> ``T x H`` (mean over the LoRA experts), in ``x``'s dtype."""
        w_gu = self.w_gate_up.to(x.dtype)
        gu = torch.einsum("th,nwh->ntw", x, w_gu)
        g, u = gu.split(self.width, dim=-1)
        h = ACTIVATIONS[self.activation](g) * u
        y = torch.einsum("ntw,nhw->nth", h, self.w_down.to(x.dtype))
        return y.mean(dim=0)
