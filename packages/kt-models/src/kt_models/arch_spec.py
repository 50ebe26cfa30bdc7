"""What one MoE architecture looks like to kt: :class:`ArchSpec` and the MoE-layer rules.

An :class:`ArchSpec` says where an architecture keeps its decoder layers, which layers are MoE,
where the sparse block, router, routed experts and shared experts sit, how the experts are stored,
which config fields hold E, K, H and I, and how the routed experts are named on disk. Specs are
registered by :mod:`kt_models.registry` or read from a model by :mod:`kt_models.discover`; both
build on this module, which depends on neither.
"""

from __future__ import annotations

from collections.abc import Callable
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
    get_field,
    has_field,
    read_field,
    text_config,
)
from kt_models.errors import ModulePathError
from kt_models.navigate import resolve_path, unwrap_model

__all__ = [
    "PROJECTIONS",
    "ArchSpec",
    "DiscoveredExperts",
    "MoELayerRule",
    "after_first_k_dense",
    "every_layer",
    "sparse_step",
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
