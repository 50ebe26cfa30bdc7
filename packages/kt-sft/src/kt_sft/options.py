"""`ExpertsOptions`: the settings one layer's experts backend is built with, in one record.

Built from :class:`~kt_sft.config.KTConfig` (plus what the layer itself decides: its activation
and LoRA layout) by :meth:`ExpertsOptions.from_config`, and handed unchanged to
:func:`kt_sft.backend.create_experts_backend`, which gives it to the compiled engine's adapter
(:class:`kt_sft.compiled.CompiledExperts`) or to the torch reference. One field per option: a new
engine option is a new field here, a new ``KTConfig`` field, and a line in
:meth:`ExpertsOptions.engine_kwargs`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from kt_sft.config import KTConfig

__all__ = [
    "ActivationDtype",
    "ActivationPolicy",
    "BackendKind",
    "BackwardDtype",
    "ExpertsOptions",
    "LoRALayout",
    "WeightDtype",
]

BackendKind = Literal["engine", "torch"]
WeightDtype = Literal["bf16", "fp32", "int8", "int4"]
ActivationDtype = Literal["bf16", "int8"]
BackwardDtype = Literal["bf16", "int8"]
LoRALayout = Literal["fused", "split"]
ActivationPolicy = Literal["retain", "recompute", "auto"]
GroupSize = Literal[32, 64, 128]


@dataclass(frozen=True)
class ExpertsOptions:
    """Everything a layer's experts backend is constructed with, besides the layer's shape.

    ``lora_alpha`` is always the number (``KTConfig`` resolves "unset" to ``lora_rank``); the
    scaling is ``lora_alpha / lora_rank``. ``tp=None`` is one slice per NUMA node.
    ``activation_policy="auto"`` is kt-sft's: the backend starts with ``retain`` and
    :class:`~kt_sft.routed_experts.RoutedExperts` chooses per forward.
    """

    backend: BackendKind = "engine"
    activation: str = "silu"
    lora_rank: int = 0
    lora_alpha: float = 1.0
    lora_layout: LoRALayout = "fused"
    weight_dtype: WeightDtype = "bf16"
    group_size: GroupSize = 128
    activation_dtype: ActivationDtype = "bf16"
    backward_dtype: BackwardDtype = "bf16"
    activation_policy: ActivationPolicy = "retain"
    max_tokens: int = 4096
    max_cache_depth: int = 1
    num_threads: int | None = None
    isa: str | None = None
    tp: int | None = 1
    # activation variants (kt_kernels.MoEEngine's activation_*; defaults: plain `activation`)
    activation_alpha: float = 1.0
    activation_limit: float | None = None
    activation_up_offset: float = 0.0
    activation_gate_softcap: float | None = None
    activation_up_softcap: float | None = None

    def __post_init__(self) -> None:
        for name, kind in (
            ("backend", BackendKind),
            ("lora_layout", LoRALayout),
            ("weight_dtype", WeightDtype),
            ("group_size", GroupSize),
            ("activation_dtype", ActivationDtype),
            ("backward_dtype", BackwardDtype),
            ("activation_policy", ActivationPolicy),
        ):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(
                    f"ExpertsOptions.{name} must be one of {get_args(kind)}, "
                    f"got {getattr(self, name)!r}"
                )

    @classmethod
    def from_config(
        cls,
        cfg: KTConfig,
        *,
        activation: str = "silu",
        lora_layout: LoRALayout | None = None,
        activation_options: dict[str, Any] | None = None,
    ) -> ExpertsOptions:
        """The options of a layer of a model wrapped with ``cfg``; ``lora_layout`` is the
        layer's (``cfg.lora_layout`` unless that is ``"auto"``, which needs the layer's
        choice); ``activation_options``: the layer's ``activation_alpha`` / ``_limit`` /
        ``_up_offset`` / ``_gate_softcap`` / ``_up_softcap`` (kt_models.gating)."""
        layout = lora_layout if lora_layout is not None else cfg.lora_layout
        if layout == "auto":
            layout = "fused"
        return cls(
            backend=cfg.backend,  # type: ignore[arg-type]
            activation=activation,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_layout=layout,  # type: ignore[arg-type]
            weight_dtype=cfg.weight_dtype,  # type: ignore[arg-type]
            group_size=cfg.group_size,  # type: ignore[arg-type]
            activation_dtype=cfg.activation_dtype,  # type: ignore[arg-type]
            backward_dtype=cfg.backward_dtype,  # type: ignore[arg-type]
            activation_policy=cfg.activation_policy,  # type: ignore[arg-type]
            max_tokens=cfg.max_tokens,
            max_cache_depth=cfg.max_cache_depth,
            num_threads=cfg.num_threads,
            isa=cfg.isa,
            tp=cfg.tp if cfg.tp else None,
            **(activation_options or {}),
        )

    def replace(self, **changes: Any) -> ExpertsOptions:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``kt_kernels.MoEEngine(E, K, H, I, **kwargs)``."""
        return {
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_layout": self.lora_layout,
            "weight_dtype": self.weight_dtype,
            "group_size": self.group_size,
            "activation_dtype": self.activation_dtype,
            "backward_dtype": self.backward_dtype,
            "activation_policy": (
                "retain" if self.activation_policy == "auto" else self.activation_policy
            ),
            "activation": self.activation,
            "activation_alpha": self.activation_alpha,
            "activation_limit": self.activation_limit,
            "activation_up_offset": self.activation_up_offset,
            "activation_gate_softcap": self.activation_gate_softcap,
            "activation_up_softcap": self.activation_up_softcap,
            "max_tokens": self.max_tokens,
            "max_cache_depth": self.max_cache_depth,
            "num_threads": self.num_threads,
            "isa": self.isa,
            "tp": self.tp,
        }
