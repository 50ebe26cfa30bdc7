"""`CompiledExperts`: the compiled ``kt_kernels.MoEEngine`` as an :class:`ExpertsBackend`.

Which constructor options an installed engine takes is read from ``kt_kernels.ABI_VERSION``
(:data:`OPTION_ABI`), not from its signature: an option left at its default is simply not passed
to an engine that predates it, a non-default one is a clear error.
"""

from __future__ import annotations

from typing import Any

import torch

from kt_sft.options import ExpertsOptions

__all__ = [
    "OPTION_ABI",
    "CompiledExperts",
    "EngineUnavailableError",
    "engine_abi_version",
    "engine_available",
]


class EngineUnavailableError(RuntimeError):
    """The compiled engine cannot be used (not built, too old, or without a needed option)."""


#: ``MoEEngine`` constructor option -> the first ``kt_kernels.ABI_VERSION`` that takes it
#: (``None``: no released engine yet), with the value that older engines behave as.
OPTION_ABI: dict[str, tuple[int | None, Any]] = {
    "group_size": (2, 128),
    "tp": (4, 1),
    "activation_dtype": (4, "bf16"),
    "backward_dtype": (7, "bf16"),
    "activation_policy": (5, "retain"),
    "activation": (6, "silu"),
    "activation_alpha": (6, 1.0),
    "activation_limit": (6, None),
    "activation_up_offset": (6, 0.0),
    "activation_gate_softcap": (6, None),
    "activation_up_softcap": (6, None),
}
#: The first ``kt_kernels.ABI_VERSION`` with ``MoEEngine.set_biases``.
BIASES_ABI = 6


def _kernels() -> Any:
    try:
        from kt_sft._lib import kt_kernels
    except ImportError as exc:
        raise EngineUnavailableError(
            f"the kt-kernels engine cannot be imported ({exc}); install kt-kernels, or use "
            "KTConfig(backend='torch') for the (slow) PyTorch reference"
        ) from exc
    if not hasattr(kt_kernels, "MoEEngine"):
        raise EngineUnavailableError(
            "this kt-kernels build has no MoEEngine; rebuild kt-kernels, or use "
            "KTConfig(backend='torch') for the (slow) PyTorch reference"
        )
    return kt_kernels


def engine_available() -> bool:
    """Whether ``kt_kernels.MoEEngine`` can be constructed in this installation."""
    try:
        _kernels()
    except EngineUnavailableError:
        return False
    return True


def engine_abi_version() -> int:
    """``kt_kernels.ABI_VERSION`` of the installed engine (1 for builds older than it)."""
    return int(getattr(_kernels(), "ABI_VERSION", 1))


def engine_kwargs(options: ExpertsOptions, abi: int) -> dict[str, Any]:
    """``options`` as ``MoEEngine`` keyword arguments for an engine of ABI version ``abi``."""
    kwargs = options.engine_kwargs()
    for name, (since, default) in OPTION_ABI.items():
        if since is not None and abi >= since:
            continue
        if kwargs[name] != default:
            raise EngineUnavailableError(
                f"this kt-kernels engine (ABI_VERSION {abi}) does not support "
                f"{name}={kwargs[name]!r}; upgrade kt-kernels or leave the setting at its "
                f"default ({default!r})"
            )
        del kwargs[name]
    return kwargs


class CompiledExperts:
    """One layer's routed experts in ``kt_kernels.MoEEngine`` (:attr:`engine`)."""

    collective = False
    supports_recompute = True

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        options: ExpertsOptions,
    ) -> None:
        kernels = _kernels()
        kwargs = engine_kwargs(options, engine_abi_version())
        self.options = options
        self.engine = kernels.MoEEngine(
            num_experts, top_k, hidden_size, intermediate_size, **kwargs
        )

    # -- state ------------------------------------------------------------------------------
    @property
    def activation_policy(self) -> str:
        return str(self.engine.activation_policy)

    @activation_policy.setter
    def activation_policy(self, policy: str) -> None:
        self.engine.activation_policy = policy

    @property
    def cache_depth(self) -> int:
        return int(self.engine.cache_depth)

    @property
    def scaling(self) -> float:
        """The engine's LoRA scaling ``lora_alpha / lora_rank``."""
        return float(self.engine.scaling)

    def memory_stats(self) -> dict[str, int]:
        """The engine's memory by kind (``MoEEngine.memory_stats``)."""
        return dict(self.engine.memory_stats())

    # -- weights and LoRA -------------------------------------------------------------------
    def load_weights(self, *, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self.engine.load_weights(gate_up=gate_up, down=down)

    def set_biases(self, **biases: torch.Tensor) -> None:
        if engine_abi_version() < BIASES_ABI:
            raise EngineUnavailableError(
                f"this kt-kernels engine (ABI_VERSION {engine_abi_version()}) has no expert "
                f"biases (ABI_VERSION {BIASES_ABI}); upgrade kt-kernels"
            )
        self.engine.set_biases(**biases)

    def set_lora(self, **arrays: torch.Tensor) -> None:
        self.engine.set_lora(**arrays)

    def lora_updated(self) -> None:
        self.engine.lora_updated()

    # -- compute ----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        routing_weights: torch.Tensor,
        out: torch.Tensor,
        save_for_backward: bool = True,
    ) -> None:
        self.engine.forward(
            x, expert_ids, routing_weights, out, save_for_backward=save_for_backward
        )

    def submit_forward(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        routing_weights: torch.Tensor,
        out: torch.Tensor,
        save_for_backward: bool = True,
    ) -> None:
        self.engine.submit_forward(
            x, expert_ids, routing_weights, out, save_for_backward=save_for_backward
        )

    def sync_forward(self) -> None:
        self.engine.sync_forward()

    def backward(
        self,
        grad_out: torch.Tensor,
        grad_input: torch.Tensor,
        grad_routing_weights: torch.Tensor,
        *,
        x: torch.Tensor | None = None,
    ) -> None:
        if x is None:
            self.engine.backward(grad_out, grad_input, grad_routing_weights)
        else:
            self.engine.backward(grad_out, grad_input, grad_routing_weights, x=x)

    def clear_cache(self) -> None:
        self.engine.clear_cache()

    def last_timings(self) -> dict[str, float]:
        return dict(self.engine.last_timings())

    def close(self) -> None:
        self.engine.close()
