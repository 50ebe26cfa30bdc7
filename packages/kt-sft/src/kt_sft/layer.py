"""`KTMoELayer`: the fallback for MoE blocks the experts-implementation hook cannot serve.

Remote-code models keep their routed experts as an ``nn.ModuleList`` of per-expert MLPs
(``gate_proj``/``up_proj``/``down_proj``) and loop over them in the block's forward, so there is
no experts call to intercept. :func:`replace_moe_block` packs those weights into an engine,
releases them, and replaces the block by a :class:`KTMoELayer` that keeps the block's children
under their names (router, experts list, shared experts: state-dict keys and PEFT targets stay
the same) and computes ``router -> engine (+ shared experts)``.

Per-projection LoRA (PEFT ``target_modules`` on ``experts.<e>.gate_proj`` ...) is bound with the
split engine layout: the per-expert LoRA matrices are moved into one contiguous ``E x r x in`` /
``E x out x r`` tensor per projection and PEFT's parameters become views into it, so the engine
reads and writes them without copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kt_sft.binding import LoRAFactor, LoRASource
from kt_sft.config import KTConfig
from kt_sft.function import kt_moe
from kt_sft.hf_experts import KTUnsupportedExpertsError, activation_of, release_parameter
from kt_sft.lora_experts import LoRAExperts
from kt_sft.routed_experts import RoutedExperts

__all__ = ["KTMoELayer", "bind_modulelist_lora", "replace_moe_block"]

RouterFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_KINDS = ("gate", "up", "down")


def select_experts(
    logits: torch.Tensor, top_k: int, kind: str = "softmax_topk", norm_topk_prob: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing from router logits ``T x E`` (for routers that return only logits).

    ``softmax_topk``: softmax over all experts, top-k, renormalised when ``norm_topk_prob``;
    ``topk_softmax``: top-k logits, softmax over them (Mixtral).
    """
    if kind == "softmax_topk":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif kind == "topk_softmax":
        top, ids = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(top, dim=-1, dtype=torch.float)
    else:
        raise ValueError(
            f"the router returns logits only and its kind {kind!r} needs more than "
            "logits (e.g. a correction bias); pass router_fn= to KTMoELayer"
        )
    return ids, weights.to(logits.dtype)


