"""The MoE architecture registry: one :class:`ArchSpec` per transformers ``model_type``.

An entry says where an architecture keeps its decoder layers, which layers are MoE, where the
sparse block, router, routed experts and shared experts sit, how the experts are stored, which
config fields hold E, K, H and I, and how the routed experts are named on disk. kt-sft reads
nothing about an architecture from anywhere else, so adding an architecture is adding one entry
(:func:`register_arch`) plus its tiny test model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from kt_models.config_fields import (
    ACTIVATION_FIELDS,
    HIDDEN_SIZE_FIELDS,
    MOE_INTERMEDIATE_SIZE_FIELDS,
    NUM_EXPERTS_FIELDS,
    NUM_LAYERS_FIELDS,
    TOP_K_FIELDS,
    config_model_type,
    get_field,
    read_field,
    text_config,
)
from kt_models.errors import ModulePathError, UnsupportedArchitectureError
from kt_models.navigate import resolve_path, unwrap_model

__all__ = [
    "PROJECTIONS",
    "ArchSpec",
    "DiscoveredExperts",
    "MoELayerRule",
    "after_first_k_dense",
    "every_layer",
    "get_arch_spec",
    "refused_model_types",
    "register_arch",
    "sparse_step",
    "supported_model_types",
    "unregister_arch",
]

#: The three expert projections, in the order ``proj_names`` lists their names.
PROJECTIONS: tuple[str, str, str] = ("gate", "up", "down")

#: Decides whether decoder layer ``layer_idx`` (of ``num_layers``) has routed experts, given the
#: language model's config.
MoELayerRule = Callable[[Any, int, int], bool]


def every_layer(config: Any, layer_idx: int, num_layers: int) -> bool:
    """Every decoder layer is MoE (Mixtral, OLMoE)."""
    return True


def after_first_k_dense(config: Any, layer_idx: int, num_layers: int) -> bool:
    """Layers ``>= first_k_dense_replace`` are MoE, the first ones dense (DeepSeek, GLM-4-MoE)."""
    first_k = get_field(config, ("first_k_dense_replace",), 0) or 0
    return layer_idx >= int(first_k)


def sparse_step(config: Any, layer_idx: int, num_layers: int) -> bool:
    """Qwen-MoE rule: not in ``mlp_only_layers`` and ``(layer_idx + 1) % decoder_sparse_step == 0``."""
    mlp_only = get_field(config, ("mlp_only_layers",), ()) or ()
    step = int(get_field(config, ("decoder_sparse_step",), 1) or 1)
    num_experts = get_field(config, NUM_EXPERTS_FIELDS, 0) or 0
    return layer_idx not in mlp_only and num_experts > 0 and (layer_idx + 1) % step == 0


def _text_model_type(config: Any) -> str | None:
    return config_model_type(text_config(config))


@dataclass(frozen=True)
class DiscoveredExperts:
    """What :func:`kt_models.discover.discover_arch_spec` read from a model's experts modules."""

    #: Indices of the decoder layers that hold an experts module.
    layer_indices: tuple[int, ...]
    #: E, H and I, from the parameter shapes.
    num_experts: int
    hidden_size: int
    intermediate_size: int
    #: ``ACT2FN`` name of the experts' activation.
    activation: str
    #: The experts class name and the module defining it.
    experts_class: str
    experts_module: str = ""
    #: The router's (or MoE block's) ``top_k`` attribute, when it has one.
    top_k: int | None = None


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture keeps its MoE parts, and how its config and checkpoint name them.

    Paths are relative to the causal-LM module (PEFT wrappers are looked through). Attribute names
    (``moe_block_attr`` ...) are relative to a decoder layer / to the MoE block.
    """

    #: transformers ``model_type`` (the top-level one for vision-language models).
    model_type: str
    #: Dotted path from the causal LM to the ``nn.ModuleList`` of decoder layers.
    layers_path: str = "model.layers"
    #: Attribute of a decoder layer holding the sparse MoE block.
    moe_block_attr: str = "mlp"
    #: Attribute of the MoE block holding the routed experts.
    experts_attr: str = "experts"
    #: Attribute of the MoE block holding the router.
    router_attr: str = "gate"
    #: How the router picks experts: ``"softmax_topk"`` (softmax, top-k, optional renormalisation),
    #: ``"topk_softmax"`` (top-k logits, then softmax over them) or ``"sigmoid_group_topk"``
    #: (sigmoid scores + correction bias, group-limited top-k, routed scaling factor).
    router_kind: str = "softmax_topk"
    #: Attribute of the MoE block holding the shared expert(s), ``None`` when there are none.
    shared_experts_attr: str | None = None
    #: Attribute of the MoE block holding the shared expert's sigmoid gate, if any.
    shared_expert_gate_attr: str | None = None
    #: ``"fused"``: transformers 5 experts module with 3-D ``gate_up_proj``/``down_proj``;
    #: ``"modulelist"``: an ``nn.ModuleList`` of per-expert MLPs (remote-code models).
    expert_storage: Literal["fused", "modulelist"] = "fused"
    #: In-memory names of the gate, up and down projections of a ModuleList expert.
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    #: transformers class name of the experts module (used to keep experts on ``meta`` while
    #: loading; ``None`` when the architecture is not a transformers built-in).
    experts_class: str | None = None
    #: Which decoder layers are MoE.
    moe_layers: MoELayerRule = every_layer
    #: Config fields (aliases, tried in order) for E, K, H, I, the activation and the layer count.
    num_experts_fields: tuple[str, ...] = NUM_EXPERTS_FIELDS
    top_k_fields: tuple[str, ...] = TOP_K_FIELDS
    hidden_size_fields: tuple[str, ...] = HIDDEN_SIZE_FIELDS
    intermediate_size_fields: tuple[str, ...] = MOE_INTERMEDIATE_SIZE_FIELDS
    activation_fields: tuple[str, ...] = ACTIVATION_FIELDS
    num_layers_fields: tuple[str, ...] = NUM_LAYERS_FIELDS
    #: Activation assumed when the config names none.
    default_activation: str = "silu"
    #: On-disk prefix of the decoder layers (``"model.layers"``).
    checkpoint_layers_prefix: str = "model.layers"
    #: On-disk name of the MoE block inside a layer (``None``: same as ``moe_block_attr``).
    checkpoint_moe_attr: str | None = None
    #: On-disk names of gate, up and down in per-expert keys (``None``: same as ``proj_names``).
    checkpoint_proj_names: tuple[str, str, str] | None = None
    #: Whether fused on-disk expert tensors may be stored transposed (``E x H x 2I`` /
    #: ``E x I x H``, as Qwen3-VL-MoE hub checkpoints are); detected by shape, the in-memory
    #: layout winning when both fit (as transformers decides).
    checkpoint_fused_transposed: bool = False
    #: On-disk names of fused expert tensors relative to ``"{checkpoint_layers_prefix}.{i}."``
    #: when they are not ``"<moe block>.experts.gate_up_proj"`` / ``"...down_proj"``
    #: (``("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight")``).
    checkpoint_fused_names: tuple[str, str] | None = None
    #: Free-form remarks shown in the docs table.
    notes: str = field(default="", compare=False)
    #: Set on specs discovered from a model (not registered): the module tree's MoE layers and
    #: the experts' shapes and activation, which then win over the config fields.
    discovered: DiscoveredExperts | None = None

    # ---- config ------------------------------------------------------------------------------

    def num_layers(self, config: Any) -> int:
        """Number of decoder layers."""
        return read_field(config, self.num_layers_fields, what="number of decoder layers")

    def num_experts(self, config: Any) -> int:
        """E, routed experts per MoE layer."""
        if self.discovered is not None:
            return self.discovered.num_experts
        return read_field(config, self.num_experts_fields, what="number of routed experts")

    def top_k(self, config: Any) -> int:
        """K, experts chosen per token (a discovered spec falls back to the router's
        ``top_k`` attribute when the config has none of the fields)."""
        if self.discovered is not None and self.discovered.top_k is not None:
            from kt_models.config_fields import has_field

            if not has_field(config, self.top_k_fields):
                return self.discovered.top_k
        return read_field(config, self.top_k_fields, what="number of experts per token (top-k)")

    def hidden_size(self, config: Any) -> int:
        """H, the model width."""
        if self.discovered is not None:
            return self.discovered.hidden_size
        return read_field(config, self.hidden_size_fields, what="hidden size")

    def intermediate_size(self, config: Any) -> int:
        """I, the intermediate size of one routed expert."""
        if self.discovered is not None:
            return self.discovered.intermediate_size
        return read_field(
            config, self.intermediate_size_fields, what="routed expert intermediate size"
        )

    def activation(self, config: Any) -> str:
        """Name of the gate activation (``"silu"`` for SwiGLU)."""
        if self.discovered is not None:
            return self.discovered.activation
        value = get_field(config, self.activation_fields, None)
        return str(value) if value is not None else self.default_activation

    def moe_layer_indices(self, config: Any) -> list[int]:
        """Indices of the decoder layers that have routed experts."""
        if self.discovered is not None:
            return list(self.discovered.layer_indices)
        cfg = text_config(config)
        num_layers = self.num_layers(cfg)
        self.num_experts(cfg)  # a config without expert fields is an error, not "no MoE layers"
        return [i for i in range(num_layers) if self.moe_layers(cfg, i, num_layers)]

    # ---- module tree -------------------------------------------------------------------------

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model`` (a causal LM, possibly PEFT-wrapped)."""
        layers = resolve_path(unwrap_model(model), self.layers_path)
        if not isinstance(layers, nn.ModuleList):
            raise ModulePathError(
                f"{self.model_type}: {self.layers_path!r} is a {type(layers).__name__}, "
                "expected an nn.ModuleList of decoder layers"
            )
        return layers

    def _layer(self, model: nn.Module, layer_idx: int) -> nn.Module:
        layers = self.decoder_layers(model)
        if not 0 <= layer_idx < len(layers):
            raise IndexError(
                f"{self.model_type}: layer {layer_idx} out of range "
                f"(the model has {len(layers)} decoder layers)"
            )
        return layers[layer_idx]

    def moe_block(self, model: nn.Module, layer_idx: int) -> nn.Module:
        """The sparse MoE block (router + experts + shared experts) of decoder layer ``layer_idx``."""
        block = resolve_path(self._layer(model, layer_idx), self.moe_block_attr)
        if not hasattr(block, self.experts_attr):
            config = getattr(unwrap_model(model), "config", None)
            moe = self.moe_layer_indices(config) if config is not None else "?"
            raise ModulePathError(
                f"{self.model_type}: decoder layer {layer_idx} has no routed experts "
                f"({type(block).__name__} at {self.moe_block_attr!r} has no "
                f"{self.experts_attr!r}); MoE layers are {moe}"
            )
        return block

    def experts(self, model: nn.Module, layer_idx: int) -> nn.Module:
        """The routed experts module of decoder layer ``layer_idx``."""
        return resolve_path(self.moe_block(model, layer_idx), self.experts_attr)

    def router(self, model: nn.Module, layer_idx: int) -> nn.Module:
        """The router (gate) module of decoder layer ``layer_idx``."""
        return resolve_path(self.moe_block(model, layer_idx), self.router_attr)

    def shared_experts(self, model: nn.Module, layer_idx: int) -> nn.Module | None:
        """The shared expert(s) of decoder layer ``layer_idx``, ``None`` if the arch has none."""
        if self.shared_experts_attr is None:
            return None
        return resolve_path(self.moe_block(model, layer_idx), self.shared_experts_attr)

    def shared_expert_gate(self, model: nn.Module, layer_idx: int) -> nn.Module | None:
        """The shared expert's gate of decoder layer ``layer_idx``, ``None`` if there is none."""
        if self.shared_expert_gate_attr is None:
            return None
        return resolve_path(self.moe_block(model, layer_idx), self.shared_expert_gate_attr)

    # ---- checkpoint names --------------------------------------------------------------------

    def _disk_moe_attr(self) -> str:
        return self.checkpoint_moe_attr or self.moe_block_attr

    def checkpoint_experts_prefix(self, layer_idx: int) -> str:
        """On-disk prefix of layer ``layer_idx``'s experts (``"model.layers.3.mlp.experts"``)."""
        return (
            f"{self.checkpoint_layers_prefix}.{layer_idx}."
            f"{self._disk_moe_attr()}.{self.experts_attr}"
        )

    def _proj_index(self, proj: str) -> int:
        names = (PROJECTIONS, self.proj_names, self.checkpoint_proj_names or self.proj_names)
        for candidates in names:
            if proj in candidates:
                return candidates.index(proj)
        raise ValueError(
            f"{self.model_type}: unknown projection {proj!r}; use one of "
            f"{PROJECTIONS} or {self.proj_names}"
        )

    def checkpoint_expert_key(self, layer_idx: int, expert_idx: int, proj: str) -> str:
        """On-disk key of one expert's projection weight in the per-expert layout.

        ``proj`` is ``"gate"``, ``"up"`` or ``"down"`` (or an in-memory/on-disk projection name).
        Example: ``"model.layers.3.mlp.experts.5.gate_proj.weight"``.
        """
        disk_names = self.checkpoint_proj_names or self.proj_names
        name = disk_names[self._proj_index(proj)]
        return f"{self.checkpoint_experts_prefix(layer_idx)}.{expert_idx}.{name}.weight"

    def checkpoint_fused_key(self, layer_idx: int, which: Literal["gate_up", "down"]) -> str:
        """On-disk key of a fused expert tensor (``"...experts.gate_up_proj"``/``"...down_proj"``)."""
        if which not in ("gate_up", "down"):
            raise ValueError(f"which must be 'gate_up' or 'down', got {which!r}")
        if self.checkpoint_fused_names is not None:
            name = self.checkpoint_fused_names[0 if which == "gate_up" else 1]
            return f"{self.checkpoint_layers_prefix}.{layer_idx}.{name}"
        return f"{self.checkpoint_experts_prefix(layer_idx)}.{which}_proj"


