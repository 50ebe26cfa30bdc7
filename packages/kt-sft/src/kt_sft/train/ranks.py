"""`kt-sft train` on several processes: torchrun / `accelerate launch` start one process per rank.

The run then trains on a global batch split over the ranks: each optimizer step takes
``per_device_train_batch_size x gradient_accumulation_steps x world_size`` examples, the same
examples (from the same seeded order) that one process with a ``world_size`` times larger
``per_device_train_batch_size`` would take, and every rank trains on its own share. The routed
experts follow kt's distributed mode (:mod:`kt_sft.distributed`): each node's local rank 0 holds
the engine and serves the tokens of the node's other ranks. After the last micro-batch of a step
the gradients are summed over all ranks (expert LoRA: among the node leaders, then within each
node), so the optimizer step, and hence the adapter, is the same on every rank and equals the
one-process run's. Rank 0 alone writes files (checkpoints, adapter, loss curve, traces, summary)
and prints; every rank reads a checkpoint it resumes from.

Launching: ``torch.distributed`` is initialised from the launcher's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with NCCL when the model runs on a GPU
(``cuda:LOCAL_RANK``) and gloo on the CPU (:func:`kt_sft.distributed.default_backend`). kt's
settings ``KT_ENGINE_PLACEMENT`` and ``KT_DIST_TIMEOUT`` apply.

Failures: a rank that crashes makes the others fail at their next exchange with a
:class:`~kt_sft.distributed.KTDistributedError` naming the ranks (a hung one after
``KT_DIST_TIMEOUT`` seconds); a Ctrl-C (torchrun passes SIGINT to every rank) stops all ranks at
the same micro-batch boundary, since the ranks agree on it at each boundary, and rank 0 writes the
resumable checkpoint.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["Ranks", "launched_world_size"]

T = TypeVar("T")


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    try:
        return max(1, int(raw)) if raw else 1
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE must be an integer, got {raw!r}") from exc


@dataclass
class Ranks:
    """This process's place in the run and the few collectives the training loop needs (no-ops
    for a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False
    _group: Any = field(default=None, repr=False)
    _context: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    def start(cls, device: str) -> Ranks:
        """Join the launcher's process group (initialising ``torch.distributed`` when the launcher
        started several processes and nobody did yet) and start kt's distributed mode.
        ``device`` is where the model's non-expert part runs (``cpu`` / ``cuda`` / ``cuda:N``)."""
        world = launched_world_size()
        import torch.distributed as dist

        if world <= 1 and not (
            dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return cls()
        from kt_sft import distributed as ktd

        owns = False
        if not dist.is_initialized():
            backend = ktd.default_backend(device)
            if backend == "nccl":  # each rank of a node on its own GPU before NCCL starts
                import torch

                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            timeout = datetime.timedelta(seconds=ktd.resolve_settings()[1])
            dist.init_process_group(backend=backend, timeout=timeout)
            owns = True
        context = ktd.init_distributed()
        assert context is not None
        group = dist.new_group(
            list(range(dist.get_world_size())),
            backend="gloo",
            timeout=datetime.timedelta(seconds=context.timeout),
        )
        local = int(os.environ.get("LOCAL_RANK", context.topology.local_rank))
        return cls(dist.get_rank(), dist.get_world_size(), local, owns, group, context)

    def close(self, *, wait: bool = True) -> None:
        """Wait for every rank (``wait``), then leave kt's distributed mode (and the process
        group when :meth:`start` created it)."""
        if not self.active:
            return
        import torch.distributed as dist

        from kt_sft import distributed as ktd

        try:
            if wait:
                self.barrier("end of the run")
        finally:
            ktd.shutdown()
            if self.owns_process_group and dist.is_initialized():
                dist.destroy_process_group()

    def device(self, device: str) -> str:
        """``device`` for this rank: each rank of a node takes its own GPU (``cuda:LOCAL_RANK``)."""
        if self.active and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    # -- collectives ----------------------------------------------------------------------
    def _run(self, what: str, fn: Callable[[], T]) -> T:
        from kt_sft.distributed.sync import _collective

        return _collective(self._context, what, fn)

    def barrier(self, what: str = "barrier") -> None:
        if self.active:
            import torch.distributed as dist

            self._run(what, lambda: dist.barrier(group=self._group))

    def gather(self, value: Any, what: str = "exchange of run state") -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._run(what, lambda: dist.all_gather_object(out, value, group=self._group))
        return out

    def sum(self, values: Sequence[float], what: str = "sum of the step's loss") -> list[float]:
        """Element-wise sum over the ranks (in float64)."""
        if not self.active:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self._run(what, lambda: dist.all_reduce(t, group=self._group))
        return t.tolist()

    def any(self, flag: bool, what: str = "stop check") -> bool:
        """Whether ``flag`` is set on some rank (every rank gets the same answer)."""
        if not self.active:
            return flag
        return self.sum([1.0 if flag else 0.0], what)[0] > 0

    def agree(self, error: BaseException | None) -> None:
        """Collective: raise, on every rank, the error of the lowest rank that has one."""
        if not self.active:
            if error is not None:
                raise error
            return
        errors = self.gather(error, "check of the setup")
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 first, then on the other ranks (e.g. building a cache the others
        then read); an error on rank 0 is raised on every rank."""
        if not self.active:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # handed to every rank by agree()
                error = exc
        self.agree(error)
        return result if self.is_main else fn()

    # -- data -----------------------------------------------------------------------------
    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a global micro-batch (sizes differ by at most one;
        a share may be empty when there are fewer items than ranks)."""
        n, w = len(items), self.world_size
        base, extra = divmod(n, w)
        start = self.rank * base + min(self.rank, extra)
        size = base + (1 if self.rank < extra else 0)
        return list(items[start : start + size])

    # -- gradients ------------------------------------------------------------------------
    def reduce_gradients(self, model: Any, params: Sequence[Any]) -> None:
        """Sum the gradients of ``params`` over the ranks (the loss of each rank is already
        normalised by the global number of trained tokens): the expert LoRA through kt
        (leaders, then nodes), every other parameter with one all-reduce."""
        if not self.active:
            return
        from kt_sft import distributed as ktd

        experts = {id(p) for p in ktd.expert_lora_parameters(model)}
        ktd.all_reduce_gradients([p for p in params if id(p) not in experts], average=False)
        ktd.reduce_expert_lora_grads(model, average=False)

    def broadcast_parameters(self, params: Sequence[Any]) -> None:
        """Rank 0's values of ``params`` on every rank."""
        if self.active:
            from kt_sft import distributed as ktd

            ktd.broadcast_parameters(params, what="broadcast of the initial LoRA weights")
