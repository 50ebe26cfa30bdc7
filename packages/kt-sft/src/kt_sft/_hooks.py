"""Register kt's ``"kt"`` experts implementation as soon as transformers' MoE integration loads.

``import kt_sft`` must stay light (no torch, transformers or accelerate), yet
``from_pretrained(..., experts_implementation="kt")`` needs ``"kt"`` in transformers' registry.
If ``transformers.integrations.moe`` is loaded already, kt registers at once; otherwise a
one-shot import hook registers right after that module executes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

__all__ = ["install"]

_TARGET = "transformers.integrations.moe"


def _register(module: ModuleType) -> None:
    # Only the registry entry: PEFT and the rest wait for kt_sft.install.ensure_installed,
    # since transformers may be half-imported here.
    from kt_sft.install import register_experts_implementation

    register_experts_implementation(module)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._inner, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _register(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                _uninstall()
                spec.loader = _Loader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if transformers' MoE module is loaded, else when it gets imported."""
    module = sys.modules.get(_TARGET)
    if module is not None:
        _register(module)
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
