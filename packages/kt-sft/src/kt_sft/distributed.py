"""Several training processes, one engine per node (DESIGN §6, "Distributed").

Within a node, the *leader* (the node's lowest global rank, local rank 0 under torchrun) holds the
engine and the packed expert weights. Every other rank of the node (a *member*) sends the tokens
of each routed-experts call to its leader and receives the outputs; in backward it sends the
output gradients and receives the input and routing-weight gradients. The leader runs one engine
call on the tokens of the whole node (its own rows first, then each member's, in rank order), so
the expert LoRA gradients of the node accumulate in the leader's buffers. Token counts may differ
per rank and may be zero.

Across nodes every leader holds a replica. Before the optimizer step,
:func:`reduce_expert_lora_grads` all-reduces the expert LoRA gradients among the leaders and
hands the result to the members, so every rank holds the same averaged gradient (the one DDP
would compute: the mean over ranks, matching DDP's averaging of the other parameters). Gradient
clipping and the optimizer step then see identical values everywhere and all replicas stay equal.
The expert LoRA parameters are not DDP's business (their gradients are written by the engine,
not by autograd): :func:`ignore_expert_lora_in_ddp` removes them from DDP's view and
:func:`broadcast_expert_lora` makes them equal on all ranks at the start.

Under FSDP2 the same parameters, plus the empty placeholders of the engine-held expert weights
(:func:`kt_managed_parameters`), are left out of sharding and synchronised the same way. Loops
without DDP (``kt-sft train`` on several processes) sum the other gradients with
:func:`all_reduce_gradients` and start from rank 0's values with :func:`broadcast_parameters`.

Backends: NCCL for processes whose model runs on a GPU, gloo otherwise (:func:`default_backend`);
token exchanges always use gloo groups (host memory, the engine's side), gradient reductions the
default group on :func:`reduction_device` (the current GPU under NCCL).

The seam into kt-sft is :func:`kt_sft.backend.create_backend`: while a
:class:`DistributedContext` is active it hands each layer a :class:`LeaderBackend` (wrapping the
real engine) or a :class:`MemberBackend` (no engine, no weights), both with the engine's API, so
:class:`~kt_sft.engine.LayerEngine` and the autograd function do not change.

Every rank calls the layers in the same order (same model, same program), so the exchanges of
one node line up; each exchange first compares (layer, phase, dtype) across the node and raises
:class:`KTDistributedError` when ranks are out of step, instead of exchanging wrong tensors. A
peer that dies makes the others fail at their next exchange (the connection closes); a peer that
hangs makes them fail after ``timeout`` seconds. Both errors name the layer and the ranks.

Settings (explicit argument > environment variable > default):

* ``placement`` — ``KT_ENGINE_PLACEMENT``: ``"per_node"`` (default; one engine per node) or
  ``"per_rank"`` (every rank its own engine: more memory, no token exchange).
* ``timeout`` — ``KT_DIST_TIMEOUT``: seconds a rank waits for a peer (default 1800, torch's own
  default for process groups).
* ``node_rank`` — which node this process is on: torchrun's ``GROUP_RANK``, else the host name.

This module imports only torch; kt-accelerate configures it from its plugin.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ENV_VARS",
    "PLACEMENTS",
    "DistributedContext",
    "KTDistributedError",
    "LeaderBackend",
    "MemberBackend",
    "Topology",
    "all_reduce_gradients",
    "broadcast_expert_lora",
    "broadcast_parameters",
    "current_context",
    "default_backend",
    "expert_lora_parameters",
    "ignore_expert_lora_in_ddp",
    "init_distributed",
    "kt_managed_parameters",
    "reduce_expert_lora_grads",
    "reduction_device",
    "resolve_settings",
    "shutdown",
]

PLACEMENTS = ("per_node", "per_rank")
DEFAULT_TIMEOUT = 1800.0

#: setting -> environment variable that supplies its default.
ENV_VARS = {"placement": "KT_ENGINE_PLACEMENT", "timeout": "KT_DIST_TIMEOUT"}

# Message tags of one exchange (gloo matches sends and receives by source and tag).
_TAG_X, _TAG_IDS, _TAG_W, _TAG_OUT, _TAG_GRAD, _TAG_DX, _TAG_DW = range(1, 8)
_FORWARD, _BACKWARD = 0, 1
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


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

    # -- backends -------------------------------------------------------------------------
    @property
    def exchanges_tokens(self) -> bool:
        """Whether this process's node has more than one rank (tokens travel to the leader)."""
        return len(self.topology.node_ranks) > 1

    def make_backend(
        self, factory: Callable[[], Any], *, top_k: int, hidden_size: int, name: str = ""
    ) -> Any:
        """The backend of one layer: ``factory()`` (the real engine) on the leader, wrapped to
        serve the node's members; a :class:`MemberBackend` elsewhere. Collective in order:
        every rank creates its layers in the same order."""
        with self._lock:
            index = self._next_index
            self._next_index += 1
        if not self.exchanges_tokens:
            return factory()
        if self.topology.is_leader:
            return LeaderBackend(
                self, factory(), index=index, top_k=top_k, hidden_size=hidden_size, name=name
            )
        return MemberBackend(self, index=index, top_k=top_k, hidden_size=hidden_size, name=name)

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


