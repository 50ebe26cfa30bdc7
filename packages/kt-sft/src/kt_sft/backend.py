"""Creates the object that computes one layer's routed experts: the engine or the torch reference.

Both offer the ``kt_kernels.MoEEngine`` API (docs/api/kernels.md); the rest of kt-sft
only talks to that API.
"""

from __future__ import annotations

import inspect
from typing import Any

from kt_sft.config import KTConfig
from kt_sft.reference import TorchMoEEngine

__all__ = ["EngineUnavailableError", "create_backend", "engine_available"]


class EngineUnavailableError(RuntimeError):
    """The compiled engine cannot be used (not built, or too old)."""


def engine_available() -> bool:
    """Whether ``kt_kernels.MoEEngine`` can be constructed in this installation."""
    try:
        from kt_sft._lib import kt_kernels
    except ImportError:
        return False
    return hasattr(kt_kernels, "MoEEngine")


def _engine_class() -> Any:
    try:
        from kt_sft._lib import kt_kernels
    except ImportError as exc:
        raise EngineUnavailableError(
            f"the kt-kernels engine cannot be imported ({exc}); install kt-kernels, or use "
            "KTConfig(backend='torch') for the (slow) PyTorch reference"
        ) from exc
    cls = getattr(kt_kernels, "MoEEngine", None)
    if cls is None:
        raise EngineUnavailableError(
            "this kt-kernels build has no MoEEngine; rebuild kt-kernels, or use "
            "KTConfig(backend='torch') for the (slow) PyTorch reference"
        )
    return cls


def _accepted_kwargs(cls: Any) -> set[str] | None:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def create_backend(
    cfg: KTConfig,
    *,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    intermediate_size: int,
    lora_layout: str,
    activation: str = "silu",
    activation_options: dict[str, Any] | None = None,
) -> Any:
    """A new engine (``cfg.backend == "engine"``) or :class:`TorchMoEEngine` for one layer.

    Under ``torch.distributed`` with several processes, :mod:`kt_sft.distributed` decides where
    the engine lives: the node leader gets it (wrapped to serve the node's other ranks), the
    other ranks get a stand-in that sends their tokens to the leader.
    """
    from kt_sft.distributed import current_context

    def local() -> Any:
        return _create_local_backend(
            cfg,
            num_experts=num_experts,
            top_k=top_k,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            lora_layout=lora_layout,
            activation=activation,
            activation_options=activation_options,
        )

    context = current_context()
    if context is None:
        return local()
    if cfg.activation_policy != "retain":
        # The node leader's engine serves every rank's tokens and does not get their inputs
        # back in backward: it retains (gradient checkpointing still saves its memory).
        cfg = cfg.replace(activation_policy="retain")
    return context.make_backend(local, top_k=top_k, hidden_size=hidden_size)


def _create_local_backend(
    cfg: KTConfig,
    *,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    intermediate_size: int,
    lora_layout: str,
    activation: str = "silu",
    activation_options: dict[str, Any] | None = None,
) -> Any:
    """A new engine or :class:`TorchMoEEngine` for one layer, in this process.

    ``activation_options``: the engine's ``activation_alpha`` / ``activation_limit`` /
    ``activation_up_offset`` (empty: plain ``activation``)."""
    kwargs: dict[str, Any] = {
        "lora_rank": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha if cfg.lora_rank else None,
        "lora_layout": lora_layout,
        "weight_dtype": cfg.weight_dtype,
        "max_tokens": cfg.max_tokens,
        "max_cache_depth": cfg.max_cache_depth,
        "num_threads": cfg.num_threads,
        "isa": cfg.isa,
    }
    if cfg.backend == "torch":
        return TorchMoEEngine(
            num_experts,
            top_k,
            hidden_size,
            intermediate_size,
            activation=activation,
            **kwargs,
            **(activation_options or {}),
        )
    cls = _engine_class()
    # Profiling is kt-sft's (kt_sft.profiling, from the engine's last_timings()), not a kwarg.
    optional: dict[str, Any] = {"activation": activation, "tp": cfg.tp}
    if cfg.activation_policy != "auto":  # auto: LayerEngine sets it per forward
        optional["activation_policy"] = cfg.activation_policy
    optional.update(activation_options or {})
    accepted = _accepted_kwargs(cls)
    for name, value in optional.items():
        default = {
            "activation": "silu",
            "tp": 1,
            "activation_policy": "retain",
            "activation_alpha": 1.0,
            "activation_limit": None,
            "activation_up_offset": 0.0,
            "activation_gate_softcap": None,
            "activation_up_softcap": None,
        }[name]
        if value == default:
            continue
        if accepted is not None and name not in accepted:
            raise EngineUnavailableError(
                f"this kt-kernels engine does not support {name}={value!r}; upgrade kt-kernels "
                "or leave the setting at its default"
            )
        kwargs[name] = value
    return cls(num_experts, top_k, hidden_size, intermediate_size, **kwargs)