def parse_router_output(
    output: Any,
    num_tokens: int,
    top_k: int,
    *,
    kind: str = "softmax_topk",
    norm_topk_prob: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expert_ids, routing_weights)`` from a router's output.

    Accepts the common conventions: ``(logits, weights, ids)`` (transformers 5 routers),
    ``(ids, weights[, aux_loss])`` (DeepSeek remote code), ``(weights, ids)``: the integer
    ``T x K`` tensor is the ids, the floating ``T x K`` one the weights. A lone ``T x E``
    float tensor is taken as logits and routed with :func:`select_experts`.
    """
    if (
        isinstance(output, torch.Tensor)
        and output.is_floating_point()
        and output.dim() == 2
        and output.shape[0] == num_tokens
    ):
        return select_experts(output, top_k, kind, norm_topk_prob)
    tensors = [
        t
        for t in (output if isinstance(output, (tuple, list)) else (output,))
        if isinstance(t, torch.Tensor)
    ]
    shape = (num_tokens, top_k)
    ids = [t for t in tensors if not t.is_floating_point() and tuple(t.shape) == shape]
    weights = [t for t in tensors if t.is_floating_point() and tuple(t.shape) == shape]
    if len(ids) != 1 or len(weights) < 1:
        raise ValueError(
            f"cannot read expert ids and routing weights ({num_tokens} x {top_k}) from the "
            f"router's output {[tuple(t.shape) for t in tensors]}; pass router_fn= to "
            "KTMoELayer"
        )
    return ids[0], weights[-1]


class KTMoELayer(nn.Module):
    """A MoE block whose routed experts run in a kt engine.

    The original block's children are kept under their names. ``forward(hidden_states)``
    routes with the block's router (or ``router_fn``), runs the routed experts through
    :func:`kt_sft.function.kt_moe`, adds kt's LoRA experts and the shared experts (scaled by
    the sigmoid of the shared-expert gate when there is one) and returns the block's output.
    """

    def __init__(
        self,
        block: nn.Module,
        layer: RoutedExperts,
        *,
        experts_attr: str = "experts",
        router_attr: str = "gate",
        shared_experts_attr: str | None = None,
        shared_expert_gate_attr: str | None = None,
        proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
        router_fn: RouterFn | None = None,
        router_kind: str = "softmax_topk",
        norm_topk_prob: bool = False,
    ) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.experts_attr = experts_attr
        self.router_attr = router_attr
        self.shared_experts_attr = shared_experts_attr
        self.shared_expert_gate_attr = shared_expert_gate_attr
        self.proj_names = proj_names
        self.router_fn = router_fn
        self.router_kind = router_kind
        self.norm_topk_prob = norm_topk_prob
        self.original_class = type(block).__name__
        self.__dict__["_kt_engine"] = layer
        self.__dict__["_kt_stacks"] = None

    @property
    def routed_experts(self) -> RoutedExperts:
        """The routed experts this block runs in kt."""
        return self.__dict__["_kt_engine"]

    @property
    def kt_engine(self) -> RoutedExperts:
        """The former name of :attr:`routed_experts`."""
        return self.routed_experts

    def extra_repr(self) -> str:
        layer = self.routed_experts
        return (
            f"replaces={self.original_class}, experts={layer.num_experts}, "
            f"top_k={layer.top_k}, lora_layout={layer.lora_layout!r}"
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expert_ids T x K, routing_weights T x K)`` for ``x: T x H``."""
        if self.router_fn is not None:
            return self.router_fn(x)
        router = getattr(self, self.router_attr)
        return parse_router_output(
            router(x),
            x.shape[0],
            self.routed_experts.top_k,
            kind=self.router_kind,
            norm_topk_prob=self.norm_topk_prob,
        )

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids, weights = self.route(x)
        out = kt_moe(self.routed_experts, x, ids, weights, self.lora_source())
        lora_experts = getattr(self, "kt_lora_experts", None)
        if lora_experts is not None:
            out = out + lora_experts(x).to(out.dtype)
        if self.shared_experts_attr is not None:
            shared = getattr(self, self.shared_experts_attr)(x)
            if self.shared_expert_gate_attr is not None:
                gate = getattr(self, self.shared_expert_gate_attr)
                shared = torch.sigmoid(gate(x)) * shared
            out = out + shared.to(out.dtype)
        return out.reshape(shape).to(hidden_states.dtype)

    # -- LoRA -----------------------------------------------------------------------------
    def _lora_modules(self) -> dict[str, list[nn.Module]] | None:
        from peft.tuners.lora import LoraLayer

        experts = getattr(self, self.experts_attr)
        found: dict[str, list[nn.Module]] = {}
        for kind, pname in zip(_KINDS, self.proj_names):
            mods = [getattr(expert, pname, None) for expert in experts]
            wrapped = [isinstance(m, LoraLayer) for m in mods]
            if not any(wrapped):
                continue
            if not all(wrapped):
                raise ValueError(
                    f"{self.routed_experts.name}: LoRA targets {pname} of only "
                    f"{sum(wrapped)}/{len(mods)} experts; kt needs all experts of a layer "
                    "targeted alike"
                )
            found[kind] = mods  # type: ignore[assignment]
        return found or None

    def lora_source(self) -> LoRASource | None:
        """The per-projection LoRA of this layer's experts (re-homed on first use)."""
        try:
            mods = self._lora_modules()
        except ImportError:
            return None
        if mods is None:
            return None
        first = next(iter(mods.values()))[0]
        if first.disable_adapters or first.merged:
            return None
        active = [a for a in first.active_adapters if a in first.lora_A]
        if not active:
            return None
        if len(active) > 1:
            raise ValueError(
                f"{self.routed_experts.name}: {len(active)} active adapters on kt "
                "experts; kt runs one active adapter at a time"
            )
        adapter = active[0]
        key = (
            adapter,
            tuple(
                (
                    k,
                    tuple(id(m.lora_A[adapter].weight) for m in v),
                    tuple(id(m.lora_B[adapter].weight) for m in v),
                )
                for k, v in mods.items()
            ),
        )
        stacks = self.__dict__["_kt_stacks"]
        if stacks is None or stacks[0] != key or not _still_views(stacks[1]):
            stacks = (key, self._rehome(mods, adapter))
            self.__dict__["_kt_stacks"] = stacks
        return stacks[1]

    def _rehome(self, mods: dict[str, list[nn.Module]], adapter: str) -> LoRASource:
        ranks = {int(m.r[adapter]) for v in mods.values() for m in v}
        scalings = {float(m.scaling[adapter]) for v in mods.values() for m in v}
        if len(ranks) != 1 or len(scalings) != 1:
            raise ValueError(
                f"{self.routed_experts.name}: expert LoRA ranks {sorted(ranks)} / "
                f"scalings {sorted(scalings)} differ; kt needs one per layer"
            )
        kinds: dict[str, tuple[LoRAFactor, LoRAFactor]] = {}
        for kind, v in mods.items():
            factors = []
            for which in ("lora_A", "lora_B"):
                params = [getattr(m, which)[adapter].weight for m in v]
                stack = torch.stack([p.detach() for p in params])
                with torch.no_grad():
                    for e, p in enumerate(params):
                        p.data = stack[e]
                factors.append(LoRAFactor(stack, _identity, tuple(params)))
            kinds[kind] = (factors[0], factors[1])
        return LoRASource(
            "split", ranks.pop(), scalings.pop(), kinds, key=("peft-modulelist", id(self), adapter)
        )

    def lora_parameters(self) -> list[nn.Parameter]:
        """The per-expert LoRA parameters bound to the engine (empty without PEFT)."""
        source = self.lora_source()
        return list(source.params()) if source is not None else []  # type: ignore[arg-type]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _still_views(source: LoRASource) -> bool:
    for a, b in source.kinds.values():
        for factor in (a, b):
            assert factor.members is not None
            base = factor.param.untyped_storage().data_ptr()
            if any(m.untyped_storage().data_ptr() != base for m in factor.members):
                return False
    return True


