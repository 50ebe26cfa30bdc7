"""What kt needs around a training loop, shared by :class:`~kt_accelerate.KTAccelerator` and
:class:`~kt_accelerate.KTTrainer` (and usable on its own with plain ``torch.distributed``).

* before the model is built: :func:`init_distributed` (one engine per node, see
  :mod:`kt_sft.distributed`); :func:`wrap_model` / :func:`load_model` do it for you;
* before DDP wraps the model: :func:`prepare_model` (wrap if needed, check the plugin against
  the model, hand the expert LoRA parameters to kt instead of DDP, equalise them across ranks);
* after the last backward of an optimizer step: :func:`sync_expert_grads`;
* around the optimizer: :func:`include_expert_lora`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

import kt_sft
from kt_accelerate.plugin import KTransformersPlugin
from kt_sft import distributed as kt_distributed

__all__ = [
    "KTPluginConflictError",
    "check_model",
    "ensure_wrapped",
    "include_expert_lora",
    "init_distributed",
    "is_kt_model",
    "load_model",
    "prepare_model",
    "sync_expert_grads",
    "wrap_model",
]

logger = logging.getLogger(__name__)


class KTPluginConflictError(ValueError):
    """The plugin's settings contradict the model or the training arguments."""


def _plugin(plugin: KTransformersPlugin | None) -> KTransformersPlugin:
    if plugin is None:
        return KTransformersPlugin()
    if not isinstance(plugin, KTransformersPlugin):
        raise TypeError(f"expected a KTransformersPlugin, got {type(plugin).__name__}")
    return plugin


def init_distributed(
    plugin: KTransformersPlugin | None = None,
) -> kt_distributed.DistributedContext | None:
    """Start kt's distributed mode with the plugin's placement and timeout (collective; a no-op
    for a single process). Call it before the model is wrapped or loaded."""
    plugin = _plugin(plugin)
    return kt_distributed.init_distributed(
        placement=plugin.engine_placement, timeout=plugin.timeout
    )


def wrap_model(model: nn.Module, plugin: KTransformersPlugin | None = None) -> nn.Module:
    """``kt_sft.wrap_model(model, plugin.kt_config)`` after :func:`init_distributed`, so that
    under several processes only each node's local rank 0 builds engines."""
    plugin = _plugin(plugin)
    init_distributed(plugin)
    return kt_sft.wrap_model(model, plugin.kt_config)


def load_model(path: str, plugin: KTransformersPlugin | None = None, **hf_kwargs: Any) -> nn.Module:
    """``kt_sft.load_model(path, plugin.kt_config, **hf_kwargs)`` after
    :func:`init_distributed`."""
    plugin = _plugin(plugin)
    init_distributed(plugin)
    return kt_sft.load_model(path, plugin.kt_config, **hf_kwargs)


def _layers(model: nn.Module) -> list[Any]:
    from kt_sft.inject import experts_layers

    return [layer for _, _, layer in experts_layers(model)]


def is_kt_model(model: nn.Module) -> bool:
    """Whether some routed experts of ``model`` run in kt engines."""
    return bool(_layers(model))


def _supported(model: nn.Module) -> bool:
    from kt_models import UnsupportedArchitectureError, get_arch_spec, unwrap_model

    try:
        get_arch_spec(unwrap_model(model))
    except (UnsupportedArchitectureError, KeyError, AttributeError, ValueError):
        return False
    return True


def check_model(model: nn.Module, plugin: KTransformersPlugin) -> None:
    """Raise :class:`KTPluginConflictError` where the plugin's explicit settings differ from
    those the model was wrapped with, or the model's engines were placed under other
    distributed settings."""
    layers = _layers(model)
    if not layers:
        return
    cfg = layers[0].cfg
    for name, value in plugin.explicit_kt_settings.items():
        have = getattr(cfg, name, None)
        if have != value:
            raise KTPluginConflictError(
                f"KTransformersPlugin.kt_config.{name}={value!r} but the model was wrapped with "
                f"{name}={have!r}; wrap it with the plugin's settings "
                "(kt_accelerate.wrap_model(model, plugin) / load_model(path, plugin)) or drop "
                f"{name} from the plugin"
            )
    ctx = kt_distributed.current_context(create=False)
    exchange = (kt_distributed.LeaderBackend, kt_distributed.MemberBackend)
    exchanging = any(isinstance(layer.experts_backend, exchange) for layer in layers)
    if ctx is not None and ctx.exchanges_tokens and not exchanging:
        raise KTPluginConflictError(
            "the model was wrapped before kt's distributed mode started, so every rank built "
            "its own engines, but KTransformersPlugin.engine_placement='per_node' shares one "
            "engine per node; create the accelerator / TrainingArguments first, then wrap or "
            "load the model (kt_accelerate.wrap_model / load_model), or use "
            "engine_placement='per_rank'"
        )
    if ctx is not None and ctx.placement != plugin.engine_placement:
        raise KTPluginConflictError(
            f"KTransformersPlugin.engine_placement={plugin.engine_placement!r} but kt's "
            f"distributed mode runs with placement={ctx.placement!r} (set before the model was "
            "wrapped, e.g. by KT_ENGINE_PLACEMENT); wrap the model after creating the plugin"
        )


def ensure_wrapped(model: nn.Module, plugin: KTransformersPlugin | None = None) -> nn.Module:
    """Wrap ``model`` with the plugin's KTConfig unless it is wrapped already or kt does not
    know its architecture; check a wrapped model against the plugin."""
    plugin = _plugin(plugin)
    init_distributed(plugin)
    if not is_kt_model(model):
        if not _supported(model):
            return model
        model = kt_sft.wrap_model(model, plugin.kt_config)
    check_model(model, plugin)
    return model


def prepare_model(
    model: nn.Module, plugin: KTransformersPlugin | None = None, *, wrap: bool = True
) -> nn.Module:
    """Get ``model`` ready for DDP: wrap it with kt if it is not (``wrap``; and its architecture
    is supported), check it against the plugin, keep the expert LoRA parameters out of DDP and
    make them equal on all ranks (collective). Returns the model (the same object)."""
    plugin = _plugin(plugin)
    if wrap:
        model = ensure_wrapped(model, plugin)
    else:
        init_distributed(plugin)
        if not is_kt_model(model):
            return model
        check_model(model, plugin)
    if kt_distributed.current_context() is not None:
        kt_distributed.ignore_expert_lora_in_ddp(model)
        kt_distributed.broadcast_expert_lora(model)
    return model


def sync_expert_grads(model: nn.Module) -> None:
    """Reduce the expert LoRA gradients across ranks (see
    :func:`kt_sft.distributed.reduce_expert_lora_grads`); a no-op for one process. Call it on
    every rank after the backward that completes an optimizer step, before clipping."""
    kt_distributed.reduce_expert_lora_grads(model)


def include_expert_lora(
    optimizer: torch.optim.Optimizer, models: Iterable[nn.Module]
) -> list[nn.Parameter]:
    """Add the trainable expert LoRA parameters of ``models`` that ``optimizer`` lacks to its
    first parameter group (so learning-rate schedulers keep working); returns them."""
    present = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing: list[nn.Parameter] = []
    for model in models:
        for p in kt_distributed.expert_lora_parameters(model):
            if id(p) not in present:
                present.add(id(p))
                missing.append(p)
    if missing:
        optimizer.param_groups[0]["params"].extend(missing)
        logger.warning(
            "kt: the optimizer did not update %d expert LoRA parameter(s) of the model; they "
            "were added to its first parameter group (build the optimizer from "
            "model.parameters() after get_peft_model to choose their settings yourself)",
            len(missing),
        )
    return missing
