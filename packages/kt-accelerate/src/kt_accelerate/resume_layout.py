"""The process layout a checkpoint was written under, and the check made when resuming.

Every kt checkpoint (``Trainer`` ``save_steps`` folders, ``Accelerator.save_state`` folders)
gets a small ``kt_layout.json``: world size, nodes, ranks per node, engine placement. The model
state itself (the PEFT adapter, identical on every rank) does not depend on the layout, but the
global batch does (per-device batch × world size), and so does the data order after resuming:
a run resumed with another number of processes does not continue the one that was saved. So a
different world size is an error unless ``KTransformersPlugin(allow_world_size_change=True)``,
which turns it into a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from kt_sft import distributed as kt_distributed

__all__ = [
    "LAYOUT_FILE",
    "KTResumeError",
    "check_layout",
    "current_layout",
    "saved_model_keys",
    "write_layout",
]

LAYOUT_FILE = "kt_layout.json"


class KTResumeError(ValueError):
    """A checkpoint cannot be resumed under the current process layout."""


def current_layout() -> dict[str, Any]:
    """The layout of this run (one process when torch.distributed is not running)."""
    ctx = kt_distributed.current_context(create=False)
    if ctx is not None:
        return ctx.topology.describe()
    world = 1
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return {"world_size": world, "num_nodes": 1, "ranks_per_node": [world], "placement": "per_node"}


def write_layout(directory: str | os.PathLike[str]) -> Path:
    """Write ``kt_layout.json`` into ``directory`` (atomically; call on the main process)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    target = path / LAYOUT_FILE
    tmp = path / f".{LAYOUT_FILE}.tmp"
    tmp.write_text(json.dumps(current_layout(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def check_layout(
    directory: str | os.PathLike[str], *, allow_world_size_change: bool = False
) -> dict[str, Any] | None:
    """Compare the layout saved in ``directory`` with this run's; returns the saved layout
    (``None`` for a checkpoint without one, e.g. written without kt).

    Raises:
        KTResumeError: the world size differs and ``allow_world_size_change`` is False.
    """
    target = Path(directory) / LAYOUT_FILE
    if not target.is_file():
        return None
    saved = json.loads(target.read_text(encoding="utf-8"))
    now = current_layout()
    if saved.get("world_size") != now["world_size"]:
        message = (
            f"checkpoint {str(directory)!r} was saved by {saved.get('world_size')} process(es) "
            f"({saved.get('num_nodes')} node(s)) but this run has {now['world_size']} "
            f"({now['num_nodes']} node(s)): the global batch size and the data order would "
            "change, so the resumed run would not continue the saved one. Resume with "
            f"{saved.get('world_size')} processes, or set "
            "KTransformersPlugin(allow_world_size_change=True) "
            "(ACCELERATE_KT_ALLOW_WORLD_SIZE_CHANGE=true) to continue anyway: the adapter and "
            "optimizer state load fine, only the batches differ"
        )
        if not allow_world_size_change:
            raise KTResumeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return saved


def saved_model_keys(directory: str | os.PathLike[str], index: int) -> set[str] | None:
    """The state-dict keys of model ``index`` in an ``Accelerator.save_state`` folder (``None``
    when there is no such file)."""
    suffix = f"_{index}" if index > 0 else ""
    folder = Path(directory)
    safe = folder / f"model{suffix}.safetensors"
    if safe.is_file():
        from safetensors import safe_open

        with safe_open(str(safe), framework="pt") as f:
            return set(f.keys())
    pickled = folder / f"pytorch_model{suffix}.bin"
    if pickled.is_file():
        import torch

        return set(torch.load(pickled, map_location="cpu", weights_only=True))
    return None
