"""kt's distributed mode: who is where (:class:`Topology`), its process groups and settings
(:class:`DistributedContext`), and the one context of a process (:func:`init_distributed`,
:func:`current_context`, :func:`shutdown`). See :mod:`kt_sft.distributed`."""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DEFAULT_TIMEOUT",
    "ENV_VARS",
    "PLACEMENTS",
    "DistributedContext",
    "KTDistributedError",
    "Topology",
    "current_context",
    "default_backend",
    "init_distributed",
    "reduction_device",
    "resolve_settings",
    "shutdown",
]

PLACEMENTS = ("per_node", "per_rank")
DEFAULT_TIMEOUT = 1800.0

#: setting -> environment variable that supplies its default.
ENV_VARS = {"placement": "KT_ENGINE_PLACEMENT", "timeout": "KT_DIST_TIMEOUT"}


class KTDistributedError(RuntimeError):
    """A distributed kt operation failed: a peer crashed or timed out, or ranks diverged."""


# ---------------------------------------------------------------------------------------------
# topology


@dataclass(frozen=True)
class Topology:
    """Who is where: ``nodes[i]`` lists the global ranks of node ``i`` (its leader first)."""

    rank: int
    world_size: int
    nodes: tuple[tuple[int, ...], ...]
    placement: str

    @property
    def node_index(self) -> int:
        return next(i for i, ranks in enumerate(self.nodes) if self.rank in ranks)

    @property
    def node_ranks(self) -> tuple[int, ...]:
        return self.nodes[self.node_index]

    @property
    def leader(self) -> int:
        """Global rank of this process's node leader."""
        return self.node_ranks[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def leaders(self) -> tuple[int, ...]:
        return tuple(ranks[0] for ranks in self.nodes)

    @property
    def local_rank(self) -> int:
        return self.node_ranks.index(self.rank)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (saved with checkpoints to detect a changed layout on resume)."""
        return {
            "world_size": self.world_size,
            "num_nodes": len(self.nodes),
            "ranks_per_node": [len(r) for r in self.nodes],
            "placement": self.placement,
        }


def _node_keys(node_rank: int | None) -> list[Any]:
    """Every rank's node key, gathered over the world (same key = same node)."""
    import torch.distributed as dist

    if node_rank is not None:
        key: Any = ("node", int(node_rank))
    elif os.environ.get("GROUP_RANK", "").strip():
        key = ("node", int(os.environ["GROUP_RANK"]))
    else:
        key = ("host", socket.gethostname())
    keys: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    return keys


def _topology(placement: str, node_rank: int | None) -> Topology:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if placement == "per_rank":
        nodes = tuple((r,) for r in range(world))
    else:
        keys = _node_keys(node_rank)
        kinds = {k[0] for k in keys}
        if len(kinds) > 1:
            raise KTDistributedError(
                "some ranks know their node rank (GROUP_RANK) and others do not; launch every "
                "process the same way (torchrun / accelerate launch set GROUP_RANK)"
            )
        grouped: dict[Any, list[int]] = {}
        for r, k in enumerate(keys):
            grouped.setdefault(k, []).append(r)
        nodes = tuple(sorted((tuple(v) for v in grouped.values()), key=lambda t: t[0]))
    return Topology(rank=rank, world_size=world, nodes=nodes, placement=placement)


# ---------------------------------------------------------------------------------------------
# the context


class DistributedContext:
    """Process groups and settings of kt's distributed mode (one per process).

    Create it with :func:`init_distributed` (or let :func:`current_context` create it from the
    environment); every rank must do so, since creating process groups is collective.
    """

    def __init__(self, *, placement: str, timeout: float, node_rank: int | None = None) -> None:
        import torch.distributed as dist

        self.placement = placement
        self.timeout = float(timeout)
        self.topology = _topology(placement, node_rank)
        td = datetime.timedelta(seconds=self.timeout)
        self._reduce_device = reduction_device(str(dist.get_backend()))
        cpu_only = self._reduce_device.type == "cpu"
        # Token exchange: host tensors (the engine's side), so gloo; one group per node.
        # Gradient reduction: on the gradients' device, so the default backend.
        self._exchange_group: Any = None
        self._node_group: Any = None
        self._leaders_group: Any = None
        # Creating a group is collective over the world: every rank creates every group, in
        # the same order; one-rank nodes (and a single leader) need none.
        for ranks in self.topology.nodes:
            if len(ranks) == 1:
                continue
            group = dist.new_group(list(ranks), timeout=td, backend="gloo")
            red = group if cpu_only else dist.new_group(list(ranks), timeout=td)
            if self.topology.rank in ranks:
                self._exchange_group, self._node_group = group, red
        leaders = list(self.topology.leaders)
        if len(leaders) > 1:
            group = dist.new_group(leaders, timeout=td, backend=None if not cpu_only else "gloo")
            if self.topology.is_leader:
                self._leaders_group = group
        self._world_group = dist.new_group(
            list(range(self.topology.world_size)),
            timeout=td,
            backend=None if not cpu_only else "gloo",
        )
        self._next_index = 0
        self._lock = threading.Lock()
        self.closed = False
        atexit.register(_destroy_groups_at_exit, self)

    # -- layers ---------------------------------------------------------------------------
    @property
    def exchanges_tokens(self) -> bool:
        """Whether this process's node has more than one rank (tokens travel to the leader)."""
        return len(self.topology.node_ranks) > 1

    def next_layer_index(self) -> int:
        """A new layer's number (every rank creates its layers in the same order)."""
        with self._lock:
            index = self._next_index
            self._next_index += 1
        return index

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Forget the process groups (the default group stays)."""
        import torch.distributed as dist

        if self.closed:
            return
        self.closed = True
        if not dist.is_initialized():
            return
        seen: set[int] = set()
        for group in (
            self._exchange_group,
            self._node_group,
            self._leaders_group,
            self._world_group,
        ):
            if group is not None and id(group) not in seen:
                seen.add(id(group))
                try:
                    dist.destroy_process_group(group)
                except (RuntimeError, ValueError):  # pragma: no cover - already gone
                    pass

    def __repr__(self) -> str:
        t = self.topology
        return (
            f"DistributedContext(rank={t.rank}, world_size={t.world_size}, "
            f"nodes={[list(n) for n in t.nodes]}, placement={self.placement!r}, "
            f"timeout={self.timeout:g}s)"
        )


def _destroy_groups_at_exit(context: DistributedContext) -> None:
    """Destroys kt's groups and the default group while the interpreter is still whole.

    A process that exits with a live gloo group can abort ("terminate called without an active
    exception") when gloo's worker threads release their last tensors during interpreter
    finalization; destroying the groups first avoids it. Registered after the default group was
    created, so this runs before any exit handler of the code that created it.
    """
    import torch.distributed as dist

    context.close()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):  # pragma: no cover - already gone
            pass
    # A group object that FSDP2's device mesh still holds keeps its gloo worker threads; one
    # that just finished a collective drops the work's tensors, which takes the GIL. Seen as
    # an abort in a core dump when that came after finalization had begun: give those threads
    # the GIL for a moment while the interpreter is still whole.
    time.sleep(0.2)


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend(device: torch.device | str | None = None) -> str:
    """The ``torch.distributed`` backend for a process whose model runs on ``device``:
    ``"nccl"`` for a CUDA device (when this torch has NCCL), ``"gloo"`` otherwise. ``None``
    means CUDA when it is available, else the CPU."""
    import torch.distributed as dist

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def reduction_device(backend: str) -> torch.device:
    """Where tensors must be for collectives of the process group ``backend`` (a name as
    ``dist.get_backend()`` returns it): the CPU for gloo and MPI, the current CUDA device for
    NCCL (``"cuda:nccl,cpu:gloo"`` included)."""
    name = backend.lower()
    if "nccl" in name:
        if not torch.cuda.is_available():
            raise KTDistributedError(
                f"the process group uses {backend!r} but torch sees no CUDA device; start it "
                "with gloo on machines without GPUs (kt_sft.distributed.default_backend())"
            )
        return torch.device("cuda", torch.cuda.current_device())
    if name in ("gloo", "mpi") or name.startswith(("cpu:", "gloo")):
        return torch.device("cpu")
    return _default_device()


_CONTEXT: DistributedContext | None = None
_CONTEXT_LOCK = threading.Lock()


def _env_placement() -> str | None:
    raw = os.environ.get(ENV_VARS["placement"], "").strip().lower()
    return raw or None


def _env_timeout() -> float | None:
    raw = os.environ.get(ENV_VARS["timeout"], "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_VARS['timeout']} must be a number of seconds, got {raw!r}") from exc


def _check_settings(placement: str, timeout: float) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")


def _is_multiprocess() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_settings(
    *, placement: str | None = None, timeout: float | None = None
) -> tuple[str, float]:
    """``(placement, timeout)`` with the ``KT_*`` environment and the defaults applied, checked
    (``ValueError`` for bad values)."""
    placement = placement if placement is not None else (_env_placement() or "per_node")
    timeout = float(timeout) if timeout is not None else (_env_timeout() or DEFAULT_TIMEOUT)
    _check_settings(placement, timeout)
    return placement, timeout


def init_distributed(
    *, placement: str | None = None, timeout: float | None = None, node_rank: int | None = None
) -> DistributedContext | None:
    """Start kt's distributed mode (collective: call it on every rank, before wrapping).

    Needs ``torch.distributed`` initialised (accelerate, the HF Trainer or
    ``init_process_group`` do that). Returns ``None`` for a single process. Calling it again with
    the same settings returns the existing context; different settings are an error once layers
    exist (the engines are placed already).
    """
    global _CONTEXT
    placement, timeout = resolve_settings(placement=placement, timeout=timeout)
    if not _is_multiprocess():
        return None
    with _CONTEXT_LOCK:
        ctx = _CONTEXT
        if ctx is not None and not ctx.closed:
            if ctx.placement == placement and ctx.timeout == timeout:
                return ctx
            if ctx._next_index > 0:
                raise KTDistributedError(
                    f"kt's distributed mode already runs with placement={ctx.placement!r}, "
                    f"timeout={ctx.timeout:g}s and models were wrapped under it; set "
                    f"placement={placement!r}, timeout={timeout:g}s before wrapping the model "
                    "(kt_accelerate.wrap_model / load_model do it in the right order)"
                )
            ctx.close()
        _CONTEXT = DistributedContext(placement=placement, timeout=timeout, node_rank=node_rank)
        return _CONTEXT


def current_context(*, create: bool = True) -> DistributedContext | None:
    """The active context; with ``create`` one is started from the ``KT_*`` environment when
    ``torch.distributed`` runs several processes and none is active yet."""
    ctx = _CONTEXT
    if ctx is not None and not ctx.closed:
        import torch.distributed as dist

        if dist.is_initialized():
            return ctx
    if not create or not _is_multiprocess():
        return None
    return init_distributed()


def shutdown() -> None:
    """End kt's distributed mode (its process groups); models wrapped under it stop working."""
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is not None:
            _CONTEXT.close()
        _CONTEXT = None
