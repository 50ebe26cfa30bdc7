"""Creates the :class:`ExpertsBackend` of one layer: the compiled engine or the torch reference.

Where the backend lives is a *placement*'s decision: by default every process builds its own;
:mod:`kt_sft.distributed` installs a placement (through :func:`kt_sft.install.ensure_installed`)
that gives a node's leader the engine and its other ranks a proxy. This module knows only the
protocol, the options record and the two local implementations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from kt_sft.compiled import CompiledExperts, EngineUnavailableError, engine_available
from kt_sft.experts_backend import ExpertsBackend
from kt_sft.options import ExpertsOptions
from kt_sft.reference import TorchMoEEngine

__all__ = [
    "EngineUnavailableError",
    "Placement",
    "create_experts_backend",
    "create_local_backend",
    "engine_available",
    "set_placement",
]


class Placement(Protocol):
    """Decides where one layer's backend lives; ``None`` when this process builds its own."""

    def __call__(
        self,
        local: Callable[[ExpertsOptions], ExpertsBackend],
        options: ExpertsOptions,
        *,
        top_k: int,
        hidden_size: int,
    ) -> ExpertsBackend | None: ...


_PLACEMENTS: list[Placement] = []


def set_placement(placement: Placement) -> None:
    """Consult ``placement`` for every backend created from now on (idempotent)."""
    if placement not in _PLACEMENTS:
        _PLACEMENTS.append(placement)


def create_local_backend(
    options: ExpertsOptions,
    *,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    intermediate_size: int,
) -> ExpertsBackend:
    """A new :class:`CompiledExperts` (``options.backend == "engine"``) or
    :class:`TorchMoEEngine` for one layer, in this process."""
    if options.backend == "torch":
        return TorchMoEEngine.from_options(
            num_experts, top_k, hidden_size, intermediate_size, options
        )
    return CompiledExperts(num_experts, top_k, hidden_size, intermediate_size, options)


def create_experts_backend(
    options: ExpertsOptions,
    *,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    intermediate_size: int,
) -> ExpertsBackend:
    """The backend of one layer: the placement's choice, else a local one."""

    def local(opts: ExpertsOptions) -> ExpertsBackend:
        return create_local_backend(
            opts,
            num_experts=num_experts,
            top_k=top_k,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
        )

    for placement in _PLACEMENTS:
        placed = placement(local, options, top_k=top_k, hidden_size=hidden_size)
        if placed is not None:
            return placed
    return local(options)
