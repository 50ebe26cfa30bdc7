"""`KTConfig`: every kt-sft setting, validated in one place.

Precedence for each field: explicit argument > ``KT_*`` environment variable > built-in default.
A field left at ``None`` means "not set" and is filled from its environment variable (if any)
in ``__post_init__``, then from the default. Names used by existing KT / LLaMA-Factory configs
(``kt_backend="AMXBF16"``, ``kt_num_threads``, ``kt_lora_rank`` ...) are accepted by
:meth:`KTConfig.from_dict` and by the constructor's keyword form :func:`make_config`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENV_VARS", "KTConfig", "KTConfigError"]


class KTConfigError(ValueError):
    """A KTConfig setting is unknown or invalid; the message names the field."""


BACKENDS = ("engine", "torch")
WEIGHT_DTYPES = ("bf16", "fp32", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
ACTIVATION_DTYPES = ("bf16", "int8")
BACKWARD_DTYPES = ("bf16", "int8")
LORA_LAYOUTS = ("auto", "fused", "split")
ACTIVATION_POLICIES = ("retain", "recompute", "auto")

#: field -> environment variable that supplies its default.
ENV_VARS: dict[str, str] = {
    "backend": "KT_BACKEND",
    "isa": "KT_KERNELS_ISA",
    "num_threads": "KT_NUM_THREADS",
    "weight_dtype": "KT_WEIGHT_DTYPE",
    "group_size": "KT_GROUP_SIZE",
    "activation_dtype": "KT_ACTIVATION_DTYPE",
    "backward_dtype": "KT_BACKWARD_DTYPE",
    "max_tokens": "KT_MAX_TOKENS",
    "max_cache_depth": "KT_MAX_CACHE_DEPTH",
    "lora_rank": "KT_LORA_RANK",
    "lora_alpha": "KT_LORA_ALPHA",
    "lora_layout": "KT_LORA_LAYOUT",
    "checkpoint": "KT_CHECKPOINT",
    "tp": "KT_TP",
    "profile": "KT_PROFILE",
    "lora_experts": "KT_LORA_EXPERTS",
    "lora_expert_intermediate_size": "KT_LORA_EXPERT_INTERMEDIATE_SIZE",
    "num_gpu_experts": "KT_NUM_GPU_EXPERTS",
    "activation_policy": "KT_ACTIVATION_POLICY",
    "activation_memory_budget": "KT_ACTIVATION_MEMORY_BUDGET",
}

_DEFAULTS: dict[str, Any] = {
    "backend": "engine",
    "isa": None,
    "num_threads": None,
    "weight_dtype": "bf16",
    "group_size": 128,
    "activation_dtype": "bf16",
    "backward_dtype": "bf16",
    "max_tokens": 4096,
    "max_cache_depth": 2,
    "lora_rank": 8,
    "lora_alpha": None,
    "lora_layout": "auto",
    "checkpoint": None,
    "tp": 1,
    "profile": None,
    "lora_experts": 0,
    "lora_expert_intermediate_size": 64,
    "num_gpu_experts": 0,
    "activation_policy": "retain",
    "activation_memory_budget": None,
}

# Values of the original KT backend switch: kernel family -> (isa, weight dtype).
_KT_BACKEND_VALUES: dict[str, tuple[str | None, str]] = {
    "amxbf16": ("amx", "bf16"),
    "amxint8": ("amx", "int8"),
    "amxint4": ("amx", "int4"),
    "avx512bf16": ("avx512_bf16", "bf16"),
    "avx512": ("avx512", "bf16"),
    "avx2": ("avx2", "bf16"),
    "scalar": ("scalar", "bf16"),
    "auto": (None, "bf16"),
    "llamafile": (None, "bf16"),
}

# kt_-prefixed (and other legacy) names whose kt-sft name differs from dropping the prefix.
_ALIASES: dict[str, str] = {
    "kt_weight_path": "checkpoint",
    "kt_checkpoint_path": "checkpoint",
    "kt_threadpool_count": "tp",
    "kt_tp_size": "tp",
    "kt_lora_expert_num": "lora_experts",
    "kt_num_lora_experts": "lora_experts",
    "kt_lora_expert_size": "lora_expert_intermediate_size",
    "kt_num_cpu_threads": "num_threads",
    "kt_cpuinfer": "num_threads",
    "kt_max_seq_len": "max_tokens",
    "kt_profile_path": "profile",
}


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on", "y"}:
        return True
    if text in {"0", "false", "no", "off", "n", ""}:
        return False
    raise KTConfigError(f"{name} must be a boolean, got {value!r}")


@dataclass(init=False)
class KTConfig:
    """Settings of kt's routed-expert engine and its PyTorch integration.

    Every field defaults to ``None`` ("not set"); ``__post_init__`` fills it from the ``KT_*``
    environment variable in :data:`ENV_VARS`, else from the built-in default, then validates.
    The constructor also takes the ``kt_``-prefixed / legacy names (``kt_num_threads=4``,
    ``kt_backend="AMXBF16"``); an unknown keyword raises :class:`KTConfigError` naming it.

    Attributes:
        backend: ``"engine"`` (the compiled kt-kernels engine) or ``"torch"`` (the fp32 PyTorch
            reference of the same operator: slow, exact, used by tests and as a fallback).
        isa: force a kernel ISA (``scalar|avx2|avx512|avx512_vnni|avx512_bf16|amx``); ``None`` picks the
            best one this CPU runs.
        num_threads: engine worker threads; ``None`` means one per physical core. More threads
            than cores is allowed but warned about.
        weight_dtype: packed dtype of the frozen expert weights (``bf16``, ``int8``, ``int4``;
            ``fp32`` only with the torch backend).
        group_size: inputs per scale of ``int4`` weights (32, 64 or 128; it must divide the
            hidden and intermediate sizes); ignored for other weight dtypes.
        activation_dtype: ``bf16``, or ``int8`` for W8A8 (with ``weight_dtype="int8"`` on the
            engine): forward quantizes x and h per row and runs int8 x int8 GEMMs; backward is
            the weight-only int8 one (see ``backward_dtype``).
        backward_dtype: ``bf16``, or ``int8`` (only with ``activation_dtype="int8"``): backward's
            dx products run int8 x int8 too, on gradient rows quantized per row after the
            weights' channel scales. Faster; adds about the forward's int8 rounding to dx, the
            routing-weight gradients and the gate/up LoRA gradients.
        max_tokens: tokens per MoE call the engine is sized for; longer calls grow the buffers.
        max_cache_depth: forwards that may await their backward per layer (gradient
            checkpointing / accumulation push and pop LIFO).
        lora_rank: LoRA rank the engine is built for; ``0`` freezes the experts (no expert LoRA).
            A PEFT adapter with a smaller rank works too (zero-padded).
        lora_alpha: LoRA alpha; ``None`` means ``lora_rank`` (scaling 1, PEFT's default at r=8).
        lora_layout: ``fused`` (one A shared by gate and up, as PEFT ``target_parameters``
            produces), ``split`` (per projection) or ``auto`` (fused for fused HF experts).
        checkpoint: checkpoint directory to stream expert weights from (``load_model``).
        tp: tensor-parallel slices of the engine's intermediate dim (one per NUMA node for
            ``0``).
        profile: path of a Chrome-trace JSON the engine writes per-phase timings to.
        lora_experts: extra always-active trainable SwiGLU experts per MoE layer (computed in
            torch, output averaged and added; down projection zero-initialised).
        lora_expert_intermediate_size: intermediate width of each LoRA expert.
        num_gpu_experts: the first N routed experts of each layer stay in torch on the model's
            device; the others run in the engine.
        activation_policy: what the engine keeps from a training forward for its backward:
            ``retain`` (the gate/up outputs: fastest, T·K·(8I + 8r) + 2TH bytes per pending
            layer), ``recompute`` (only the routing, 12TK bytes; backward recomputes the rest
            from the layer input, one more gate/up GEMM, gradients bit for bit the same) or
            ``auto`` (retain while the live engine cache plus the new entry fits
            ``activation_memory_budget``, else recompute). Gradient checkpointing already keeps
            at most one layer's activations.
        activation_memory_budget: GiB the retained activation caches of all layers may take
            under ``activation_policy="auto"``; ``None`` means half the memory available when
            the first training forward runs.
    """

    backend: str | None = None
    isa: str | None = None
    num_threads: int | None = None
    weight_dtype: str | None = None
    group_size: int | None = None
    activation_dtype: str | None = None
    backward_dtype: str | None = None
    max_tokens: int | None = None
    max_cache_depth: int | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_layout: str | None = None
    checkpoint: str | None = None
    tp: int | None = None
    profile: str | None = None
    lora_experts: int | None = None
    lora_expert_intermediate_size: int | None = None
    num_gpu_experts: int | None = None
    activation_policy: str | None = None
    activation_memory_budget: float | None = None
    _explicit: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __init__(
        self,
        backend: str | None = None,
        isa: str | None = None,
        num_threads: int | None = None,
        weight_dtype: str | None = None,
        group_size: int | None = None,
        activation_dtype: str | None = None,
        backward_dtype: str | None = None,
        max_tokens: int | None = None,
        max_cache_depth: int | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_layout: str | None = None,
        checkpoint: str | None = None,
        tp: int | None = None,
        profile: str | None = None,
        lora_experts: int | None = None,
        lora_expert_intermediate_size: int | None = None,
        num_gpu_experts: int | None = None,
        activation_policy: str | None = None,
        activation_memory_budget: float | None = None,
        **aliases: Any,
    ) -> None:
        values = dict(locals())
        del values["self"], values["aliases"]
        if aliases:
            for name, value in _normalise_keys(aliases).items():
                if values[name] is not None and values[name] != value:
                    raise KTConfigError(
                        f"KTConfig sets {name!r} twice ({values[name]!r} and "
                        f"{value!r} through an alias)"
                    )
                values[name] = value
        for name, value in values.items():
            setattr(self, name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        explicit = {name for name in _DEFAULTS if getattr(self, name) is not None}
        object.__setattr__(self, "_explicit", frozenset(explicit))
        for name, env in ENV_VARS.items():
            if getattr(self, name) is None:
                raw = os.environ.get(env)
                if raw is not None and raw.strip() != "":
                    setattr(self, name, _coerce(name, raw.strip(), source=env))
                else:
                    setattr(self, name, _DEFAULTS[name])
            else:
                setattr(self, name, _coerce(name, getattr(self, name), source=name))
        if self.lora_alpha is None:
            self.lora_alpha = float(max(self.lora_rank, 1))
        self._validate()

    # -- validation -----------------------------------------------------------------------
    def _validate(self) -> None:
        _choice("backend", self.backend, BACKENDS)
        if self.isa is not None:
            from kt_sft._lib import kt_kernels

            _choice("isa", self.isa, kt_kernels.ISAS)
        _choice("weight_dtype", self.weight_dtype, WEIGHT_DTYPES)
        _choice("group_size", self.group_size, GROUP_SIZES)
        _choice("activation_dtype", self.activation_dtype, ACTIVATION_DTYPES)
        if self.activation_dtype == "int8" and (
            self.weight_dtype != "int8" or self.backend != "engine"
        ):
            raise KTConfigError(
                "activation_dtype='int8' (W8A8) needs weight_dtype='int8' and backend='engine'; "
                f"got weight_dtype={self.weight_dtype!r}, backend={self.backend!r}"
            )
        _choice("backward_dtype", self.backward_dtype, BACKWARD_DTYPES)
        if self.backward_dtype == "int8" and self.activation_dtype != "int8":
            raise KTConfigError(
                "backward_dtype='int8' (int8 dx products) needs activation_dtype='int8' (W8A8); "
                f"got activation_dtype={self.activation_dtype!r}"
            )
        _choice("lora_layout", self.lora_layout, LORA_LAYOUTS)
        _choice("activation_policy", self.activation_policy, ACTIVATION_POLICIES)
        budget = self.activation_memory_budget
        if budget is not None and not budget > 0:
            raise KTConfigError(f"activation_memory_budget must be > 0 (GiB), got {budget}")
        if self.weight_dtype == "fp32" and self.backend == "engine":
            raise KTConfigError(
                "weight_dtype='fp32' is only available with backend='torch'; the "
                "engine packs bf16, int8 or int4"
            )
        for name in ("max_tokens", "max_cache_depth"):
            if getattr(self, name) < 1:
                raise KTConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lora_rank", "lora_experts", "num_gpu_experts", "tp"):
            if getattr(self, name) < 0:
                raise KTConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lora_expert_intermediate_size < 1:
            raise KTConfigError(
                "lora_expert_intermediate_size must be >= 1, got "
                f"{self.lora_expert_intermediate_size}"
            )
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise KTConfigError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if self.num_threads is not None:
            if self.num_threads < 1:
                raise KTConfigError(f"num_threads must be >= 1, got {self.num_threads}")
            cores = _physical_cores()
            if cores is not None and self.num_threads > cores:
                warnings.warn(
                    f"KTConfig.num_threads={self.num_threads} is larger than the {cores} physical "
                    "cores this process may use; the engine's threads will compete for cores "
                    "(set num_threads / KT_NUM_THREADS to at most the core count)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    # -- conversions ----------------------------------------------------------------------
    @property
    def lora_scaling(self) -> float:
        """``lora_alpha / lora_rank`` (0 when the experts carry no LoRA)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def activation_budget_bytes(self) -> float:
        """The ``auto`` policy's budget in bytes (see ``activation_memory_budget``)."""
        if self.activation_memory_budget is not None:
            return self.activation_memory_budget * 1024**3
        from kt_sft.estimate import default_activation_budget

        return default_activation_budget()

    def is_explicit(self, name: str) -> bool:
        """Whether ``name`` was given explicitly (not taken from the environment or default)."""
        return name in self._explicit

    def replace(self, **changes: Any) -> KTConfig:
        """A copy with ``changes`` applied (accepts the same names as :meth:`from_dict`)."""
        data = self.to_dict()
        data.update(_normalise_keys(changes))
        return KTConfig(**data)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (kt-sft names)."""
        return {name: getattr(self, name) for name in _DEFAULTS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, **kwargs: Any) -> KTConfig:
        """Build from a mapping that may use ``kt_``-prefixed names; unknown keys are an error.

        ``kt_backend`` takes the original KT kernel names (``AMXBF16``, ``AMXInt8``,
        ``AMXInt4``, ``AVX512``, ``AVX2``, ...) and sets ``isa`` and ``weight_dtype``.
        """
        merged: dict[str, Any] = dict(data or {})
        merged.update(kwargs)
        return cls(**_normalise_keys(merged))


def _normalise_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    names = set(_DEFAULTS)
    out: dict[str, Any] = {}
    derived: dict[str, Any] = {}  # implied by another key; explicit keys win
    for key, value in data.items():
        if not isinstance(key, str):
            raise KTConfigError(f"KTConfig keys must be strings, got {key!r}")
        lowered = key.lower()
        if lowered in ("kt_backend", "kt_kernel"):
            if str(value).strip().lower() in BACKENDS:  # kt-sft's own switch: engine | torch
                out["backend"] = str(value).strip().lower()
                continue
            isa, dtype = _kt_backend(value)
            if isa is not None:
                derived["isa"] = isa
            derived["weight_dtype"] = dtype
            continue
        if lowered in ("use_kt", "kt_enabled", "kt_use_lora_experts"):
            if lowered == "kt_use_lora_experts" and _parse_bool(key, value):
                derived["lora_experts"] = 1
            continue
        if lowered == "kt_tp_enabled":
            if not _parse_bool(key, value):
                derived["tp"] = 1
            continue
        target = _ALIASES.get(lowered)
        if target is None:
            if lowered in names:
                target = lowered
            elif lowered.startswith("kt_") and lowered[3:] in names:
                target = lowered[3:]
        if target is None:
            raise KTConfigError(
                f"unknown KTConfig key {key!r}; known keys: {', '.join(sorted(names))} "
                "(each also accepted with a 'kt_' prefix)"
            )
        if target in out and out[target] != value:
            raise KTConfigError(
                f"KTConfig key {key!r} sets {target!r} a second time ({out[target]!r} vs {value!r})"
            )
        out[target] = value
    for name, value in derived.items():
        out.setdefault(name, value)
    return out


def _kt_backend(value: Any) -> tuple[str | None, str]:
    text = str(value).strip().lower().replace("_", "").replace("-", "")
    if text not in _KT_BACKEND_VALUES:
        raise KTConfigError(
            f"kt_backend={value!r} is not a known kernel backend; use one of AMXBF16, AMXInt8, "
            "AMXInt4, AVX512BF16, AVX512, AVX2, scalar, auto"
        )
    return _KT_BACKEND_VALUES[text]


_INT_FIELDS = {
    "num_threads",
    "group_size",
    "max_tokens",
    "max_cache_depth",
    "lora_rank",
    "tp",
    "lora_experts",
    "lora_expert_intermediate_size",
    "num_gpu_experts",
}
_FLOAT_FIELDS = {"lora_alpha", "activation_memory_budget"}
_LOWER_FIELDS = {
    "backend",
    "isa",
    "weight_dtype",
    "activation_dtype",
    "backward_dtype",
    "lora_layout",
    "activation_policy",
}


def _coerce(name: str, value: Any, *, source: str) -> Any:
    if value is None:
        return None
    if name in _INT_FIELDS:
        if isinstance(value, bool):
            raise KTConfigError(f"{name} must be an integer, got {value!r} (from {source})")
        try:
            number = int(value)
        except (TypeError, ValueError) as exc:
            raise KTConfigError(
                f"{name} must be an integer, got {value!r} (from {source})"
            ) from exc
        if isinstance(value, float) and number != value:
            raise KTConfigError(f"{name} must be an integer, got {value!r} (from {source})")
        return number
    if name in _FLOAT_FIELDS:
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise KTConfigError(f"{name} must be a number, got {value!r} (from {source})") from exc
    if name in _LOWER_FIELDS:
        if not isinstance(value, str):
            raise KTConfigError(f"{name} must be a string, got {value!r} (from {source})")
        text = value.strip().lower()
        if name == "weight_dtype":
            text = {"bfloat16": "bf16", "float32": "fp32", "f32": "fp32"}.get(text, text)
        if name == "isa" and text in ("", "auto"):
            return None
        return text
    if name in ("checkpoint", "profile"):
        return os.fspath(value)
    return value


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise KTConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _physical_cores() -> int | None:
    """Physical cores as the engine counts them (its default thread count); logical CPUs when
    the engine is not installed."""
    try:
        from kt_sft._lib import kt_kernels
    except ImportError:  # pragma: no cover - only without a working engine install
        return os.cpu_count()
    return kt_kernels.physical_core_count()