def _release_linear(linear: nn.Module, device: torch.device) -> None:
    release_parameter(linear, "weight", device)


def replace_moe_block(
    model: nn.Module,
    spec: Any,
    layer_idx: int,
    cfg: KTConfig,
    *,
    reader: Any = None,
    device: torch.device,
) -> RoutedExperts:
    """Pack layer ``layer_idx``'s ModuleList experts into an engine and swap in a KTMoELayer."""
    from kt_models import (
        extract_expert_weights,
        get_field,
        resolve_path,
        text_config,
        unwrap_model,
    )
    from kt_models.extract import base_layer

    base = unwrap_model(model)
    config = text_config(base.config)
    name = f"{spec.model_type} layer {layer_idx} experts (ModuleList)"
    if cfg.num_gpu_experts:
        raise KTUnsupportedExpertsError(
            f"{name}: num_gpu_experts is implemented for fused (transformers 5) experts only"
        )
    block = spec.moe_block(base, layer_idx)
    experts = base_layer(spec.experts(base, layer_idx))
    activation = activation_of(experts[0], spec.activation(config))
    if reader is not None:
        weights = reader.layer_experts(layer_idx, dtype=None)
    else:
        weights = extract_expert_weights(base, layer_idx, release=False, spec=spec)
    gate_up, down = weights.fused()
    num_experts, hidden, inter = down.shape
    lora_layout = "split" if cfg.lora_layout == "auto" else cfg.lora_layout
    layer = RoutedExperts(
        cfg,
        num_experts=num_experts,
        top_k=spec.top_k(config),
        hidden_size=hidden,
        intermediate_size=inter,
        activation=activation,
        lora_layout=lora_layout,
        name=name,
        layer_idx=layer_idx,
    )
    layer.load_weights(gate_up, down)
    dtype = down.dtype
    del weights, gate_up, down
    for expert in experts:
        for pname in spec.proj_names:
            _release_linear(base_layer(getattr(expert, pname)), device)
    new = KTMoELayer(
        block,
        layer,
        experts_attr=spec.experts_attr,
        router_attr=spec.router_attr,
        shared_experts_attr=spec.shared_experts_attr,
        shared_expert_gate_attr=spec.shared_expert_gate_attr,
        proj_names=spec.proj_names,
        router_kind=spec.router_kind,
        norm_topk_prob=bool(get_field(config, ("norm_topk_prob",), False)),
    )
    if cfg.lora_experts:
        new.kt_lora_experts = LoRAExperts(
            cfg.lora_experts,
            hidden,
            cfg.lora_expert_intermediate_size,
            activation=activation,
            dtype=dtype,
            device=device,
        )
    parent_path, _, attr = f"{spec.layers_path}.{layer_idx}.{spec.moe_block_attr}".rpartition(".")
    setattr(resolve_path(base, parent_path), attr, new)
    return layer


def bind_modulelist_lora(model: nn.Module) -> None:
    """Bind every KTMoELayer's per-projection PEFT LoRA to its engine now."""
    for module in model.modules():
        if isinstance(module, KTMoELayer):
            source = module.lora_source()
            module.routed_experts.plan_for(source)