# ---- the registry ------------------------------------------------------------------------------

_LOCK = threading.Lock()
_REGISTRY: dict[str, ArchSpec] = {}
# Types refused by name (what discovery cannot tell from the module); none at present.
_REFUSED: dict[str, str] = {}


def _validate(spec: ArchSpec) -> None:
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"register_arch expects an ArchSpec, got {type(spec).__name__}")
    if not spec.model_type or not isinstance(spec.model_type, str):
        raise ValueError("ArchSpec.model_type must be a non-empty string")
    if spec.expert_storage not in ("fused", "modulelist"):
        raise ValueError(
            f"{spec.model_type}: expert_storage must be 'fused' or 'modulelist', "
            f"got {spec.expert_storage!r}"
        )
    for name in ("proj_names", "checkpoint_proj_names"):
        value = getattr(spec, name)
        if value is not None and (
            len(value) != 3 or not all(isinstance(v, str) and v for v in value)
        ):
            raise ValueError(
                f"{spec.model_type}: {name} must be three names (gate, up, down), got {value!r}"
            )
    for name in (
        "layers_path",
        "moe_block_attr",
        "experts_attr",
        "router_attr",
        "checkpoint_layers_prefix",
    ):
        if not getattr(spec, name):
            raise ValueError(f"{spec.model_type}: {name} must be non-empty")
    for name in (
        "num_experts_fields",
        "top_k_fields",
        "hidden_size_fields",
        "intermediate_size_fields",
        "num_layers_fields",
    ):
        if not getattr(spec, name):
            raise ValueError(f"{spec.model_type}: {name} must list at least one config field")
    if not callable(spec.moe_layers):
        raise ValueError(f"{spec.model_type}: moe_layers must be callable")
    if spec.router_kind not in ("softmax_topk", "topk_softmax", "sigmoid_group_topk"):
        raise ValueError(f"{spec.model_type}: unknown router_kind {spec.router_kind!r}")


