"""The token exchange of a node: :class:`LeaderBackend` (the node's engine, serving every rank
of the node) and :class:`MemberBackend` (no engine; calls go to the leader), both
:class:`~kt_sft.experts_backend.ExpertsBackend`s, and :func:`place_backend`, the placement
:func:`kt_sft.install.ensure_installed` gives :mod:`kt_sft.backend`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from kt_sft.distributed.context import DistributedContext, KTDistributedError, current_context
from kt_sft.experts_backend import ExpertsBackend
from kt_sft.options import ExpertsOptions

__all__ = ["LeaderBackend", "MemberBackend", "place_backend"]

# Message tags of one exchange (gloo matches sends and receives by source and tag).
_TAG_X, _TAG_IDS, _TAG_W, _TAG_OUT, _TAG_GRAD, _TAG_DX, _TAG_DW = range(1, 8)
_FORWARD, _BACKWARD = 0, 1
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def place_backend(
    local: Callable[[ExpertsOptions], ExpertsBackend],
    options: ExpertsOptions,
    *,
    top_k: int,
    hidden_size: int,
    name: str = "",
) -> ExpertsBackend | None:
    """The backend of one layer under kt's distributed mode (``None`` outside it): ``local``
    (the real engine) on the node leader, wrapped to serve the node's members; a
    :class:`MemberBackend` elsewhere. Collective in order: every rank creates its layers in
    the same order."""
    ctx = current_context()
    if ctx is None:
        return None
    if options.activation_policy != "retain":
        # The node leader's engine serves every rank's tokens and does not get their inputs
        # back in backward: it retains (gradient checkpointing still saves its memory).
        options = options.replace(activation_policy="retain")
    index = ctx.next_layer_index()
    if not ctx.exchanges_tokens:
        return local(options)
    if ctx.topology.is_leader:
        return LeaderBackend(
            ctx, local(options), index=index, top_k=top_k, hidden_size=hidden_size, name=name
        )
    return MemberBackend(ctx, index=index, top_k=top_k, hidden_size=hidden_size, name=name)


class _Exchange:
    """Shared machinery of the leader and member backends of one layer."""

    #: Every rank of the node must make each call, even with no tokens (kt_sft.function).
    collective = True
    #: The leader's engine gets no member inputs back in backward: it retains.
    supports_recompute = False

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

    @property
    def activation_policy(self) -> str:
        return "retain"

    @activation_policy.setter
    def activation_policy(self, policy: str) -> None:
        if policy != "retain":
            raise ValueError(f"{self.name}: a distributed backend retains, got {policy!r}")


class LeaderBackend(_Exchange):
    """The engine of a node, serving the tokens of every rank of the node.

    Offers the engine API (``load_weights``, ``set_lora``, ``lora_updated``, ``forward``,
    ``submit_forward``/``sync_forward``, ``backward``, ``clear_cache``, ``close``); other
    attributes come from the wrapped backend. A forward dropped without its backward is popped
    by :class:`~kt_sft.routed_experts.RoutedExperts` with a zero-gradient backward, which every
    rank of the node makes too, so it is exchanged like any other.
    """

    def __init__(self, ctx: DistributedContext, inner: ExpertsBackend, **kwargs: Any) -> None:
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

    def set_biases(self, **biases: torch.Tensor) -> None:
        self.inner.set_biases(**biases)

    def set_lora(self, **arrays: torch.Tensor) -> None:
        self.inner.set_lora(**arrays)

    def lora_updated(self) -> None:
        self.inner.lora_updated()

    def last_timings(self) -> dict[str, float]:
        return self.inner.last_timings()

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
        self,
        grad_out: torch.Tensor,
        grad_input: torch.Tensor,
        grad_routing_weights: torch.Tensor,
        *,
        x: torch.Tensor | None = None,
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

    def set_biases(self, **biases: torch.Tensor) -> None:
        """Nothing to keep: the leader's engine holds the biases too."""

    def set_lora(self, **arrays: torch.Tensor) -> None:
        """The leader binds its own LoRA tensors (all ranks hold equal values)."""

    def lora_updated(self) -> None:
        pass

    def last_timings(self) -> dict[str, float]:
        return {}

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
        self,
        grad_out: torch.Tensor,
        grad_input: torch.Tensor,
        grad_routing_weights: torch.Tensor,
        *,
        x: torch.Tensor | None = None,
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
