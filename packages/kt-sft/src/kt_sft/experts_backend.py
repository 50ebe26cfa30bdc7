"""`ExpertsBackend`: what computes one layer's routed experts, as the rest of kt-sft sees it.

Three classes implement it: :class:`kt_sft.compiled.CompiledExperts` (the compiled
``kt_kernels.MoEEngine``), :class:`kt_sft.reference.TorchMoEEngine` (the fp32 PyTorch reference)
and the distributed proxies :class:`kt_sft.distributed.LeaderBackend` /
:class:`kt_sft.distributed.MemberBackend`. :func:`kt_sft.backend.create_experts_backend` makes
one; :class:`kt_sft.routed_experts.RoutedExperts` drives it. The call conventions are those of
``kt_kernels.MoEEngine`` (docs/api/kernels.md): arrays are host tensors, outputs are written into
the tensors passed in, forwards that save for backward are popped last-in first-out.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["ExpertsBackend"]


@runtime_checkable
class ExpertsBackend(Protocol):
    """Forward, backward, LoRA binding, cache control and timings of one layer's experts."""

    #: Every rank of a node must make each call, even with no tokens (a token exchange).
    collective: bool
    #: Whether :attr:`activation_policy` may be ``"recompute"`` (backward then takes ``x``).
    supports_recompute: bool

    @property
    def activation_policy(self) -> str:
        """``"retain"`` or ``"recompute"``: what the next cached forwards keep for backward."""
        ...

    @activation_policy.setter
    def activation_policy(self, policy: str) -> None: ...

    @property
    def cache_depth(self) -> int:
        """Forwards saved for backward and not yet consumed."""
        ...

    def load_weights(self, *, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Keep the frozen weights ``gate_up: E x 2I x H`` and ``down: E x H x I``."""
        ...

    def set_biases(self, **biases: torch.Tensor) -> None:
        """Keep frozen biases ``gate`` / ``up`` (E x I) or ``gate_up`` (E x 2I) and ``down``
        (E x H), added to the projections' outputs."""
        ...

    def set_lora(self, **arrays: torch.Tensor) -> None:
        """Bind the LoRA arrays and their gradient arrays (kept by reference)."""
        ...

    def lora_updated(self) -> None:
        """Re-read the bound LoRA arrays (their values changed)."""
        ...

    def forward(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        routing_weights: torch.Tensor,
        out: torch.Tensor,
        save_for_backward: bool = True,
    ) -> None:
        """``out = experts(x)``; with ``save_for_backward`` an entry is pushed on the cache."""
        ...

    def submit_forward(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        routing_weights: torch.Tensor,
        out: torch.Tensor,
        save_for_backward: bool = True,
    ) -> None:
        """Start :meth:`forward`; :meth:`sync_forward` waits for it."""
        ...

    def sync_forward(self) -> None: ...

    def backward(
        self,
        grad_out: torch.Tensor,
        grad_input: torch.Tensor,
        grad_routing_weights: torch.Tensor,
        *,
        x: torch.Tensor | None = None,
    ) -> None:
        """Pop the newest cached forward, write ``grad_input`` and ``grad_routing_weights`` and
        accumulate the LoRA gradients; ``x`` (the forward's input) only for a ``recompute``
        entry."""
        ...

    def clear_cache(self) -> None:
        """Drop every cached forward."""
        ...

    def last_timings(self) -> dict[str, float]:
        """Milliseconds per phase of the last call (``forward.*``, ``backward.*``); may be
        empty."""
        ...

    def close(self) -> None:
        """Free the weights and caches; the backend cannot run afterwards."""
        ...