# ---------------------------------------------------------------------------------------------
# the exchange backends


class _Exchange:
    """Shared machinery of the leader and member backends of one layer."""

    #: Every rank of the node must make each call, even with no tokens (kt_sft.function).
    collective = True

    def __init__(
        self, ctx: DistributedContext, *, index: int, top_k: int, hidden_size: int, name: str
    ) -> None:
        self.ctx = ctx
        self.index = index
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.name = name or f"MoE layer #{index}"
        self.group = ctx._exchange_group
        self.ranks = ctx.topology.node_ranks
        self.leader = ctx.topology.leader
        self.rank = ctx.topology.rank
        #: Token counts per node rank of each forward cached for backward (LIFO).
        self._stack: list[list[int]] = []

    # -- helpers --------------------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException) -> KTDistributedError:
        others = [r for r in self.ranks if r != self.rank]
        return KTDistributedError(
            f"kt distributed: rank {self.rank} (node {self.ctx.topology.node_index}, leader "
            f"rank {self.leader}) failed during the {what} of {self.name} with rank(s) "
            f"{others}: {exc}. A peer process probably crashed or is stuck (peers are waited "
            f"for {self.ctx.timeout:g}s, KT_DIST_TIMEOUT); see the other ranks' logs"
        )

    def _meta(self, phase: int, tokens: int, dtype: torch.dtype, save: bool) -> list[int]:
        """All-gather (tokens, layer, phase, dtype, save) over the node; check they agree."""
        import torch.distributed as dist

        what = "forward" if phase == _FORWARD else "backward"
        mine = torch.tensor(
            [tokens, self.index, phase, _DTYPE_CODES.get(dtype, 9), int(save)], dtype=torch.int64
        )
        rows = [torch.empty_like(mine) for _ in self.ranks]
        try:
            dist.all_gather(rows, mine, group=self.group)
        except Exception as exc:
            raise self._fail(f"{what} exchange", exc) from exc
        for rank, row in zip(self.ranks, rows):
            if row[1:].tolist() != mine[1:].tolist():
                theirs = "forward" if row[2] == _FORWARD else "backward"
                raise KTDistributedError(
                    f"kt distributed: ranks out of step: rank {self.rank} runs the {what} of "
                    f"{self.name} (layer #{self.index}, cache={bool(save)}) while rank {rank} runs "
                    f"the {theirs} of layer #{int(row[1])} (cache={bool(row[4])}, dtype code "
                    f"{int(row[3])}); every rank must run the same model the same way (same "
                    "layers, gradient checkpointing, train/eval mode)"
                )
        return [int(r[0]) for r in rows]

    def _wait(self, works: Iterable[Any], what: str) -> None:
        try:
            for work in works:
                work.wait()
        except Exception as exc:
            raise self._fail(what, exc) from exc

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int) -> Any:
        import torch.distributed as dist

        return dist.isend(tensor, dst=dst, group=self.group, tag=tag)

    def _irecv(self, tensor: torch.Tensor, src: int, tag: int) -> Any:
        import torch.distributed as dist

        return dist.irecv(tensor, src=src, group=self.group, tag=tag)

    # -- engine API shared parts ----------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        routing_weights: torch.Tensor,
        out: torch.Tensor,
        save_for_backward: bool = True,
    ) -> None:
        self.submit_forward(x, expert_ids, routing_weights, out, save_for_backward)
        self.sync_forward()

    def submit_forward(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        routing_weights: torch.Tensor,
        out: torch.Tensor,
        save_for_backward: bool = True,
    ) -> None:
        raise NotImplementedError

    def sync_forward(self) -> None:
        raise NotImplementedError

    @property
    def cache_depth(self) -> int:
        return len(self._stack)