def register_arch(spec: ArchSpec, *, overwrite: bool = False) -> ArchSpec:
    """Add ``spec`` to the registry (validated first: an invalid spec registers nothing).

    Raises:
        ValueError: the spec is invalid, or ``spec.model_type`` is already registered and
            ``overwrite`` is false.
    """
    _validate(spec)
    with _LOCK:
        if spec.model_type in _REGISTRY and not overwrite:
            raise ValueError(
                f"model_type {spec.model_type!r} is already registered; pass "
                "overwrite=True to replace it"
            )
        _REGISTRY[spec.model_type] = spec
        _REFUSED.pop(spec.model_type, None)
    return spec


def unregister_arch(model_type: str) -> ArchSpec:
    """Remove and return the entry for ``model_type`` (``KeyError`` when there is none)."""
    with _LOCK:
        return _REGISTRY.pop(model_type)


def supported_model_types() -> list[str]:
    """Registered model types, sorted."""
    with _LOCK:
        return sorted(_REGISTRY)


def refused_model_types() -> dict[str, str]:
    """Known model types kt refuses, with the reason for each."""
    with _LOCK:
        return dict(_REFUSED)


def _model_types_of(obj: Any) -> tuple[str, list[str]]:
    """(label for messages, candidate model types: top-level first, then the text config's)."""
    if isinstance(obj, str):
        return obj, [obj]
    if isinstance(obj, nn.Module):
        base = unwrap_model(obj)
        config = getattr(base, "config", None)
        if config is None:
            raise UnsupportedArchitectureError(
                f"{type(obj).__name__} has no .config; pass the model's config or model_type"
            )
        obj = config
    if not isinstance(obj, Mapping) and not hasattr(obj, "model_type"):
        raise TypeError(
            "get_arch_spec expects a model, a config, a config dict or a model_type "
            f"string, got {type(obj).__name__}"
        )
    candidates = []
    top = config_model_type(obj)
    if top:
        candidates.append(top)
    nested = _text_model_type(obj)
    if nested and nested not in candidates:
        candidates.append(nested)
    label = top or nested or "<none>"
    return label, candidates


