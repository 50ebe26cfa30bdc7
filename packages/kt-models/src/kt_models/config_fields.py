"""Alias-aware readers for the config fields the registry needs.

Real configs name the same quantity differently (``n_routed_experts``, ``num_experts``,
``num_local_experts``, ...) and vision-language models nest the language model's fields under
``text_config``. These helpers accept a transformers ``PreTrainedConfig``, a plain ``dict`` (a
parsed ``config.json``), or any object with attributes, and always read the language model's
fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kt_models.errors import ConfigFieldError

__all__ = [
    "ACTIVATION_FIELDS",
    "HIDDEN_SIZE_FIELDS",
    "MOE_INTERMEDIATE_SIZE_FIELDS",
    "NUM_EXPERTS_FIELDS",
    "NUM_LAYERS_FIELDS",
    "TOP_K_FIELDS",
    "config_model_type",
    "get_field",
    "has_field",
    "read_field",
    "text_config",
]

#: Number of routed experts per MoE layer, in the order they are tried.
NUM_EXPERTS_FIELDS: tuple[str, ...] = (
    "n_routed_experts",
    "num_experts",
    "num_local_experts",
    "moe_num_experts",
)
#: Experts chosen per token.
TOP_K_FIELDS: tuple[str, ...] = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "moe_k",
    "top_k",
)
#: Intermediate size of one routed expert, where it differs from the dense MLP's.
MOE_INTERMEDIATE_SIZE_FIELDS: tuple[str, ...] = (
    "moe_intermediate_size",
    "expert_intermediate_size",
    "moe_ffn_hidden_size",
)
#: Model width.
HIDDEN_SIZE_FIELDS: tuple[str, ...] = ("hidden_size", "d_model", "n_embd")
#: Decoder layer count.
NUM_LAYERS_FIELDS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers")
#: Activation of the gate projection.
ACTIVATION_FIELDS: tuple[str, ...] = ("hidden_act", "hidden_activation", "activation_function")

_MISSING = object()


def _lookup(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, _MISSING)
    return getattr(obj, name, _MISSING)


def text_config(config: Any) -> Any:
    """Return the language-model part of ``config``.

    For a vision-language config this is its ``text_config`` (via ``get_text_config()`` when the
    object offers it); for a plain language-model config it is ``config`` itself.
    """
    if isinstance(config, Mapping):
        nested = config.get("text_config")
        return nested if isinstance(nested, Mapping) else config
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            nested = getter(decoder=True)
        except TypeError:
            nested = getter()
        if nested is not None:
            return nested
    nested = getattr(config, "text_config", None)
    return nested if nested is not None else config


def config_model_type(config: Any) -> str | None:
    """The top-level ``model_type`` of ``config`` (``None`` when it has none)."""
    value = _lookup(config, "model_type")
    return value if isinstance(value, str) and value else None


def get_field(config: Any, names: Sequence[str], default: Any = None) -> Any:
    """First set (non-``None``) field of ``names`` in the text config, else ``default``."""
    cfg = text_config(config)
    for name in names:
        value = _lookup(cfg, name)
        if value is not _MISSING and value is not None:
            return value
    return default


def has_field(config: Any, names: Sequence[str]) -> bool:
    """Whether any of ``names`` is set (non-``None``) in the text config."""
    return get_field(config, names, _MISSING) is not _MISSING


def read_field(config: Any, names: Sequence[str], *, what: str, kind: type = int) -> Any:
    """Read a required field, trying each alias in ``names`` in order.

    Raises:
        ConfigFieldError: none of the aliases is set, or the value has the wrong type; the message
            names the quantity, every alias tried, and the config's model type.
    """
    value = get_field(config, names, _MISSING)
    model_type = config_model_type(config) or "<unknown>"
    if value is _MISSING:
        raise ConfigFieldError(
            f"config (model_type={model_type!r}) does not set the {what}: none of the fields "
            f"{', '.join(names)} is present",
            fields=tuple(names),
        )
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigFieldError(
                f"config (model_type={model_type!r}) field for the {what} must be an integer, "
                f"got {value!r}",
                fields=tuple(names),
            )
        if value <= 0:
            raise ConfigFieldError(
                f"config (model_type={model_type!r}) field for the {what} must be positive, "
                f"got {value}",
                fields=tuple(names),
            )
    elif not isinstance(value, kind):
        raise ConfigFieldError(
            f"config (model_type={model_type!r}) field for the {what} must be a "
            f"{kind.__name__}, got {value!r}",
            fields=tuple(names),
        )
    return value
