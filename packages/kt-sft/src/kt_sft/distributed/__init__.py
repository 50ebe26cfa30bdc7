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

The seam into kt-sft is a placement of :mod:`kt_sft.backend` (:func:`exchange.place_backend`,
installed by :func:`kt_sft.install.ensure_installed`): while a :class:`DistributedContext` is
active it hands each layer a :class:`LeaderBackend` (wrapping the real engine) or a
:class:`MemberBackend` (no engine, no weights), both
:class:`~kt_sft.experts_backend.ExpertsBackend`s, so
:class:`~kt_sft.routed_experts.RoutedExperts` and the autograd function do not change.

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

The package: :mod:`.context` (topology, process groups, settings), :mod:`.exchange` (the
leader / member backends), :mod:`.sync` (expert LoRA parameters across ranks). kt-accelerate
configures it from its plugin.
"""

from __future__ import annotations

from kt_sft.distributed.context import (
    DEFAULT_TIMEOUT,
    ENV_VARS,
    PLACEMENTS,
    DistributedContext,
    KTDistributedError,
    Topology,
    current_context,
    default_backend,
    init_distributed,
    reduction_device,
    resolve_settings,
    shutdown,
)
from kt_sft.distributed.exchange import LeaderBackend, MemberBackend, place_backend
from kt_sft.distributed.sync import (
    all_reduce_gradients,
    broadcast_expert_lora,
    broadcast_parameters,
    expert_lora_parameters,
    ignore_expert_lora_in_ddp,
    kt_managed_parameters,
    reduce_expert_lora_grads,
)

__all__ = [
    "DEFAULT_TIMEOUT",
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
    "place_backend",
    "reduce_expert_lora_grads",
    "reduction_device",
    "resolve_settings",
    "shutdown",
]
