"""Load a model with transformers while its routed experts are neither read nor allocated.

What transformers 5 offers, and why kt needs one more piece:

* ``from_pretrained`` builds the model on the ``meta`` device, then materialises every parameter
  that its state dict lists: from the checkpoint when the key is there, and otherwise as a fresh
  tensor on the target device that ``_init_weights`` fills with random values. So skipping the
  expert keys alone (``key_mapping``) still allocates, and then initialises, every expert.
* ``device_map`` values are devices. Sending the experts to ``"meta"`` makes accelerate dispatch
  the model as a multi-device one, picking ``meta`` as the execution device and offloading every
  CPU module (all weights end up on ``meta``). ``"disk"`` rewrites the experts to an offload
  folder. Neither keeps the rest of the model usable.
* transformers' public class patching (``transformers.monkey_patching.register_patch_mapping``)
  swaps a module class for the models created while it is registered. :func:`experts_on_meta`
  registers, for the duration of a ``with`` block, a subclass of the architecture's experts class
  whose parameters stay on ``meta`` and are left out of the state dict. ``from_pretrained`` then
  neither reads the expert tensors (their keys match nothing: "unexpected") nor creates them
  (they are not "missing"). On leaving the block the patch is removed and every experts module
  created inside it gets its original class back (its parameters remain ``meta`` tensors of the
  right shape and dtype, as after :func:`kt_models.extract_expert_weights`).

:func:`from_pretrained_kwargs` gives the keyword arguments for the load itself (one device, so no
accelerate dispatch; the dtype; FP8 non-expert weights dequantized). :func:`load_model` puts the
two together.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kt_models.auto_class import auto_model_class
from kt_models.config_fields import get_field
from kt_models.errors import TensorShapeError, UnsupportedArchitectureError
from kt_models.registry import ArchSpec, get_arch_spec

__all__ = ["experts_on_meta", "from_pretrained_kwargs", "load_config", "load_model"]

_PATCH_LOCK = threading.Lock()
_LOG = logging.getLogger(__name__)


def load_config(path_or_config: Any) -> Any:
    """A transformers config from a checkpoint directory / ``config.json`` path, or ``path_or_config``
    itself when it already is a config."""
    if isinstance(path_or_config, (str, os.PathLike)):
        from transformers import AutoConfig

        path = Path(path_or_config)
        return AutoConfig.from_pretrained(str(path.parent if path.is_file() else path))
    return path_or_config


def _is_fp8(config: Any) -> tuple[bool, tuple[int, int] | None]:
    qcfg = get_field(config, ("quantization_config",), None)
    if qcfg is None:
        qcfg = getattr(config, "quantization_config", None)
    if qcfg is None:
        return False, None
    get = qcfg.get if isinstance(qcfg, dict) else (lambda k, d=None: getattr(qcfg, k, d))
    method = str(get("quant_method", "") or "")
    if method != "fp8":
        return False, None
    block = get("weight_block_size", None)
    return True, (tuple(int(b) for b in block) if block else None)  # type: ignore[return-value]


def from_pretrained_kwargs(
    path_or_config: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` of a model whose experts the engine will own.

    The dict holds:

    * ``config``: the checkpoint's config (loaded once here);
    * ``device_map={"": device}``: every non-expert weight goes to one device, so accelerate
      adds no dispatch hooks and never offloads anything;
    * ``dtype``: as given, else ``"auto"`` (the checkpoint's dtype);
    * for DeepSeek-style FP8 checkpoints, ``quantization_config=FineGrainedFP8Config(
      dequantize=True, ...)``, so attention and the other non-expert weights load dequantized
      (to BF16) on any device.

    These kwargs alone still let transformers create the routed experts (reading them from the
    checkpoint). Call ``from_pretrained`` inside :func:`experts_on_meta` (or use
    :func:`load_model`) so the experts are neither read nor allocated::

        kwargs = from_pretrained_kwargs(path)
        with experts_on_meta(kwargs["config"]):
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    """
    config = load_config(path_or_config)
    get_arch_spec(config)  # unsupported architectures fail here, before any weight is loaded
    kwargs: dict[str, Any] = {
        "config": config,
        "device_map": {"": str(device) if isinstance(device, torch.device) else device},
        "dtype": dtype if dtype is not None else "auto",
    }
    fp8, block = _is_fp8(config)
    if fp8:
        from transformers import FineGrainedFP8Config

        kwargs["quantization_config"] = FineGrainedFP8Config(
            dequantize=True, weight_block_size=block or (128, 128)
        )
    return kwargs


