"""Binding torch-owned LoRA parameters (and their gradients) to an engine.

A :class:`LoRASource` describes one layer's expert LoRA as its owner (PEFT) holds it: for each
projection kind an ``A`` and a ``B`` factor, each a parameter plus a function that views a tensor
of the parameter's shape in kt's per-expert layout (``A: E x r x in``, ``B: E x out x r``).
:class:`LoRAPlan` turns a source into the arrays ``engine.set_lora`` takes:

* *direct* arrays are strided views of the parameters (weights) or of a persistent fp32 gradient
  buffer that is handed to the parameter as its ``.grad`` (gradients): zero copies, the engine
  reads and accumulates in place. Used when the parameter lives on the CPU, the ranks and LoRA
  scalings agree, and nothing else writes the same memory.
* *staged* arrays are kt-owned CPU buffers: weights are copied in (zero-padded to the engine's
  rank, rescaled to its scaling) when a parameter's version changes; gradients are added back
  into ``param.grad`` after each backward. Used for parameters on a GPU, bf16 gradients, a smaller
  PEFT rank, a different alpha, or fused LoRA feeding a split-layout engine.

Missing kinds (PEFT targets only ``gate_up_proj``, or no expert LoRA at all while the engine has a
rank) are bound to zeros with scratch gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["FUSED_KINDS", "SPLIT_KINDS", "LoRAFactor", "LoRAPlan", "LoRASource", "engine_kinds"]

# Fused / foreach optimizers update parameters without bumping torch's version counter, so every
# optimizer step (any optimizer, through torch's global post-step hook) also counts as a change.
_optimizer_steps = 0


def _count_optimizer_step(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)

FUSED_KINDS = ("gate_up", "down")
SPLIT_KINDS = ("gate", "up", "down")


def engine_kinds(layout: str) -> tuple[str, ...]:
    """Projection kinds of an engine LoRA layout."""
    return FUSED_KINDS if layout == "fused" else SPLIT_KINDS


@dataclass(frozen=True)
class LoRAFactor:
    """One LoRA factor: a parameter and how to view a same-shaped tensor per expert.

    ``members`` is set when the factor is a stack of per-expert parameters (ModuleList experts):
    ``param`` is then the stacked tensor and ``members[e]`` a parameter viewing ``param[e]``;
    versions and gradients go through the members.
    """

    param: torch.Tensor
    view: Callable[[torch.Tensor], torch.Tensor]
    members: tuple[torch.Tensor, ...] | None = None

    def leaves(self) -> tuple[torch.Tensor, ...]:
        """The tensors autograd and the optimizer see."""
        return self.members if self.members is not None else (self.param,)


@dataclass(frozen=True)
class LoRASource:
    """A layer's expert LoRA as its owner holds it.

    ``kinds`` maps ``"gate_up"``/``"down"`` (fused) or ``"gate"``/``"up"``/``"down"`` (split) to
    an ``(A, B)`` pair; a kind may be absent. Canonical views: ``A: E x r x in``,
    ``B: E x out x r``. ``key`` identifies the source for caching (changes force a re-bind).
    """

    layout: str
    rank: int
    scaling: float
    kinds: dict[str, tuple[LoRAFactor, LoRAFactor]]
    key: tuple[Any, ...] = ()
    #: per-kind rank / scaling where a kind differs from ``rank`` / ``scaling``
    ranks: dict[str, int] = field(default_factory=dict)
    scalings: dict[str, float] = field(default_factory=dict)
    #: the gate_up factor's B rows alternate gate and up (experts with is_concatenated=False)
    interleaved: bool = False

    def rank_of(self, kind: str) -> int:
        return self.ranks.get(kind, self.rank)

    def scaling_of(self, kind: str) -> float:
        return self.scalings.get(kind, self.scaling)

    @property
    def max_rank(self) -> int:
        return max([self.rank, *self.ranks.values()])

    def params(self) -> list[torch.Tensor]:
        """The distinct leaf parameters (what the optimizer updates), in a fixed order."""
        seen: dict[int, torch.Tensor] = {}
        for a, b in self.kinds.values():
            for f in (a, b):
                for leaf in f.leaves():
                    seen.setdefault(id(leaf), leaf)
        return list(seen.values())

    def canonical(
        self, kind: str, *, leaf: dict[int, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A, B)`` views of ``kind`` in kt layout, or ``None``; ``leaf`` substitutes tensors
        for parameters (by ``id``) so the views are taken of those instead."""
        pair = self.kinds.get(kind)
        if pair is None:
            return None
        a, b = pair
        pa = leaf.get(id(a.param), a.param) if leaf else a.param
        pb = leaf.get(id(b.param), b.param) if leaf else b.param
        return a.view(pa), b.view(pb)


@dataclass
class _Array:
    """One engine array (weight or gradient) and how it relates to the source."""

    name: str
    tensor: torch.Tensor
    direct: bool
    # staged transfer: the source factor, which slice of its canonical view, the scale factor
    factor: LoRAFactor | None = None
    is_a: bool = True
    rows: slice | None = None  # B rows (out dim) selected from the canonical view
    scale: float = 1.0