class LeaderBackend(_Exchange):
    """The engine of a node, serving the tokens of every rank of the node.

    Offers the engine API (``load_weights``, ``set_lora``, ``lora_updated``, ``forward``,
    ``submit_forward``/``sync_forward``, ``backward``, ``clear_cache``, ``close``); other
    attributes come from the wrapped engine. A forward dropped without its backward is popped
    by :class:`~kt_sft.engine.LayerEngine` with a zero-gradient backward, which every rank of
    the node makes too, so it is exchanged like any other.
    """

    def __init__(self, ctx: DistributedContext, inner: Any, **kwargs: Any) -> None:
        super().__init__(ctx, **kwargs)
        self.inner = inner
        self._pending: tuple[torch.Tensor, torch.Tensor, list[int], bool] | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (during __init__): avoid recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- weights / LoRA: the leader's engine holds them -----------------------------------
    def load_weights(self, **arrays: torch.Tensor) -> None:
        self.inner.load_weights(**arrays)

    def set_lora(self, **arrays: torch.Tensor) -> None:
        self.inner.set_lora(**arrays)

    def lora_updated(self) -> None:
        self.inner.lora_updated()

    # -- compute --------------------------------------------------------------------------
    def _offsets(self, sizes: list[int]) -> list[int]:
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        return offsets

    def submit_forward(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        routing_weights: torch.Tensor,
        out: torch.Tensor,
        save_for_backward: bool = True,
    ) -> None:
        sizes = self._meta(_FORWARD, x.shape[0], x.dtype, save_for_backward)
        off = self._offsets(sizes)
        total = off[-1]
        H, K = self.hidden_size, self.top_k
        xs = torch.empty(total, H, dtype=x.dtype)
        ids = torch.empty(total, K, dtype=torch.int64)
        ws = torch.empty(total, K, dtype=torch.float32)
        xs[: sizes[0]].copy_(x)
        ids[: sizes[0]].copy_(expert_ids)
        ws[: sizes[0]].copy_(routing_weights)
        works = []
        for i, src in enumerate(self.ranks[1:], start=1):
            if sizes[i]:
                rows = slice(off[i], off[i + 1])
                works += [
                    self._irecv(xs[rows], src, _TAG_X),
                    self._irecv(ids[rows], src, _TAG_IDS),
                    self._irecv(ws[rows], src, _TAG_W),
                ]
        self._wait(works, "forward exchange (receiving tokens)")
        outs = torch.empty(total, H, dtype=torch.float32)
        if total:
            self.inner.submit_forward(xs, ids, ws, outs, save_for_backward=save_for_backward)
        self._pending = (outs, out, sizes, total > 0)
        if save_for_backward:
            self._stack.append(sizes)

    def sync_forward(self) -> None:
        assert self._pending is not None, "sync_forward without submit_forward"
        outs, out, sizes, submitted = self._pending
        self._pending = None
        if submitted:
            self.inner.sync_forward()
        off = self._offsets(sizes)
        out.copy_(outs[: sizes[0]])
        works = [
            self._isend(outs[off[i] : off[i + 1]], dst, _TAG_OUT)
            for i, dst in enumerate(self.ranks[1:], start=1)
            if sizes[i]
        ]
        self._wait(works, "forward exchange (returning outputs)")

    def backward(
        self, grad_out: torch.Tensor, grad_input: torch.Tensor, grad_routing_weights: torch.Tensor
    ) -> None:
        sizes = self._meta(_BACKWARD, grad_out.shape[0], torch.float32, True)
        if not self._stack:
            raise KTDistributedError(f"{self.name}: backward without a cached forward")
        cached = self._stack.pop()
        if cached != sizes:
            raise KTDistributedError(
                f"kt distributed: {self.name}: the backward brings {sizes} tokens per rank but "
                f"the forward it pops had {cached}; ranks are out of step"
            )
        off = self._offsets(sizes)
        total = off[-1]
        H, K = self.hidden_size, self.top_k
        grads = torch.empty(total, H, dtype=torch.float32)
        grads[: sizes[0]].copy_(grad_out)
        works = [
            self._irecv(grads[off[i] : off[i + 1]], src, _TAG_GRAD)
            for i, src in enumerate(self.ranks[1:], start=1)
            if sizes[i]
        ]
        self._wait(works, "backward exchange (receiving output gradients)")
        dx = torch.empty(total, H, dtype=torch.float32)
        dw = torch.empty(total, K, dtype=torch.float32)
        if total:
            self.inner.backward(grads, dx, dw)
        grad_input.copy_(dx[: sizes[0]])
        grad_routing_weights.copy_(dw[: sizes[0]])
        works = []
        for i, dst in enumerate(self.ranks[1:], start=1):
            if sizes[i]:
                works += [
                    self._isend(dx[off[i] : off[i + 1]], dst, _TAG_DX),
                    self._isend(dw[off[i] : off[i + 1]], dst, _TAG_DW),
                ]
        self._wait(works, "backward exchange (returning input gradients)")

    def clear_cache(self) -> None:
        """Drop every cached forward. Local: every rank of the node drops the same ones."""
        self._stack.clear()
        self.inner.clear_cache()

    def close(self) -> None:
        self._stack.clear()
        self.inner.close()