_DISCOVERED_ATTR = "_kt_discovered_arch_spec"


def _discover(config_or_model: Any, candidates: list[str]) -> ArchSpec | None:
    """The spec discovered from the model's experts-interface modules (``None`` when the model
    type does not use the interface). A config, config dict or model type string is built on the
    ``meta`` device (no memory) to read its module tree."""
    from kt_models.discover import discover_arch_spec, experts_interface_model_types

    if isinstance(config_or_model, nn.Module):
        base = unwrap_model(config_or_model)
        cached = base.__dict__.get(_DISCOVERED_ATTR)
        if cached is not None:
            return cached
        from kt_models.discover import find_experts_modules

        if not find_experts_modules(base):
            return None
        spec = discover_arch_spec(base)
        base.__dict__[_DISCOVERED_ATTR] = spec
        return spec
    interface = set(experts_interface_model_types(causal_lm_only=False))
    if not any(t in interface for t in candidates):
        return None
    import torch
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_model, str):
        config = AutoConfig.for_model(config_or_model)
    elif isinstance(config_or_model, PretrainedConfig):
        config = config_or_model
    else:
        raw = dict(config_or_model) if isinstance(config_or_model, Mapping) else None
        if raw is None:
            return None
        model_type = raw.pop("model_type")
        config = AutoConfig.for_model(model_type, **raw)
    from kt_models.loading import _auto_class

    with torch.device("meta"):
        model = _auto_class(config).from_config(config)
    return discover_arch_spec(model)


