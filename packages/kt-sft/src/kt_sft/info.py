"""Environment report: package versions, CPU features, engine ISA, threads."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

__all__ = ["collect_info", "format_info"]

_PACKAGES = ("kt-kernels", "kt-models", "kt-sft", "kt-accelerate", "torch", "transformers",
             "peft", "accelerate")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info() -> dict[str, Any]:
    """Return a dict describing this installation and machine."""
    from kt_sft._lib import kt_kernels as kk

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "cpu_features": kk.cpu_features(),
        "physical_cores": kk.physical_core_count(),
    }
    for name in ("available_isas", "active_isa", "default_num_threads", "numa_nodes",
                 "self_test_status"):
        fn = getattr(kk, name, None)
        if callable(fn):
            info[name] = fn()
    import torch

    info["torch_threads"] = torch.get_num_threads()
    return info


def format_info(info: dict[str, Any]) -> str:
    """Render collect_info() as aligned text."""
    lines = [f"python          {info['python']}", f"platform        {info['platform']}"]
    lines.append("packages:")
    for name, ver in info["versions"].items():
        lines.append(f"  {name:<14}{ver or 'not installed'}")
    on = [k for k, v in info["cpu_features"].items() if v]
    off = [k for k, v in info["cpu_features"].items() if not v]
    lines.append(f"cpu features    {' '.join(on) or '-'}")
    lines.append(f"missing         {' '.join(off) or '-'}")
    lines.append(f"physical cores  {info['physical_cores']}")
    for key in ("available_isas", "active_isa", "self_test_status", "default_num_threads",
                "numa_nodes", "torch_threads"):
        if key in info:
            value = info[key]
            if isinstance(value, (list, tuple)):
                value = " ".join(map(str, value))
            lines.append(f"{key.replace('_', ' '):<16}{value}")
    return "\n".join(lines)
