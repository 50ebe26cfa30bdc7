"""The frozen weights of one MoE layer's routed experts, in HF ``nn.Linear`` layout (out x in)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExpertWeights"]


@dataclass
class ExpertWeights:
    """Routed-expert weights of one layer.

    Either ``gate_up`` (``E x 2I x H``: the gate projection's rows first, then the up
    projection's) or both ``gate`` and ``up`` (``E x I x H`` each) are set; ``down`` is
    ``E x H x I``. All tensors share one dtype and device.
    """

    down: torch.Tensor
    gate_up: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    up: torch.Tensor | None = None

    def __post_init__(self) -> None:
        fused = self.gate_up is not None
        split = self.gate is not None or self.up is not None
        if fused == split:
            raise ValueError("ExpertWeights needs either gate_up or both gate and up (not both)")
        if split and (self.gate is None or self.up is None):
            raise ValueError("ExpertWeights needs both gate and up when gate_up is not given")
        if self.down.dim() != 3:
            raise ValueError(f"down must be E x H x I, got shape {tuple(self.down.shape)}")
        num_experts, hidden, inter = self.down.shape
        if fused:
            assert self.gate_up is not None
            expected = (num_experts, 2 * inter, hidden)
            if tuple(self.gate_up.shape) != expected:
                raise ValueError(
                    f"gate_up must be E x 2I x H = {expected} to match down "
                    f"{tuple(self.down.shape)}, got {tuple(self.gate_up.shape)}"
                )
            tensors = (self.gate_up, self.down)
        else:
            assert self.gate is not None and self.up is not None
            expected = (num_experts, inter, hidden)
            for name, tensor in (("gate", self.gate), ("up", self.up)):
                if tuple(tensor.shape) != expected:
                    raise ValueError(
                        f"{name} must be E x I x H = {expected} to match down "
                        f"{tuple(self.down.shape)}, got {tuple(tensor.shape)}"
                    )
            tensors = (self.gate, self.up, self.down)
        if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
            raise ValueError("ExpertWeights tensors must share one dtype and one device")

    @property
    def num_experts(self) -> int:
        """E, the number of routed experts."""
        return int(self.down.shape[0])

    @property
    def hidden_size(self) -> int:
        """H, the model width."""
        return int(self.down.shape[1])

    @property
    def intermediate_size(self) -> int:
        """I, one expert's intermediate size."""
        return int(self.down.shape[2])

    @property
    def dtype(self) -> torch.dtype:
        """The tensors' dtype."""
        return self.down.dtype

    @property
    def is_fused(self) -> bool:
        """Whether gate and up are held as one ``gate_up`` tensor."""
        return self.gate_up is not None

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up, down)``; concatenates gate and up (a copy) when they are held apart."""
        if self.gate_up is not None:
            return self.gate_up, self.down
        assert self.gate is not None and self.up is not None
        return torch.cat([self.gate, self.up], dim=1), self.down

    def split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate, up, down)``; gate and up are views into ``gate_up`` when it is fused."""
        if self.gate_up is not None:
            inter = self.intermediate_size
            return self.gate_up[:, :inter], self.gate_up[:, inter:], self.down
        assert self.gate is not None and self.up is not None
        return self.gate, self.up, self.down

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> ExpertWeights:
        """A copy converted to ``dtype``/``device`` (the same object when nothing changes)."""
        if (dtype is None or dtype == self.dtype) and (
            device is None or torch.device(device) == self.down.device
        ):
            return self

        def conv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype=dtype, device=device)

        return ExpertWeights(
            down=conv(self.down),
            gate_up=conv(self.gate_up),  # type: ignore[arg-type]
            gate=conv(self.gate),
            up=conv(self.up),
        )

    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.down, self.gate_up, self.gate, self.up)
            if t is not None
        )