def get_arch_spec(config_or_model: Any) -> ArchSpec:
    """The registry entry for a model, config, config dict or ``model_type`` string.

    The top-level ``model_type`` is looked up first, then that of the ``text_config`` (so a
    registered language model is found inside a vision-language config). A model type that is
    not registered but whose experts use transformers' experts interface is discovered from the
    module tree (:func:`kt_models.discover.discover_arch_spec`; a config is built on ``meta``).

    Raises:
        UnsupportedArchitectureError: no entry matches; the message lists the supported types and
            says how to register one, or gives the reason a known type is refused.
    """
    label, candidates = _model_types_of(config_or_model)
    registered = False
    with _LOCK:
        registered = any(t in _REGISTRY or t in _REFUSED for t in candidates)
    if not registered:
        spec = _discover(config_or_model, candidates)
        if spec is not None:
            return spec
    with _LOCK:
        for model_type in candidates:
            if model_type in _REGISTRY:
                return _REGISTRY[model_type]
        for model_type in candidates:
            if model_type in _REFUSED:
                reason = _REFUSED[model_type]
                raise UnsupportedArchitectureError(
                    f"model_type {model_type!r} is not supported by kt: {reason}",
                    model_type=model_type,
                    reason=reason,
                )
        supported = ", ".join(sorted(_REGISTRY)) or "(none)"
    raise UnsupportedArchitectureError(
        f"model_type {label!r} is not supported by kt-models. Supported model types: {supported}. "
        "To add an architecture whose routed experts are SwiGLU, describe it with "
        "kt_models.ArchSpec(model_type=..., layers_path=..., moe_block_attr=..., ...) and call "
        "kt_models.register_arch(spec) (see docs/models.md, 'Registering a new architecture').",
        model_type=label,
    )
