"""Architectures discovered from the model itself: transformers' experts interface.

transformers 5 marks every fused routed-experts class with ``@use_experts_implementation``; the
decorator records the storage layout on each instance (``is_concatenated``, ``is_transposed``,
``has_bias``, ``has_gate``, ``has_post_expert_norm``) and gives the class ``_apply_gate`` (the
default ``act_fn(gate) * up``, or a class's own override). Together with the parameter shapes
(``gate_up_proj: E x 2I x H``, ``down_proj: E x H x I``) and the activation module, that is all
kt needs to run the experts in its engine, so a model type that transformers ships needs no
registry entry:

* :func:`find_experts_modules` finds the decorated experts modules of a model;
* :func:`experts_layout` reads one module's :class:`ExpertsLayout` (E, H, I, flags, activation);
* :func:`unsupported_features` lists what of that layout the engine does not compute;
* :func:`discover_arch_spec` turns a model into an :class:`~kt_models.arch_spec.ArchSpec` whose
  paths, MoE layers and sizes come from the module tree, refusing (with the model type and the
  exact feature) what the engine does not compute;
* :func:`experts_interface_model_types` enumerates the installed transformers' model types whose
  modeling file uses the interface (what the generated tests and the docs table cover).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from kt_models.arch_spec import ArchSpec, DiscoveredExperts
from kt_models.config_fields import ACTIVATION_FIELDS, get_field, text_config
from kt_models.errors import UnsupportedArchitectureError
from kt_models.gating import ENGINE_ACTIVATIONS as _ENGINE_ACTIVATIONS
from kt_models.gating import Gating, match_gating
from kt_models.navigate import unwrap_model

__all__ = [
    "DEFAULT_LAYOUT",
    "ENGINE_ACTIVATIONS",
    "ENGINE_FLAGS",
    "REPACKED_AT_LOAD",
    "ExpertsLayout",
    "discover_arch_spec",
    "experts_interface_model_types",
    "experts_layout",
    "find_experts_modules",
    "gate_is_default",
    "is_experts_module",
    "unsupported_features",
]

#: The flags of the layout the engine computes: ``[gate; up]`` concatenated along the output
#: dimension, ``out x in`` (untransposed) storage, no biases, gated, no norm after each expert.
DEFAULT_LAYOUT: dict[str, bool] = {
    "is_concatenated": True,
    "is_transposed": False,
    "has_bias": False,
    "has_gate": True,
    "has_post_expert_norm": False,
}

#: Layout flags kt handles by repacking the weights at load (the engine's loops unchanged).
#: Interleaved gate/up is de-interleaved at load when the gating (kt_models.gating) reads it so.
REPACKED_AT_LOAD: tuple[str, ...] = ("is_transposed", "is_concatenated")

#: Layout flags the engine computes as they are: frozen biases (engine ``set_biases``).
ENGINE_FLAGS: tuple[str, ...] = ("has_bias",)

#: Gate activations (transformers ``ACT2FN`` names) the compiled engine computes.
ENGINE_ACTIVATIONS: tuple[str, ...] = tuple(_ENGINE_ACTIVATIONS)

_FLAG_FEATURES: dict[str, str] = {
    "is_concatenated": "gate and up interleaved (is_concatenated=False)",
    "is_transposed": "weights stored transposed (is_transposed=True)",
    "has_bias": "biases on the expert projections (has_bias=True)",
    "has_gate": "no gate projection, up -> act -> down (has_gate=False)",
    "has_post_expert_norm": "a norm after each expert (has_post_expert_norm=True)",
}


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is an instance of a ``@use_experts_implementation`` class."""
    return all(hasattr(module, flag) for flag in DEFAULT_LAYOUT) and hasattr(
        type(module), "_apply_gate"
    )


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every experts-interface module of ``model``, in order.

    PEFT wrappers around the experts (``target_parameters`` LoRA) are looked through: the
    decorated module itself is returned, under the name of the position it occupies.
    """
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in seen or not is_experts_module(module):
            continue
        seen.add(id(module))
        out.append((name, module))
    return out


def _activation_name(module: nn.Module) -> str | None:
    """The ``ACT2FN`` name of ``module.act_fn`` (the config's ``hidden_act`` when it names the
    same class), ``None`` when the module has no recognisable activation."""
    act = getattr(module, "act_fn", None)
    if act is None:
        return None
    from transformers.activations import ACT2CLS, ACT2FN

    config = getattr(module, "config", None)
    declared = (
        get_field(text_config(config), ACTIVATION_FIELDS, None) if config is not None else None
    )
    if isinstance(declared, str) and declared in ACT2CLS:
        try:
            if type(ACT2FN[declared]) is type(act):
                return declared
        except (KeyError, TypeError):
            pass
    for name, entry in ACT2CLS.items():
        cls, kwargs = entry if isinstance(entry, tuple) else (entry, {})
        if type(act) is cls and not kwargs:
            return name
    return None


#: Magnitudes of the probe inputs :func:`_gate_is_default` feeds both gatings (clamps,
#: soft-caps and limits of the gatings in transformers are at most a few hundred).
_GATE_PROBE_SCALES: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)


def gate_is_default(module: nn.Module) -> bool:
    """Whether ``module`` (an experts-interface module) gates as transformers' default
    ``act(gate) * up`` (see :func:`_gate_is_default`)."""
    from transformers.integrations.moe import _default_apply_gate

    down = getattr(module, "down_proj", None)
    shape = tuple(getattr(down, "ds_shape", getattr(down, "shape", (0, 0, 1))))
    inter = shape[1] if getattr(module, "is_transposed", False) else shape[-1]
    return _gate_is_default(module, int(inter), _default_apply_gate)


def _gate_is_default(module: nn.Module, inter: int, default: Any) -> bool:
    """Whether the module's ``_apply_gate`` is transformers' default ``act(gate) * up``, or a
    class override that computes the same in float32 (e.g. an explicit ``.float()`` upcast, or a
    clamp whose limit this instance's config leaves unset).

    An override is compared with the default on seeded random float32 inputs spanning
    :data:`_GATE_PROBE_SCALES` (so clamps, soft-caps and scaled GLUs show up) and must give
    bit-identical outputs; anything else (or a failure) counts as a custom gating.
    """
    import torch

    override = getattr(type(module), "_apply_gate", default)
    if override is default:
        return True
    if getattr(module, "act_fn", None) is None:
        return False
    gen = torch.Generator().manual_seed(0)
    width = max(1, min(inter, 256))
    try:
        with torch.no_grad():
            for scale in _GATE_PROBE_SCALES:
                probe = torch.randn(16, 2 * width, generator=gen, dtype=torch.float32) * scale
                if not torch.equal(override(module, probe.clone()), default(module, probe.clone())):
                    return False
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class ExpertsLayout:
    """What one experts-interface module declares, read from the module itself."""

    #: The experts class name (``"Qwen3MoeExperts"``).
    class_name: str
    #: E, H and I, from the parameter shapes.
    num_experts: int
    hidden_size: int
    intermediate_size: int
    #: The decoration's layout flags.
    is_concatenated: bool
    is_transposed: bool
    has_bias: bool
    has_gate: bool
    has_post_expert_norm: bool
    #: Whether the class overrides transformers' default ``_apply_gate`` (``act(gate) * up``)
    #: with a gating that computes something else (see :func:`_gate_is_default`).
    custom_gate: bool
    #: ``ACT2FN`` name of the activation (``None``: none, or not one of ``ACT2FN``'s).
    activation: str | None
    #: Class name of the activation module (for messages).
    activation_class: str
    #: The engine gating ``_apply_gate`` computes (:func:`kt_models.gating.match_gating`), or
    #: ``None`` when it is none the engine computes (or the experts have no gate).
    gating: Gating | None = None

    @property
    def is_default(self) -> bool:
        """Whether the layout is the one the engine computes (activation aside)."""
        return (
            all(getattr(self, k) == v for k, v in DEFAULT_LAYOUT.items()) and not self.custom_gate
        )

    @property
    def variant(self) -> str:
        """Short name of the engine variant: ``"default"`` or what differs from it."""
        parts = [
            (k if v else f"not {k}") + (" (repacked at load)" if k in REPACKED_AT_LOAD else "")
            for k, v in ((k, getattr(self, k)) for k in DEFAULT_LAYOUT)
            if v != DEFAULT_LAYOUT[k]
        ]
        if self.custom_gate:
            parts.append(
                f"gating {self.gating.describe()}" if self.gating else "custom _apply_gate"
            )
        return ", ".join(parts) or "default"


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """The :class:`ExpertsLayout` of an experts-interface module (released placeholders keep
    their full shape in ``ds_shape``, so this works on a wrapped model too)."""
    if not is_experts_module(module):
        raise TypeError(
            f"{type(module).__name__} is not a transformers experts-interface module "
            "(@use_experts_implementation)"
        )
    from transformers.integrations.moe import _default_apply_gate

    def shape(name: str) -> tuple[int, ...] | None:
        p = getattr(module, name, None)
        if p is None:
            return None
        return tuple(getattr(p, "ds_shape", p.shape))

    flags = {k: bool(getattr(module, k)) for k in DEFAULT_LAYOUT}
    down = shape("down_proj")
    if down is None or len(down) != 3:
        raise TypeError(f"{type(module).__name__}: no 3-D down_proj parameter")
    num_experts = down[0]
    if flags["is_transposed"]:
        inter, hidden = down[1], down[2]
    else:
        hidden, inter = down[1], down[2]
    act = getattr(module, "act_fn", None)
    activation = _activation_name(module)
    gating = match_gating(module, int(inter), activation) if flags["has_gate"] else None
    return ExpertsLayout(
        class_name=type(module).__name__,
        num_experts=int(num_experts),
        hidden_size=int(hidden),
        intermediate_size=int(inter),
        **flags,
        custom_gate=not _gate_is_default(module, int(inter), _default_apply_gate),
        activation=activation,
        activation_class=type(act).__name__ if act is not None else "none",
        gating=gating,
    )


def unsupported_features(layout: ExpertsLayout) -> list[str]:
    """What of ``layout`` the engine does not compute exactly (empty: it computes all of it)."""
    problems = [
        _FLAG_FEATURES[k]
        for k, v in DEFAULT_LAYOUT.items()
        if getattr(layout, k) != v and k not in REPACKED_AT_LOAD + ENGINE_FLAGS
    ]
    gating = layout.gating
    if gating is None and layout.has_gate and (layout.custom_gate or not layout.is_concatenated):
        what = "gate and up interleaved, " if not layout.is_concatenated else ""
        problems.append(
            f"a custom gating ({what}{layout.class_name}._apply_gate computes none of "
            "f(min(g, limit)) * (clamp(u, +-limit) + c) with f SiLU(alpha) / GELU / ReLU^2)"
        )
    elif gating is None and layout.activation not in ENGINE_ACTIVATIONS:
        name = layout.activation or layout.activation_class
        problems.append(
            f"activation {name!r} (the engine computes {' / '.join(ENGINE_ACTIVATIONS)})"
        )
    return problems


_LAYER_RE = re.compile(r"^(?P<layers>.+)\.(?P<idx>\d+)\.(?P<rest>.+)$")


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def discover_arch_spec(model: nn.Module) -> ArchSpec:
    """An :class:`~kt_models.arch_spec.ArchSpec` read from ``model``'s experts-interface modules.

    The decoder-layer list, the MoE block and experts attributes and the MoE layer indices come
    from the experts modules' qualified names; E, H and I from their parameter shapes. Every
    experts module must have the same layout and sizes.

    Raises:
        UnsupportedArchitectureError: no experts-interface module was found, the modules differ,
            or their layout has a feature the engine does not compute (the message names the
            model type and the feature).
    """
    base = unwrap_model(model)
    model_type = _model_type(base)
    found = find_experts_modules(base)
    if not found:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by kt: it is not registered and has no "
            "experts module decorated with transformers' @use_experts_implementation",
            model_type=model_type,
            reason="no experts-interface module",
        )
    layouts = {experts_layout(m) for _, m in found}
    if len(layouts) != 1:
        reason = (
            "its experts modules differ in layout or size ("
            + "; ".join(
                sorted(
                    f"{x.class_name} E={x.num_experts} H={x.hidden_size} "
                    f"I={x.intermediate_size} {x.variant}"
                    for x in layouts
                )
            )
            + ")"
        )
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by kt: {reason}",
            model_type=model_type,
            reason=reason,
        )
    layout = layouts.pop()
    problems = unsupported_features(layout)
    if problems:
        reason = f"its routed experts ({layout.class_name}) have {'; '.join(problems)}"
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by kt: {reason}",
            model_type=model_type,
            reason=reason,
        )
    paths = set()
    indices: list[int] = []
    for name, _ in found:
        match = _LAYER_RE.match(name)
        if match is None:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported by kt: its experts module {name!r} "
                "is not inside a list of decoder layers",
                model_type=model_type,
                reason=f"experts module {name!r} outside a decoder-layer list",
            )
        paths.add((match["layers"], match["rest"]))
        indices.append(int(match["idx"]))
    if len(paths) != 1:
        reason = f"its experts sit at several paths ({sorted(paths)})"
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by kt: {reason}",
            model_type=model_type,
            reason=reason,
        )
    layers_path, rest = paths.pop()
    block_attr, _, experts_attr = rest.rpartition(".")
    if not block_attr:
        reason = f"its experts module sits directly in the decoder layer ({rest!r})"
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by kt: {reason}",
            model_type=model_type,
            reason=reason,
        )
    first_block = found[0][1]
    block = dict(base.named_modules()).get(found[0][0].rpartition(".")[0])
    router_attr = next(
        (
            a
            for a in ("gate", "router")
            if block is not None and isinstance(getattr(block, a, None), nn.Module)
        ),
        "gate",
    )
    top_k = None
    for holder in (getattr(block, router_attr, None), block):
        value = getattr(holder, "top_k", None) if holder is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            top_k = value
            break
    disk = _checkpoint_names(
        base, found[0][0], layers_path, experts_attr, layout.num_experts, layout.is_transposed
    )
    discovered = DiscoveredExperts(
        layer_indices=tuple(sorted(indices)),
        num_experts=layout.num_experts,
        hidden_size=layout.hidden_size,
        intermediate_size=layout.intermediate_size,
        activation=layout.activation or "silu",
        experts_class=type(first_block).__name__,
        experts_module=type(first_block).__module__,
        top_k=top_k,
    )
    return ArchSpec(
        model_type=model_type,
        layers_path=layers_path,
        moe_block_attr=block_attr,
        experts_attr=experts_attr,
        router_attr=router_attr,
        expert_storage="fused",
        experts_class=type(first_block).__name__,
        discovered=discovered,
        **disk,
        notes=f"discovered from {type(first_block).__name__} ({layout.variant} layout)",
    )


_PROJ = ("gate", "up", "down")


def _checkpoint_names(
    base: nn.Module,
    experts_name: str,
    layers_path: str,
    experts_attr: str,
    num_experts: int,
    transposed: bool = False,
) -> dict[str, Any]:
    """On-disk names of one layer's expert tensors, from transformers' own conversion rules.

    ``save_pretrained`` writes a model through the reverse of the conversion mapping that
    ``from_pretrained`` applies (``transformers.conversion_mapping``; e.g. fused
    ``experts.gate_up_proj`` back to per-expert ``experts.{e}.gate_proj.weight``, or Mixtral's
    ``block_sparse_moe.experts.{e}.w1.weight``). A probe state dict of tiny tensors whose values
    encode (expert, projection) goes through that reverse conversion; the names and values that
    come out give the :class:`ArchSpec` checkpoint fields (``checkpoint_layers_prefix``,
    ``checkpoint_moe_attr``, ``checkpoint_proj_names`` or ``checkpoint_fused_names``). Returns
    ``{"checkpoint_layers_prefix": layers_path}`` (the in-memory names) when the model has no
    conversion rules for its experts or they are of a kind the reader does not map.
    """
    import torch

    default: dict[str, Any] = {
        "checkpoint_layers_prefix": layers_path,
        "checkpoint_fused_transposed": transposed,
    }
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return default
    match = _LAYER_RE.match(experts_name)
    if match is None:
        return default
    layer_idx = int(match["idx"])
    codes = torch.arange(1, 3 * num_experts + 1, dtype=torch.float32).reshape(num_experts, 3)
    gate_up_shape = (num_experts, 1, 2) if transposed else (num_experts, 2, 1)
    probe = {
        f"{experts_name}.gate_up_proj": codes[:, :2].reshape(gate_up_shape).clone(),
        f"{experts_name}.down_proj": codes[:, 2:].reshape(num_experts, 1, 1).clone(),
    }
    try:
        out = revert_weight_conversion(base, dict(probe))
    except Exception:  # a rule that needs real shapes: keep the in-memory names
        return default
    if set(out) == set(probe):
        return default
    if len(out) == 2:  # fused on disk under other names
        names: dict[str, str] = {}
        for key, tensor in out.items():
            t = tensor.reshape(num_experts, -1)
            if torch.equal(t, codes[:, :2]):
                names["gate_up"] = key
            elif torch.equal(t, codes[:, 2:]):
                names["down"] = key
        if set(names) != {"gate_up", "down"}:
            return default
        disk_layers = _LAYER_RE.match(names["gate_up"])
        if disk_layers is None or int(disk_layers["idx"]) != layer_idx:
            return default
        prefix = f"{disk_layers['layers']}.{layer_idx}."
        if not names["down"].startswith(prefix):
            return default
        return {
            "checkpoint_layers_prefix": disk_layers["layers"],
            "checkpoint_fused_transposed": transposed,
            "checkpoint_fused_names": (
                names["gate_up"][len(prefix) :],
                names["down"][len(prefix) :],
            ),
        }
    if len(out) != 3 * num_experts:
        return default
    proj_names: dict[str, str] = {}
    experts_prefixes = set()
    for key, tensor in out.items():
        if tensor.numel() != 1:
            return default
        code = int(tensor.reshape(()).item()) - 1
        expert, proj = divmod(code, 3)
        head, sep, tail = key.rpartition(f".{expert}.")
        if not sep or not tail.endswith(".weight"):
            return default
        experts_prefixes.add(head)
        name = tail[: -len(".weight")]
        if proj_names.setdefault(_PROJ[proj], name) != name:
            return default
    if len(experts_prefixes) != 1 or len(proj_names) != 3:
        return default
    head = experts_prefixes.pop()
    disk = _LAYER_RE.match(head)
    if disk is None or int(disk["idx"]) != layer_idx:
        return default
    moe_attr, _, disk_experts = disk["rest"].rpartition(".")
    if disk_experts != experts_attr or not moe_attr:
        return default
    return {
        "checkpoint_layers_prefix": disk["layers"],
        "checkpoint_moe_attr": moe_attr,
        "checkpoint_proj_names": tuple(proj_names[p] for p in _PROJ),
    }


@lru_cache(maxsize=4)
def _interface_types(causal_lm_only: bool, version: str) -> tuple[str, ...]:
    import transformers
    from transformers.models.auto.configuration_auto import (
        CONFIG_MAPPING_NAMES,
        model_type_to_module_name,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    out = []
    for model_type in CONFIG_MAPPING_NAMES:
        if causal_lm_only and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            continue
        module = model_type_to_module_name(model_type)
        path = root / module / f"modeling_{module}.py"
        if path.is_file() and "@use_experts_implementation" in path.read_text(encoding="utf-8"):
            out.append(model_type)
    return tuple(sorted(out))


def experts_interface_model_types(*, causal_lm_only: bool = True) -> list[str]:
    """Model types of the installed transformers whose modeling file uses the experts interface.

    With ``causal_lm_only`` (default) only types with an ``AutoModelForCausalLM`` class (the
    language models kt trains; vision and audio sub-configs are left out).
    """
    import transformers

    return list(_interface_types(causal_lm_only, transformers.__version__))