@dataclass
class LoRAPlan:
    """The engine-side arrays for one :class:`LoRASource` (or zeros when there is none)."""

    arrays: dict[str, torch.Tensor]
    weights: list[_Array]
    grads: list[_Array]
    params: list[torch.Tensor]
    grad_buffers: dict[int, torch.Tensor]
    source: LoRASource | None
    expert_offset: int
    versions: tuple[int, ...] = field(default=())
    _views: dict[int, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        source: LoRASource | None,
        *,
        layout: str,
        rank: int,
        scaling: float,
        num_experts: int,
        expert_offset: int,
        hidden_size: int,
        intermediate_size: int,
        grad_buffers: dict[int, torch.Tensor] | None = None,
    ) -> LoRAPlan:
        """Plan the arrays of an engine holding experts ``[expert_offset, expert_offset + E)``."""
        old_buffers = grad_buffers or {}
        grad_buffers = {}
        E, H, inter = num_experts, hidden_size, intermediate_size
        in_dim = {"gate_up": H, "gate": H, "up": H, "down": inter}
        out_dim = {"gate_up": 2 * inter, "gate": inter, "up": inter, "down": H}
        arrays: dict[str, torch.Tensor] = {}
        weights: list[_Array] = []
        grads: list[_Array] = []
        # Which engine kinds use each A parameter: an A shared by two kinds cannot take
        # gradients in place (two writers).
        derived = {k: _derive(source, k, inter) for k in engine_kinds(layout)}
        a_users: dict[int, int] = {}
        for d in derived.values():
            if d is not None:
                a_users[id(d[0].param)] = a_users.get(id(d[0].param), 0) + 1
        sl = slice(expert_offset, expert_offset + E)
        for kind in engine_kinds(layout):
            shapes = {"a": (E, rank, in_dim[kind]), "b": (E, out_dim[kind], rank)}
            d = derived[kind]
            for letter in ("a", "b"):
                name = f"{letter}_{kind}"
                shape = shapes[letter]
                if d is None:
                    arrays[name] = torch.zeros(shape, dtype=torch.float32)
                    arrays[f"grad_{name}"] = torch.zeros(shape, dtype=torch.float32)
                    continue
                assert source is not None
                factor = d[0] if letter == "a" else d[1]
                rows = None if letter == "a" else d[2]
                src_rank, src_scaling = source.rank_of(d[3]), source.scaling_of(d[3])
                p = factor.param
                same_math = src_rank == rank and math.isclose(
                    src_scaling, scaling, rel_tol=1e-12, abs_tol=0.0
                )
                direct_w = (
                    p.device.type == "cpu"
                    and same_math
                    and p.dtype in (torch.float32, torch.bfloat16)
                )
                scale = 1.0 if letter == "a" else src_scaling / scaling
                if direct_w:
                    w = _select(factor.view(p.detach()), rows)[sl]
                    arrays[name] = w
                    weights.append(_Array(name, w, True, factor, letter == "a", rows, scale))
                else:
                    buf = torch.zeros(shape, dtype=torch.float32)
                    arrays[name] = buf
                    weights.append(_Array(name, buf, False, factor, letter == "a", rows, scale))
                direct_g = (
                    direct_w
                    and p.dtype == torch.float32
                    and not (letter == "a" and a_users.get(id(p), 0) > 1)
                )
                if direct_g:
                    gbuf = grad_buffers.get(id(p), old_buffers.get(id(p)))
                    if gbuf is None or gbuf.shape != p.shape or gbuf.stride() != p.stride():
                        gbuf = torch.zeros_like(p, dtype=torch.float32, device="cpu")
                    # recorded whether new or reused from the previous plan: before_backward
                    # looks every direct gradient's buffer up here
                    grad_buffers[id(p)] = gbuf
                    g = _select(factor.view(gbuf), rows)[sl]
                    arrays[f"grad_{name}"] = g
                    grads.append(
                        _Array(f"grad_{name}", g, True, factor, letter == "a", rows, scale)
                    )
                else:
                    gst = torch.zeros(shape, dtype=torch.float32)
                    arrays[f"grad_{name}"] = gst
                    grads.append(
                        _Array(f"grad_{name}", gst, False, factor, letter == "a", rows, scale)
                    )
        params = source.params() if source is not None else []
        plan = cls(arrays, weights, grads, params, grad_buffers, source, expert_offset)
        plan.refresh(force=True)
        return plan

    # -- weights --------------------------------------------------------------------------
    def current_versions(self) -> tuple[int, ...]:
        return (_optimizer_steps, *(p._version for p in self.params))

    def refresh(self, *, force: bool = False) -> bool:
        """Copy changed parameters into staged weight buffers; True when anything changed."""
        versions = self.current_versions()
        if not force and versions == self.versions:
            return False
        self.versions = versions
        sl = slice(self.expert_offset, self.expert_offset + self.arrays_experts())
        with torch.no_grad():
            for arr in self.weights:
                if arr.direct:
                    continue
                assert arr.factor is not None
                value = _select(arr.factor.view(arr.factor.param.detach()), arr.rows)[sl]
                arr.tensor.zero_()
                if arr.is_a:
                    arr.tensor[:, : value.shape[1], :].copy_(value)
                else:
                    value = value.to(torch.float32)  # scale in fp32, not in the param's dtype
                    arr.tensor[:, :, : value.shape[2]].copy_(
                        value * arr.scale if arr.scale != 1.0 else value
                    )
        return True

    def arrays_experts(self) -> int:
        first = next(iter(self.arrays.values()))
        return int(first.shape[0])

    # -- gradients ------------------------------------------------------------------------
    def before_backward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Make the engine's gradient arrays ready; returns (param, buffer) pairs whose buffer
        must be added into ``param.grad`` after the backward (the param's grad is foreign)."""
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        done: set[int] = set()
        for arr in self.grads:
            if not arr.direct:
                arr.tensor.zero_()
                continue
            assert arr.factor is not None
            factor = arr.factor
            if id(factor.param) in done:
                continue
            done.add(id(factor.param))
            gbuf = self.grad_buffers[id(factor.param)]
            if factor.members is None:
                views: tuple[torch.Tensor, ...] = (gbuf,)
            else:
                views = self._member_views(factor, gbuf)
            leaves = factor.leaves()
            grads = [leaf.grad for leaf in leaves]
            if all(g is v for g, v in zip(grads, views)):
                continue
            gbuf.zero_()
            if all(g is None for g in grads):
                for leaf, v in zip(leaves, views):
                    if leaf.requires_grad:
                        leaf.grad = v
            else:
                for leaf, v in zip(leaves, views):
                    if leaf.requires_grad:
                        pending.append((leaf, v))
        return pending

    def _member_views(self, factor: LoRAFactor, gbuf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = -id(factor.param)
        cached = self._views.get(key)
        if cached is None or cached[0] is not gbuf:
            cached = (gbuf, tuple(gbuf[e] for e in range(gbuf.shape[0])))
            self._views[key] = cached
        return cached[1]

    def after_backward(self, pending: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Deliver staged gradients (and buffers of params whose grad was foreign)."""
        with torch.no_grad():
            for p, gbuf in pending:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(gbuf.to(p.grad.device, p.grad.dtype))
            sl = slice(self.expert_offset, self.expert_offset + self.arrays_experts())
            for arr in self.grads:
                if arr.direct:
                    continue
                assert arr.factor is not None
                factor = arr.factor
                if arr.is_a:
                    value = arr.tensor[:, : factor_rank(factor, True), :]
                else:
                    value = arr.tensor[:, :, : factor_rank(factor, False)]
                    if arr.scale != 1.0:
                        value = value * arr.scale
                if factor.members is None:
                    p = factor.param
                    if not p.requires_grad:
                        continue
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    target = _select(factor.view(p.grad), arr.rows)[sl]
                    target.add_(value.to(target.device, target.dtype))
                else:
                    for e, member in enumerate(factor.members[sl]):
                        if not member.requires_grad:
                            continue
                        if member.grad is None:
                            member.grad = torch.zeros_like(member)
                        part = value[e]
                        target = member.grad if arr.rows is None else member.grad[arr.rows]
                        target.add_(part.to(target.device, target.dtype))


def factor_rank(factor: LoRAFactor, is_a: bool) -> int:
    """The source rank of a factor (from its canonical view)."""
    shape = factor.view(factor.param.detach()).shape
    return int(shape[1] if is_a else shape[2])


def _select(view: torch.Tensor, rows: slice | None) -> torch.Tensor:
    return view if rows is None else view[:, rows]


def _derive(
    source: LoRASource | None, kind: str, inter: int
) -> tuple[LoRAFactor, LoRAFactor, slice | None, str] | None:
    """(A factor, B factor, B rows, source kind) feeding engine kind ``kind`` from ``source``."""
    if source is None:
        return None
    if kind in source.kinds:
        a, b = source.kinds[kind]
        return a, b, None, kind
    if kind in ("gate", "up") and "gate_up" in source.kinds:
        a, b = source.kinds["gate_up"]
        if source.interleaved:
            rows = slice(0, 2 * inter, 2) if kind == "gate" else slice(1, 2 * inter, 2)
        else:
            rows = slice(0, inter) if kind == "gate" else slice(inter, 2 * inter)
        return a, b, rows, "gate_up"
    if kind == "gate_up" and source.interleaved and "gate_up" in source.kinds:
        raise ValueError(
            "LoRA on interleaved gate/up experts (is_concatenated=False) runs on an engine built "
            "with lora_layout='split' (B's gate and up rows alternate); use "
            "KTConfig(lora_layout='split') or 'auto'"
        )
    if kind == "gate_up" and ("gate" in source.kinds or "up" in source.kinds):
        raise ValueError(
            "per-projection LoRA (separate A for gate and up) cannot run on an engine built with "
            "lora_layout='fused' (one A shared by gate and up); use KTConfig(lora_layout='split')"
        )
    return None
