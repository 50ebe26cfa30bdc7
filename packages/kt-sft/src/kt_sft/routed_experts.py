"""One MoE layer's routed experts as kt runs them: :class:`RoutedExperts`.

A RoutedExperts owns the experts backend (:class:`~kt_sft.experts_backend.ExpertsBackend`: the
compiled engine, the torch reference or a distributed proxy) holding the packed frozen weights
of experts ``[num_gpu_experts, E)``, the torch-side GPU experts ``[0, num_gpu_experts)`` and
LoRA experts, the LoRA binding, the host staging buffers used when hidden
states live on a GPU, and a mirror of the engine's activation-cache stack.

The mirror stack makes the engine's LIFO cache safe under everything autograd may do: each
cached forward gets a token held by its autograd node; a backward pops its own entry when it is
on top, entries whose node was freed without a backward (a forward whose graph was dropped) are
discarded when they reach the top, and a backward whose entry is not on top (out-of-order
backwards) recomputes its forward first. Gradient checkpointing saves engine memory as it saves
PyTorch's: reentrant checkpointing runs the first forward without grad (no cache) and the
recompute caches; non-reentrant checkpointing's first pass does not cache either, and its
recompute leaves a *claimable* entry that the original node's backward, which comes next,
consumes. Either way at most one checkpointed layer's engine activations are alive.

``KTConfig.activation_policy`` sets what a cached forward keeps: ``retain`` (the gate/up
outputs), ``recompute`` (only the inputs; the engine recomputes gate/up in backward, bit for
bit), or ``auto`` (retain while the process's live engine cache plus this entry fits
``KTConfig.activation_memory_budget``, else recompute).
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import torch

from kt_sft.backend import create_experts_backend
from kt_sft.binding import LoRAPlan, LoRASource
from kt_sft.config import KTConfig
from kt_sft.experts_backend import ExpertsBackend
from kt_sft.options import ExpertsOptions, LoRALayout
from kt_sft.reference import ACTIVATIONS
from kt_sft.trace import tracer

__all__ = ["KTCacheError", "KTCopyError", "LayerEngine", "RoutedExperts"]


class KTCacheError(RuntimeError):
    """The per-layer activation cache cannot take another pending forward."""


class KTCopyError(TypeError):
    """A kt-wrapped model was deep-copied or pickled; its routed experts cannot be."""


_COPY_HELP = (
    "the routed experts of a kt-wrapped model live once in the compiled kt engine (packed, "
    "outside torch), so the model cannot be deep-copied or pickled. For a frozen reference model "
    "(DPO / KL), use the same model with the adapter disabled (`with model.disable_adapter():`; "
    "TRL does this when ref_model=None); for an EMA or snapshot of the adapter, copy its "
    "trainable tensors (`{n: p.detach().clone() for n, p in model.named_parameters() if "
    "p.requires_grad}`) or save it with save_pretrained; for a second independent model, load "
    "it again with kt_sft.load_model / kt_sft.wrap_model"
)


class _Holder:
    """Held only by an autograd node; its death marks the node's cache entry abandoned."""

    __slots__ = ("__weakref__",)


class _Entry:
    __slots__ = ("claim", "holder", "policy", "popped", "tokens")

    def __init__(
        self, holder: _Holder, tokens: int, claimable: bool = False, policy: str = "retain"
    ) -> None:
        self.holder = weakref.ref(holder)
        self.popped = False
        self.tokens = tokens
        self.policy = policy  # "recompute": the backward passes x again
        # A non-reentrant checkpoint's recompute: its node is dropped right away, so the entry
        # keeps its holder alive and goes to the next backward of the layer.
        self.claim = holder if claimable else None

    @property
    def claimable(self) -> bool:
        return self.claim is not None

    @property
    def abandoned(self) -> bool:
        return self.holder() is None


