"""Resolve registry paths on a model's module tree.

Paths are dotted attribute names relative to the causal-LM module (``"model.layers"``); integer
components index into ``nn.ModuleList``/``nn.Sequential``. PEFT wrappers are looked through, so
the same path works on a bare ``...ForCausalLM`` and on the ``PeftModel`` built around it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kt_models.errors import ModulePathError

__all__ = ["resolve_path", "try_resolve_path", "unwrap_model"]


def _is_transformers_model(obj: Any) -> bool:
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
        for cls in type(obj).__mro__
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside PEFT (and similar) wrappers.

    A ``PeftModel`` is unwrapped with its ``get_base_model()``; a bare tuner (``LoraModel``) keeps
    the wrapped model in ``.model``. Other modules are returned unchanged. peft is not imported.
    """
    seen: set[int] = set()
    current = model
    while id(current) not in seen:
        seen.add(id(current))
        getter = getattr(type(current), "get_base_model", None)
        if callable(getter):
            inner = current.get_base_model()
            if isinstance(inner, nn.Module) and inner is not current:
                current = inner
                continue
        # A PEFT tuner (BaseTuner) owns the wrapped transformers model as ``.model`` and declares
        # a ``peft_config`` (a transformers model with an adapter loaded has both too, but is
        # already the model we want).
        inner = getattr(current, "model", None)
        if (
            not _is_transformers_model(current)
            and hasattr(current, "peft_config")
            and isinstance(inner, nn.Module)
        ):
            current = inner
            continue
        break
    return current


def _step(obj: Any, part: str) -> Any:
    if part.lstrip("-").isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential, list, tuple)):
        return obj[int(part)]
    return getattr(obj, part)


def resolve_path(root: Any, path: str) -> Any:
    """Follow the dotted ``path`` from ``root``.

    Raises:
        ModulePathError: a component is missing; the message names the component, the path
            prefix that did resolve, and the type found there.
    """
    if path == "":
        return root
    obj = root
    done: list[str] = []
    for part in path.split("."):
        try:
            obj = _step(obj, part)
        except (AttributeError, IndexError, TypeError) as exc:
            where = ".".join(done) or "<root>"
            raise ModulePathError(
                f"path {path!r} does not resolve on {type(root).__name__}: {where} "
                f"({type(obj).__name__}) has no {part!r}"
            ) from exc
        done.append(part)
    return obj


def try_resolve_path(root: Any, path: str) -> Any | None:
    """Like :func:`resolve_path` but returns ``None`` when the path does not resolve."""
    try:
        return resolve_path(root, path)
    except ModulePathError:
        return None