class MemberBackend(_Exchange):
    """A layer on a node member: no engine, no weights; calls go to the node's leader."""

    def __init__(self, ctx: DistributedContext, **kwargs: Any) -> None:
        super().__init__(ctx, **kwargs)
        self._pending: tuple[Any, int] | None = None
        self.closed = False

    def load_weights(self, **arrays: torch.Tensor) -> None:
        """Nothing to keep: the leader's engine holds the node's copy of the weights."""

    def set_lora(self, **arrays: torch.Tensor) -> None:
        """The leader binds its own LoRA tensors (all ranks hold equal values)."""

    def lora_updated(self) -> None:
        pass

    def submit_forward(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        routing_weights: torch.Tensor,
        out: torch.Tensor,
        save_for_backward: bool = True,
    ) -> None:
        T = x.shape[0]
        self._meta(_FORWARD, T, x.dtype, save_for_backward)
        if T:
            sends = [
                self._isend(x.contiguous(), self.leader, _TAG_X),
                self._isend(expert_ids.to(torch.int64).contiguous(), self.leader, _TAG_IDS),
                self._isend(routing_weights.to(torch.float32).contiguous(), self.leader, _TAG_W),
            ]
            self._wait(sends, "forward exchange (sending tokens)")
            recv = self._irecv(out, self.leader, _TAG_OUT)
        else:
            recv = None
        self._pending = (recv, T)
        if save_for_backward:
            self._stack.append([T])

    def sync_forward(self) -> None:
        assert self._pending is not None, "sync_forward without submit_forward"
        recv, _ = self._pending
        self._pending = None
        if recv is not None:
            self._wait([recv], "forward exchange (receiving outputs)")

    def backward(
        self, grad_out: torch.Tensor, grad_input: torch.Tensor, grad_routing_weights: torch.Tensor
    ) -> None:
        T = grad_out.shape[0]
        self._meta(_BACKWARD, T, torch.float32, True)
        if self._stack:
            self._stack.pop()
        if T:
            send = self._isend(grad_out.to(torch.float32).contiguous(), self.leader, _TAG_GRAD)
            self._wait([send], "backward exchange (sending output gradients)")
            recvs = [
                self._irecv(grad_input, self.leader, _TAG_DX),
                self._irecv(grad_routing_weights, self.leader, _TAG_DW),
            ]
            self._wait(recvs, "backward exchange (receiving input gradients)")

    def clear_cache(self) -> None:
        self._stack.clear()

    def close(self) -> None:
        self._stack.clear()
        self.closed = True