class RoutedExperts:
    """Routed experts of one MoE layer: experts backend, GPU experts, LoRA experts, LoRA binding.

    Neither deep-copyable nor picklable (:class:`KTCopyError` says what to do instead).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> RoutedExperts:
        raise KTCopyError(f"copy.deepcopy: {_COPY_HELP}")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise KTCopyError(f"pickling: {_COPY_HELP}")

    def __init__(
        self,
        cfg: KTConfig,
        *,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        lora_layout: LoRALayout = "fused",
        name: str = "",
        layer_idx: int | None = None,
        activation_options: dict[str, Any] | None = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"{name or 'experts'}: activation {activation!r} is not implemented "
                f"by the engine (supported: {', '.join(sorted(ACTIVATIONS))})"
            )
        if cfg.num_gpu_experts > num_experts:
            raise ValueError(
                f"KTConfig.num_gpu_experts={cfg.num_gpu_experts} exceeds the "
                f"{num_experts} routed experts of {name or 'the layer'}"
            )
        self.cfg = cfg
        self.name = name
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        #: the engine's activation_alpha / _limit / _up_offset (empty: plain ``activation``)
        self.activation_options = dict(activation_options or {})
        self.lora_layout = lora_layout
        self.num_gpu_experts = cfg.num_gpu_experts
        self.engine_experts = num_experts - cfg.num_gpu_experts
        self.options = ExpertsOptions.from_config(
            cfg,
            activation=activation,
            lora_layout=lora_layout,
            activation_options=self.activation_options,
        )
        self.experts_backend: ExpertsBackend | None = None
        if self.engine_experts > 0:
            self.experts_backend = create_experts_backend(
                self.options,
                num_experts=self.engine_experts,
                top_k=top_k,
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
            )
        self.lora_rank = cfg.lora_rank
        self.lora_scaling = cfg.lora_scaling
        self._profile = cfg.profile is not None
        if self._profile:
            tracer.enable(cfg.profile)
        self.gpu_experts: Any = None  # kt_sft.gpu_experts.GPUExperts, attached by inject
        self.lora_experts: Any = None  # kt_sft.lora_experts.LoRAExperts, attached by inject
        self._plan: LoRAPlan | None = None
        self._plan_key: tuple[Any, ...] | None = None
        self._grad_buffers: dict[int, torch.Tensor] = {}
        self._stack: list[_Entry] = []
        self._lock = threading.RLock()
        self._host: dict[str, torch.Tensor] = {}
        self._host_event: Any = None
        self._loaded = False
        self._closed = False
        #: Set by the PEFT hook for the duration of one experts call.
        self.call_source: LoRASource | None = None

    # -- weights --------------------------------------------------------------------------
    def load_weights(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        biases: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Pack ``gate_up: E x 2I x H`` and ``down: E x H x I`` (the first ``num_gpu_experts``
        go to the GPU experts module, which the caller attaches). ``biases``: frozen
        ``gate`` / ``up`` (E x I) and ``down`` (E x H) biases for the engine, if any."""
        self.check_open()
        E, inter, H = self.num_experts, self.intermediate_size, self.hidden_size
        if tuple(gate_up.shape) != (E, 2 * inter, H) or tuple(down.shape) != (E, H, inter):
            raise ValueError(
                f"{self.name}: expert weights must be gate_up {(E, 2 * inter, H)} "
                f"and down {(E, H, inter)}, got {tuple(gate_up.shape)} and "
                f"{tuple(down.shape)}"
            )
        if self.experts_backend is not None:
            n = self.num_gpu_experts
            gu = gate_up[n:].detach()
            dn = down[n:].detach()
            if gu.device.type != "cpu":
                gu, dn = gu.cpu(), dn.cpu()
            if gu.dtype not in (torch.float32, torch.bfloat16):
                gu, dn = gu.float(), dn.float()
            self.experts_backend.load_weights(gate_up=gu.contiguous(), down=dn.contiguous())
            if biases:
                self.experts_backend.set_biases(
                    **{k: v[n:].detach().to("cpu", torch.float32) for k, v in biases.items()}
                )
        self._loaded = True

    # -- LoRA -----------------------------------------------------------------------------
    def plan_for(self, source: LoRASource | None) -> LoRAPlan | None:
        """The current engine LoRA plan for ``source`` (re-bound when it changed)."""
        if self.experts_backend is None or self.lora_rank == 0:
            if source is not None and self.experts_backend is not None:
                raise RuntimeError(
                    f"{self.name}: the experts carry LoRA but the engine was built without it "
                    "(KTConfig.lora_rank=0); wrap the model with lora_rank >= the adapter's r"
                )
            return None
        if source is not None and source.max_rank > self.lora_rank:
            raise ValueError(
                f"{self.name}: the adapter's LoRA rank r={source.max_rank} is larger than the "
                f"engine's KTConfig.lora_rank={self.lora_rank}; wrap the model with "
                f"KTConfig(lora_rank={source.max_rank}) (a smaller adapter rank is fine)"
            )
        key = _source_key(source)
        with self._lock:
            if self._plan is None or key != self._plan_key:
                self._plan = LoRAPlan.build(
                    source,
                    layout=self.lora_layout,
                    rank=self.lora_rank,
                    scaling=self.lora_scaling,
                    num_experts=self.engine_experts,
                    expert_offset=self.num_gpu_experts,
                    hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size,
                    grad_buffers=self._grad_buffers,
                )
                self._plan_key = key
                self._grad_buffers = self._plan.grad_buffers
                self.experts_backend.set_lora(**self._plan.arrays)
                self.experts_backend.lora_updated()
            elif self._plan.refresh():
                self.experts_backend.lora_updated()
        return self._plan

    def lora_updated(self) -> None:
        """Force the engine to re-read the LoRA weights (after an in-place change that torch's
        version counter cannot see, e.g. through ``param.data``)."""
        with self._lock:
            if self._plan is not None and self.experts_backend is not None:
                self._plan.refresh(force=True)
                self.experts_backend.lora_updated()

    # -- cache mirror ---------------------------------------------------------------------
    def _reap(self) -> None:
        """Discard abandoned or already-served entries on top of the engine's stack."""
        dead = [e.abandoned or e.popped for e in self._stack]
        if dead and all(dead):
            self.experts_backend.clear_cache()
            self._stack.clear()
            return
        while self._stack and (self._stack[-1].abandoned or self._stack[-1].popped):
            self._discard_top(self._stack.pop())

    def _discard_top(self, entry: _Entry) -> None:
        # Pop it with a zero-gradient backward; the LoRA gradient arrays are restored after
        # it so that nothing (not even a NaN from the discarded activations) reaches them.
        plan = self._plan
        saved = (
            {k: v.clone() for k, v in plan.arrays.items() if k.startswith("grad_")}
            if plan is not None
            else {}
        )
        T, H, K = entry.tokens, self.hidden_size, self.top_k
        if entry.policy == "recompute":  # any x will do: the gradients are restored below
            self.experts_backend.backward(
                torch.zeros(T, H), torch.empty(T, H), torch.empty(T, K), x=torch.zeros(T, H)
            )
        else:
            self.experts_backend.backward(torch.zeros(T, H), torch.empty(T, H), torch.empty(T, K))
        for k, v in saved.items():
            assert plan is not None
            plan.arrays[k].copy_(v)

    # -- compute --------------------------------------------------------------------------
    def engine_forward(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        w: torch.Tensor,
        *,
        cache: bool,
        holder: _Holder | None,
        overlap: Any = None,
        claimable: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Run the engine on ``x: T x H`` (any device); returns (out fp32 on x's device,
        result of ``overlap()`` run while the engine computes). ``claimable``: the forward of a
        non-reentrant checkpoint's recompute, consumed by the layer's next backward."""
        self.check_open()
        T = x.shape[0]
        device = x.device
        with self._lock:
            for entry in self._stack:  # a recompute whose backward never came
                if entry.claimable:
                    entry.popped = True
            self._reap()
            policy = self._choose_policy(T) if cache else "retain"
            if cache and len(self._stack) >= self.cfg.max_cache_depth:
                raise KTCacheError(
                    f"{self.name}: {len(self._stack)} forwards already await their backward "
                    f"(KTConfig.max_cache_depth={self.cfg.max_cache_depth}); raise "
                    "max_cache_depth / KT_MAX_CACHE_DEPTH to keep more forwards pending"
                )
            t0 = time.perf_counter_ns() if self._profile else 0
            xh, idh, wh, out = self._to_host(x, ids, w)
            self.experts_backend.submit_forward(xh, idh, wh, out, save_for_backward=cache)
            try:
                extra = overlap() if overlap is not None else None
            finally:
                self.experts_backend.sync_forward()
            if cache:
                assert holder is not None
                self._stack.append(_Entry(holder, T, claimable, policy))
            result = out if device.type == "cpu" else self._from_host(out, device)
            if self._profile:
                self._trace("forward", t0, T, cache=cache)
        return result, extra

    def engine_backward(
        self,
        holder: _Holder | None,
        x: torch.Tensor,
        ids: torch.Tensor,
        w: torch.Tensor,
        grad_out: torch.Tensor,
        plan: LoRAPlan | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward of one engine forward; writes LoRA grads; returns (dx, dw) on x's device."""
        self.check_open()
        device = x.device
        T = x.shape[0]
        t0 = time.perf_counter_ns() if self._profile else 0
        with self._lock:
            self._reap()
            top = self._stack[-1] if self._stack else None
            mine = top is not None and (
                (holder is not None and top.holder() is holder)
                or (top.claimable and top.tokens == T)
            )
            if not mine:
                # Out-of-order backward, or a forward that did not cache: recompute it. If the
                # cache is full, every pending entry is dropped (their backwards recompute too).
                for entry in self._stack:
                    if holder is not None and entry.holder() is holder:
                        entry.popped = True
                self._reap()
                if len(self._stack) >= self.cfg.max_cache_depth:
                    for entry in self._stack:
                        entry.popped = True
                    self._reap()
                xh, idh, wh, out = self._to_host(x, ids, w)
                used = self._choose_policy(T)
                self.experts_backend.forward(xh, idh, wh, out, save_for_backward=True)
            else:
                used = self._stack.pop().policy
            if plan is not None and plan is not self._plan:
                # The binding changed since this forward (another adapter): restore its arrays.
                self.experts_backend.set_lora(**plan.arrays)
                self.experts_backend.lora_updated()
                self._plan, self._plan_key = plan, None
            pending = plan.before_backward() if plan is not None else []
            gh = self._grad_to_host(grad_out)
            dx = torch.empty(T, self.hidden_size, dtype=torch.float32)
            dw = torch.empty(T, self.top_k, dtype=torch.float32)
            if used == "recompute":
                # The entry kept only its routing: the engine recomputes the rest from x.
                self.experts_backend.backward(gh, dx, dw, x=self._to_host(x, ids, w)[0])
            else:
                self.experts_backend.backward(gh, dx, dw)
            if plan is not None:
                plan.after_backward(pending)
            if self._profile:
                self._trace("backward", t0, T, recomputed=not mine)
        if device.type != "cpu":
            dx = dx.to(device, non_blocking=True)
            dw = dw.to(device, non_blocking=True)
        return dx, dw

    def _choose_policy(self, tokens: int) -> str:
        """Set the backend's activation policy for the cached forward about to run; returns it
        (``"retain"`` for backends that cannot recompute)."""
        policy = self.cfg.activation_policy
        if policy == "retain" or not self.experts_backend.supports_recompute:
            return "retain"  # the torch reference and distributed backends retain
        if policy == "auto":
            from kt_sft.estimate import cache_entry_bytes, live_cache_bytes

            entry = cache_entry_bytes(
                tokens,
                hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                top_k=self.top_k,
                lora_rank=self.lora_rank,
                policy="retain",
                weight_dtype=self.cfg.weight_dtype or "bf16",
            )
            budget = self.cfg.activation_budget_bytes()
            policy = "retain" if live_cache_bytes() + entry <= budget else "recompute"
        if self.experts_backend.activation_policy != policy:
            self.experts_backend.activation_policy = policy
        return policy

    def _trace(self, phase: str, t0: int, tokens: int, **args: Any) -> None:
        timings = self.experts_backend.last_timings()
        phases = {k: v for k, v in timings.items() if k.startswith(phase)}
        tracer.span(
            f"{self.name} {phase}",
            t0,
            time.perf_counter_ns(),
            phases=phases,
            args={"tokens": tokens, "layer": self.layer_idx, **args},
        )

    # -- host staging ---------------------------------------------------------------------
    def _buffer(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, pin: bool
    ) -> torch.Tensor:
        buf = self._host.get(name)
        numel = 1
        for s in shape:
            numel *= s
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1), dtype=dtype, pin_memory=pin)
            self._host[name] = buf
        return buf[:numel].view(shape)

    def _to_host(
        self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        T, H, K = x.shape[0], self.hidden_size, self.top_k
        xdtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        if x.device.type == "cpu":
            xh = x.detach().to(xdtype).contiguous()
            idh = ids.detach().to(torch.int64).contiguous()
            wh = w.detach().to(torch.float32).contiguous()
            out = torch.empty(T, H, dtype=torch.float32)
            return xh, idh, wh, out
        if self._host_event is not None:
            self._host_event.synchronize()  # previous async copies out of these buffers
        xh = self._buffer("x", (T, H), xdtype, True)
        idh = self._buffer("ids", (T, K), torch.int64, True)
        wh = self._buffer("w", (T, K), torch.float32, True)
        xh.copy_(x.detach(), non_blocking=True)
        idh.copy_(ids.detach(), non_blocking=True)
        wh.copy_(w.detach(), non_blocking=True)
        torch.cuda.current_stream(x.device).synchronize()
        out = self._buffer("out", (T, H), torch.float32, True)
        return xh, idh, wh, out

    def _from_host(self, out: torch.Tensor, device: torch.device) -> torch.Tensor:
        result = out.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._host_event = event
        return result

    def _grad_to_host(self, grad_out: torch.Tensor) -> torch.Tensor:
        g = grad_out.detach()
        if g.device.type == "cpu":
            return g.to(torch.float32).contiguous()
        gh = self._buffer("grad_out", tuple(g.shape), torch.float32, True)
        gh.copy_(g, non_blocking=True)
        torch.cuda.current_stream(g.device).synchronize()
        return gh

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def pending_forwards(self) -> int:
        """Forwards cached in the engine and not yet popped (abandoned ones included)."""
        return len(self._stack)

    def close(self) -> None:
        """Free the engine (weights, caches); the layer cannot run afterwards."""
        with self._lock:
            if self.experts_backend is not None:
                self.experts_backend.close()
            self.experts_backend = None
            self._plan = None
            self._stack.clear()
            self._host.clear()
            self._closed = True

    def check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                f"{self.name}: the kt engine of this layer was closed "
                "(kt_sft.close(model)); wrap or load the model again"
            )


def _source_key(source: LoRASource | None) -> tuple[Any, ...]:
    if source is None:
        return ("none",)
    params = source.params()
    return (
        source.key,
        source.layout,
        source.rank,
        source.scaling,
        tuple(sorted(source.ranks.items())),
        tuple(sorted(source.scalings.items())),
        tuple((id(p), p.data_ptr(), p.dtype, p.device, tuple(p.stride())) for p in params),
    )


#: The former name of :class:`RoutedExperts`.
LayerEngine = RoutedExperts
