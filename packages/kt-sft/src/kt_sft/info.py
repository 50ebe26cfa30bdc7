"""Environment report (`kt-sft info`): versions, CPU features, the engine's ISA and its self-test,
threads, NUMA nodes, accelerators."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import warnings
from pathlib import Path
from typing import Any

__all__ = ["collect_info", "format_info"]

_PACKAGES = (
    "kt-kernels",
    "kt-models",
    "kt-sft",
    "kt-accelerate",
    "torch",
    "transformers",
    "peft",
    "accelerate",
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _numa_nodes(kk: Any) -> list[dict[str, Any]]:
    fn = getattr(kk, "numa_nodes", None)
    if callable(fn):
        nodes = fn()
        if isinstance(nodes, int):
            return [{"node": i} for i in range(nodes)]
        return [n if isinstance(n, dict) else {"node": n} for n in nodes]
    root = Path("/sys/devices/system/node")
    nodes = []
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpus = (d / "cpulist").read_text().strip() if (d / "cpulist").is_file() else ""
        nodes.append({"node": int(d.name[4:]), "cpus": cpus})
    return nodes or [{"node": 0, "cpus": f"0-{(os.cpu_count() or 1) - 1}"}]


def _isa_and_self_test(kk: Any) -> dict[str, Any]:
    """The ISA a new engine uses and whether its kernels passed the self-test against the scalar
    reference (choosing the ISA runs the test; a failure falls back and warns)."""
    out: dict[str, Any] = {}
    if not callable(getattr(kk, "active_isa", None)):
        return out
    out["available_isas"] = list(kk.available_isas())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["active_isa"] = kk.active_isa()
    problems = [str(w.message) for w in caught]
    status = getattr(kk, "self_test_status", None)
    if callable(status):
        try:
            detail = status(out["active_isa"])
        except TypeError:
            detail = status()
        out["self_test"] = str(detail)
    else:
        out["self_test"] = "passed" if not problems else "failed"
    if problems:
        out["self_test_warnings"] = problems
    requested = os.environ.get("KT_KERNELS_ISA")
    if requested:
        out["requested_isa"] = requested
    return out


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
    info.update(_isa_and_self_test(kk))
    if callable(getattr(kk, "default_thread_count", None)):
        info["engine_threads"] = kk.default_thread_count()
    if os.environ.get("KT_NUM_THREADS"):
        info["KT_NUM_THREADS"] = os.environ["KT_NUM_THREADS"]
    info["numa_nodes"] = _numa_nodes(kk)
    info["engine_available"] = hasattr(kk, "MoEEngine")
    import torch

    info["torch_threads"] = torch.get_num_threads()
    info["cuda"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
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
    if "available_isas" in info:
        lines.append(f"available isas  {' '.join(info['available_isas'])}")
        chosen = info["active_isa"]
        if info.get("requested_isa"):
            chosen += f" (KT_KERNELS_ISA={info['requested_isa']})"
        lines.append(f"engine isa      {chosen}")
        lines.append(f"self-test       {info['self_test']}")
        for w in info.get("self_test_warnings", []):
            lines.append(f"  warning: {w}")
    if "engine_threads" in info:
        extra = f" (KT_NUM_THREADS={info['KT_NUM_THREADS']})" if "KT_NUM_THREADS" in info else ""
        lines.append(f"engine threads  {info['engine_threads']}{extra}")
    nodes = info["numa_nodes"]
    desc = ", ".join(
        f"node {n['node']}" + (f": cpus {n['cpus']}" if n.get("cpus") else "") for n in nodes
    )
    lines.append(f"numa nodes      {len(nodes)} ({desc})")
    lines.append(f"torch threads   {info['torch_threads']}")
    lines.append(f"cuda            {', '.join(info['cuda']) or 'none (CPU only)'}")
    if not info.get("engine_available", True):
        lines.append("note            this kt-kernels build has no MoEEngine; rebuild kt-kernels")
    return "\n".join(lines)