# ---------------------------------------------------------------------------------------------
# expert LoRA parameters: DDP, initial broadcast, gradient reduction


def expert_lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters whose gradients kt's engines write (not autograd): the expert
    LoRA bound to kt engines. kt's LoRA experts (torch modules) are not among them."""
    from kt_sft.peft import lora_parameters

    return [p for p in lora_parameters(model, include_lora_experts=False) if p.requires_grad]


def ignore_expert_lora_in_ddp(model: torch.nn.Module) -> list[str]:
    """Tell DDP (before it wraps ``model``) to leave the expert LoRA parameters alone; returns
    their names. :func:`reduce_expert_lora_grads` reduces them instead."""
    ids = {id(p) for p in expert_lora_parameters(model)}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    previous = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []) or [])
    merged = previous + [n for n in names if n not in previous]
    setter = getattr(
        torch.nn.parallel.DistributedDataParallel,
        "_set_params_and_buffers_to_ignore_for_model",
        None,
    )
    if callable(setter):
        setter(model, merged)
    else:  # pragma: no cover - the attribute DDP reads
        model._ddp_params_and_buffers_to_ignore = merged
    return names


def _buckets(tensors: list[torch.Tensor], limit: int = 1 << 26) -> Iterable[list[torch.Tensor]]:
    """Tensors grouped by (device, dtype), at most ``limit`` elements per group."""
    groups: dict[tuple[Any, Any], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for items in groups.values():
        bucket: list[torch.Tensor] = []
        count = 0
        for t in items:
            if bucket and count + t.numel() > limit:
                yield bucket
                bucket, count = [], 0
            bucket.append(t)
            count += t.numel()
        if bucket:
            yield bucket


def _collective(ctx: DistributedContext, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except KTDistributedError:
        raise
    except Exception as exc:
        t = ctx.topology
        raise KTDistributedError(
            f"kt distributed: rank {t.rank} failed during the {what}: {exc}. A peer process "
            f"probably crashed or is stuck (timeout {ctx.timeout:g}s, KT_DIST_TIMEOUT)"
        ) from exc


def broadcast_expert_lora(model: torch.nn.Module, *, src: int = 0) -> None:
    """Copy the expert LoRA values of global rank ``src`` to every rank (collective). DDP does
    this for the parameters it manages; these it does not."""
    broadcast_parameters(
        expert_lora_parameters(model), src=src, what="broadcast of the expert LoRA weights"
    )


def broadcast_parameters(
    params: Iterable[torch.Tensor], *, src: int = 0, what: str = "broadcast of parameters"
) -> None:
    """Copy the values of ``params`` on global rank ``src`` to every rank, in place
    (collective: every rank passes the same parameters in the same order). A no-op for one
    process."""
    import torch.distributed as dist

    ctx = current_context()
    if ctx is None:
        return
    for bucket in _buckets([p.data for p in params]):
        flat = torch.cat([t.reshape(-1) for t in bucket]).to(ctx._reduce_device)
        _collective(
            ctx, what, lambda flat=flat: dist.broadcast(flat, src=src, group=ctx._world_group)
        )
        flat = flat.to(bucket[0].device)
        offset = 0
        with torch.no_grad():
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def all_reduce_gradients(params: Iterable[torch.Tensor], *, average: bool = True) -> None:
    """Sum (``average``: and divide by the world size) the gradients of ``params`` over every
    rank, in place (collective: every rank passes the same parameters in the same order). A
    parameter without a gradient takes part with zeros and gets the result. For loops without
    DDP; a no-op for one process."""
    import torch.distributed as dist

    ctx = current_context()
    if ctx is None:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = ctx.topology.world_size
    for bucket in _buckets([p.grad for p in params]):
        flat = torch.cat([g.reshape(-1) for g in bucket]).to(ctx._reduce_device)
        _collective(
            ctx,
            "all-reduce of gradients",
            lambda flat=flat: dist.all_reduce(flat, group=ctx._world_group),
        )
        if average:
            flat.div_(world)
        flat = flat.to(bucket[0].device)
        offset = 0
        with torch.no_grad():
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def kt_managed_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that kt, not DDP or FSDP, looks after: the expert LoRA bound to kt
    engines (see :func:`expert_lora_parameters`) and the empty placeholders that stand for the
    expert weights the engines hold. FSDP must leave them out of sharding (``ignored_params``):
    the engines read and write them in place."""
    seen: set[int] = set()
    out: list[torch.nn.Parameter] = []
    for p in expert_lora_parameters(model):
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    for p in model.parameters():
        if getattr(p, "kt_released", False) and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _members_contribute(model: torch.nn.Module) -> bool:
    """Whether node members hold expert LoRA gradients of their own (GPU experts run in torch
    on every rank); otherwise only the leaders' are non-zero."""
    for module in model.modules():
        layer = module.__dict__.get("_kt_engine")
        if layer is not None and getattr(layer, "gpu_experts", None) is not None:
            return True
    return False


def reduce_expert_lora_grads(model: torch.nn.Module, *, average: bool = True) -> None:
    """Make every rank's expert LoRA gradients the global ones (collective; call after the last
    backward of an optimizer step, before clipping). kt-accelerate calls it for you.

    Members' share goes to their leader (when they have one), the leaders all-reduce, and each
    leader sends the sum to its members. With ``average`` the sum is divided by the world size,
    as DDP averages the other gradients.
    """
    import torch.distributed as dist

    ctx = current_context()
    if ctx is None:
        return
    t = ctx.topology
    params = expert_lora_parameters(model)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    node_size = len(t.node_ranks)
    gather_members = node_size > 1 and _members_contribute(model)
    for bucket in _buckets([p.grad for p in params]):
        flat = torch.cat([g.reshape(-1) for g in bucket]).to(ctx._reduce_device)
        if gather_members:
            _collective(
                ctx,
                "reduction of expert LoRA gradients within the node",
                lambda flat=flat: dist.reduce(flat, dst=t.leader, group=ctx._node_group),
            )
        if t.is_leader and len(t.leaders) > 1:
            _collective(
                ctx,
                "all-reduce of expert LoRA gradients among node leaders",
                lambda flat=flat: dist.all_reduce(flat, group=ctx._leaders_group),
            )
        if node_size > 1:
            _collective(
                ctx,
                "broadcast of expert LoRA gradients within the node",
                lambda flat=flat: dist.broadcast(flat, src=t.leader, group=ctx._node_group),
            )
        if average:
            flat.div_(t.world_size)
        flat = flat.to(bucket[0].device)
        offset = 0
        with torch.no_grad():
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