def _experts_class(spec: ArchSpec) -> type[nn.Module]:
    if spec.expert_storage != "fused" or not spec.experts_class:
        raise UnsupportedArchitectureError(
            f"{spec.model_type}: experts_on_meta needs a transformers built-in architecture with "
            "fused experts (ArchSpec.experts_class); load remote-code models normally and call "
            "kt_models.release_experts",
            model_type=spec.model_type,
        )
    module_name = f"transformers.models.{spec.model_type}.modeling_{spec.model_type}"
    if spec.discovered is not None and spec.discovered.experts_module:
        module_name = spec.discovered.experts_module
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, spec.experts_class)
    except (ImportError, AttributeError) as exc:
        raise UnsupportedArchitectureError(
            f"{spec.model_type}: cannot find experts class {spec.experts_class!r} in {module_name}",
            model_type=spec.model_type,
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UnsupportedArchitectureError(
            f"{spec.model_type}: {module_name}.{spec.experts_class} is not an nn.Module class",
            model_type=spec.model_type,
        )
    return cls


def _meta_experts_class(
    original: type[nn.Module], created: list[weakref.ref[nn.Module]]
) -> type[nn.Module]:
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        original.__init__(self, *args, **kwargs)
        for name, param in list(self._parameters.items()):
            if param is not None and param.device.type != "meta":
                setattr(
                    self,
                    name,
                    nn.Parameter(
                        torch.empty(param.shape, dtype=param.dtype, device="meta"),
                        requires_grad=False,
                    ),
                )
        created.append(weakref.ref(self))

    def _save_to_state_dict(
        self: nn.Module, destination: Any, prefix: str, keep_vars: bool
    ) -> None:
        # The routed experts belong to the engine: transformers must neither expect them in the
        # checkpoint nor create them.
        return None

    return type(
        original.__name__,
        (original,),
        {
            "__init__": __init__,
            "_save_to_state_dict": _save_to_state_dict,
            "__qualname__": original.__qualname__,
            "__module__": original.__module__,
            "__doc__": original.__doc__,
        },
    )


@contextmanager
def experts_on_meta(config_or_spec: Any) -> Iterator[list[nn.Module]]:
    """Within the block, models of this architecture are created with routed experts on ``meta``.

    ``config_or_spec`` is a config, a model type, a checkpoint path or an :class:`ArchSpec`. The
    block yields the list of experts modules created inside it (filled as models are built).
    On exit the class patch is removed and those modules get their original class back; their
    parameters stay ``meta``.

    Raises:
        UnsupportedArchitectureError: the architecture is not a transformers built-in with fused
            experts.
        RuntimeError: a class patch for the same experts class is registered already.
    """
    from transformers.monkey_patching import (
        get_patch_mapping,
        register_patch_mapping,
        unregister_patch_mapping,
    )

    if isinstance(config_or_spec, ArchSpec):
        spec = config_or_spec
    elif isinstance(config_or_spec, os.PathLike) or (
        isinstance(config_or_spec, str) and os.path.exists(config_or_spec)
    ):
        spec = get_arch_spec(load_config(config_or_spec))
    else:
        spec = get_arch_spec(config_or_spec)
    original = _experts_class(spec)
    created: list[weakref.ref[nn.Module]] = []
    patched = _meta_experts_class(original, created)
    name = original.__name__
    with _PATCH_LOCK:
        if name in get_patch_mapping():
            raise RuntimeError(
                f"a transformers class patch for {name} is registered already; "
                "experts_on_meta cannot be nested or combined with it"
            )
        register_patch_mapping({name: patched})
    modules: list[nn.Module] = []
    try:
        yield modules
    finally:
        with _PATCH_LOCK:
            unregister_patch_mapping([name])
        for ref in created:
            module = ref()
            if module is not None and type(module) is patched:
                module.__class__ = original
                modules.append(module)


def load_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    model_class: Any = None,
    **kwargs: Any,
) -> Any:
    """``from_pretrained`` with :func:`from_pretrained_kwargs` inside :func:`experts_on_meta`.

    Returns the model (``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for
    vision-language architectures, unless ``model_class`` is given) with every non-expert weight
    loaded on ``device`` and every MoE layer's routed experts on ``meta``; nothing of the experts
    was read from disk. Extra ``kwargs`` go to ``from_pretrained`` and override the defaults;
    ``output_loading_info=True`` returns ``(model, info)`` as transformers does. transformers'
    own load report is silenced; missing, mismatched or unexpected non-expert keys are logged as
    one warning on the ``kt_models.loading`` logger.
    """
    load_kwargs = from_pretrained_kwargs(path, device=device, dtype=dtype)
    want_info = bool(kwargs.pop("output_loading_info", False))
    load_kwargs.update(kwargs)
    config = load_kwargs["config"]
    spec = get_arch_spec(config)
    cls = model_class or auto_model_class(config)
    from transformers.utils import logging as hf_logging

    # transformers lists the skipped expert tensors as "unexpected" in its load report; report
    # ourselves, leaving them out, so that a real problem is not lost among them.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with experts_on_meta(spec), _captured_load_report() as reports:
            try:
                model, info = cls.from_pretrained(
                    str(path), output_loading_info=True, **load_kwargs
                )
            except RuntimeError as exc:
                # transformers refers to its (silenced) report: raise with the report itself
                if "above report" not in str(exc) or not reports:
                    raise
                raise TensorShapeError(
                    f"the checkpoint's tensors do not fit the model built from its config (a "
                    f"config / checkpoint mismatch, e.g. in the number of experts or a hidden "
                    f"size); transformers' load report:\n{reports[-1]}",
                    path=path,
                ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    prefixes = _expert_prefixes(spec, config)
    info["unexpected_keys"] = {
        k for k in info.get("unexpected_keys", ()) if not k.startswith(prefixes)
    }
    problems = {
        name: sorted(info.get(name) or ())
        for name in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    }
    problems = {name: value for name, value in problems.items() if value}
    if problems:
        _LOG.warning(
            "loading %s: %s",
            path,
            "; ".join(
                f"{name}: {', '.join(map(str, value[:10]))}"
                + (f" (+{len(value) - 10} more)" if len(value) > 10 else "")
                for name, value in problems.items()
            ),
        )
    return (model, info) if want_info else model


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextmanager
def _captured_load_report() -> Iterator[list[str]]:
    """Collect transformers' load report (logged by ``transformers.modeling_utils``) instead of
    printing it; yields the list the reports (ANSI colours removed) are appended to."""
    reports: list[str] = []
    log = logging.getLogger("transformers.modeling_utils")

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "LOAD REPORT" in message:
                reports.append(_ANSI.sub("", message))

    handler = _Collect(logging.WARNING)
    level, propagate = log.level, log.propagate
    log.setLevel(logging.WARNING)
    log.propagate = False
    log.addHandler(handler)
    try:
        yield reports
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def _expert_prefixes(spec: ArchSpec, config: Any) -> tuple[str, ...]:
    out = []
    for layer in spec.moe_layer_indices(config):
        out.append(f"{spec.layers_path}.{layer}.{spec.moe_block_attr}.{spec.experts_attr}.")
        out.append(spec.checkpoint_experts_prefix(layer) + ".")
        if spec.checkpoint_fused_names is not None:
            out.extend(spec.checkpoint_fused_key(layer, w) for w in ("gate_up", "down"))
    return tuple(out)
