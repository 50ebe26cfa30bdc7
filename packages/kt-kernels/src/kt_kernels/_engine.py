"""`MoEEngine`: routed experts of one MoE layer, forward and backward with LoRA, on the CPU.

The math: docs/api/kernels.md, "The operator". Arrays cross by DLPack (torch tensors, NumPy
arrays, ...) or, for NumPy bfloat16 (ml_dtypes), the NumPy array interface; the C++ side checks
dtype, shape, strides and device of every array before it uses a pointer.
"""

from __future__ import annotations

import warnings
from types import TracebackType
from typing import Any, Literal

from kt_kernels import _core

__all__ = ["MoEEngine", "active_isa", "available_isas"]

Array = Any  # anything exporting __dlpack__ (torch.Tensor, numpy.ndarray) or a NumPy bf16 array


def _emit_dispatch_warnings() -> None:
    for message in _core.take_warnings():
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def available_isas() -> list[str]:
    """Return the kernel ISAs compiled in and runnable on this CPU, from ``"scalar"`` up.

    Names are those of :data:`kt_kernels.ISAS` (the values of the ``KT_KERNELS_ISA``
    environment variable and of ``MoEEngine(isa=...)``).
    """
    return list(_core.available_isas())


def active_isa() -> str:
    """Return the ISA a new engine uses by default: ``KT_KERNELS_ISA`` if set, else the best one.

    The chosen ISA's kernels are self-tested against the scalar reference on first use; a failure
    falls back to the next ISA down and is reported as a ``RuntimeWarning``.
    """
    name = str(_core.select_isa(""))
    _emit_dispatch_warnings()
    return name


_PHASE_ORDER = {
    "load": ("alloc", "pack", "quantize", "copy_codes", "total"),
    "forward": (
        "route",
        "convert",
        "quantize_x",
        "gather",
        "gate_up",
        "quantize_h",
        "lora_down_a",
        "down",
        "combine",
        "total",
    ),
    "backward": (
        "convert",
        "gather",
        "down_t",
        "reduce",
        "quantize_dgu",
        "gate_up_t",
        "combine",
        "total",
    ),
}


class MoEEngine:
    """The routed experts of one MoE layer: packed BF16 base weights, LoRA, forward and backward.

    Args:
        num_experts: E, experts of the layer.
        top_k: K, experts per token (columns of ``expert_ids``).
        hidden_size: H.
        intermediate_size: I, per expert.
        lora_rank: r; 0 means no LoRA (the experts are fully frozen; backward gives dx and dw).
        lora_alpha: LoRA alpha; the scaling is ``lora_alpha / lora_rank`` (None: alpha = r).
        lora_layout: ``"fused"`` (one A shared by gate and up, B of ``2I`` rows, as PEFT's
            ``target_parameters`` on fused experts) or ``"split"`` (A and B per gate, up, down).
        weight_dtype: storage of the packed base weights: ``"bf16"``, ``"int8"`` (weight-only,
            symmetric, one scale per output channel) or ``"int4"`` (symmetric, one scale per group
            of ``group_size`` inputs). Quantized weights are dequantized to bf16 tile by tile
            right before the bf16 GEMM, so activations and accumulation are as with bf16.
        group_size: int4 group along the input dim: 32, 64 or 128; it must divide hidden_size
            and intermediate_size. Ignored for bf16 and int8.
        activation_dtype: ``"bf16"`` (default) or ``"int8"``. ``"int8"`` (only with
            ``weight_dtype="int8"``) is W8A8: in forward, x and h are quantized per row
            (symmetric, ``scale = max|row| / 127``) and both base GEMMs run int8 x int8 with exact
            int32 sums (AMX-INT8, AVX512-VNNI, or int16 multiplies on AVX2 / AVX-512F), then
            ``float(acc) * scale_row * scale_channel``; LoRA terms stay float32 from bf16 x / h.
            Backward is straight-through: the gradients of the weight-only int8 path on the
            activations of the W8A8 forward (``backward_dtype`` picks how they are computed).
            Outputs match ``tp=1`` to float32 rounding.
        backward_dtype: ``"bf16"`` (default) or ``"int8"`` (only with ``activation_dtype="int8"``).
            ``"bf16"``: backward's base products run on the weights dequantized to bf16.
            ``"int8"``: they run int8 x int8 on the weights' own codes: each routed gradient row
            (dY for the down projection, ``[dg | du]`` for gate/up) is multiplied by its expert's
            per-channel weight scales, quantized per row like x (``scale = max|row| / 127``),
            and the exact int32 product is scaled back. Faster; adds the rounding of an int8 row
            quantization to dx and dw (and through them to the LoRA gradients of gate/up), about
            that of the W8A8 forward. LoRA terms stay float32.
        tp: tensor-parallel slices of the intermediate dim I (None: one per NUMA node). Each
            slice's weights are allocated apart (bound to NUMA node ``slice % nodes`` when the
            build found libnuma). The threads form ``tp`` groups and group ``s`` computes slice
            ``s`` (loads its weights, so first touch places them on its node, and runs its
            gate_up, down and backward tiles); the down projection and dx sum the slices'
            partial products in slice order. With more than one node and ``tp`` a multiple of
            the node count, group ``s``'s pool threads are pinned to node ``s % nodes``
            (``KT_PIN_THREADS=0`` turns that off; see ``pinned_threads``). Slices hold whole
            multiples of 32 columns of I (int4: of ``group_size``), so ``tp`` is at most
            ``ceil(I / 32)``; on a single-node machine ``tp > 1`` gives logical slices with the
            same results up to float32 summation order.
        max_tokens: the batch size the down / dx column passes are planned for (any T is
            accepted). Memory follows the tokens actually seen: a cache entry holds the T x K
            rows its forward routed, and the process-wide scratch grows to the largest call.
            Bounded (as is T): ``max_tokens * top_k`` below ``2**31`` (routed rows are numbered
            in int32) and at most ``2**47`` bytes per planned buffer; a larger value is a
            ``ValueError`` that names the largest allowed one.
        max_cache_depth: forwards with ``save_for_backward=True`` that may be pending at once;
            backwards consume them last-in first-out.
        activation_policy: what a forward with ``save_for_backward=True`` keeps for backward:
            ``"retain"`` (default: x, x A^T, h Ad^T and the gate/up outputs, T*(2H) + T*K*(8I +
            8r) bytes) or ``"recompute"`` (only the routing, 12 bytes per routed row:
            :meth:`backward` then takes the forward's ``x`` again and recomputes the rest with
            the forward's own tiles, so gradients are bit for bit those of ``"retain"``, for one
            more gate/up GEMM). Cache entries
            come from a process-wide pool and return to it when backward consumes them.
        num_threads: threads of the process-wide worker pool this engine uses (None:
            ``KT_NUM_THREADS``, else one per physical core).
        isa: kernel ISA (None: ``KT_KERNELS_ISA``, else the best runnable one).
        activation: the experts' activation ``f`` in ``h = f(g) * u``: ``"silu"`` (default),
            ``"gelu"`` (erf), ``"gelu_tanh"`` (tanh approximation, transformers'
            ``gelu_pytorch_tanh``) or ``"relu2"`` (``max(g, 0)^2``).
        activation_alpha: ``"silu"`` only: ``f(g) = g * sigmoid(alpha * g)`` (gpt-oss: 1.702).
        activation_limit: clamp ``g`` to at most ``limit`` and ``u`` to ``[-limit, limit]``
            before the activation (None: no clamp). Backward follows ``torch.clamp``: no
            gradient outside the range, the full gradient at its ends.
        activation_up_offset: added to the clamped ``u`` (gpt-oss: ``(u + 1)``).
        activation_gate_softcap, activation_up_softcap: ``"silu"`` only: soft-caps
            ``c * tanh(x / c)`` of the gate's linear factor (``cap(g) * sigmoid(alpha * g)``)
            and of ``u`` (Inkling-2: 4 and 25; None: no cap).
            The default (SiLU, no clamp, no offset) runs the ISA's vectorized kernels; every
            other choice runs portable code on each ISA (the GEMMs stay the ISA's).

    Threads: calls on one engine must not overlap. A call made while another Python thread is
    inside one on the same engine raises ``RuntimeError`` at once (it would otherwise consume the
    other thread's cached forward); read-only calls (``memory_stats``, ``cache_depth``,
    ``last_timings``, ``profile_stats``) wait for the running call instead, and :meth:`close`
    waits for it before it frees anything. Engines of one process run one at a time and share
    the worker pool and scratch. ``fork()`` is handled: a forked child (``os.fork``, fork-started
    DataLoader workers) can call inherited and new engines; its worker pool starts afresh.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_layout: Literal["fused", "split"] = "fused",
        weight_dtype: Literal["bf16", "int8", "int4"] = "bf16",
        max_tokens: int = 4096,
        max_cache_depth: int = 1,
        num_threads: int | None = None,
        isa: str | None = None,
        group_size: int = 128,
        tp: int | None = 1,
        activation_policy: Literal["retain", "recompute"] = "retain",
        activation_dtype: Literal["bf16", "int8"] = "bf16",
        backward_dtype: Literal["bf16", "int8"] = "bf16",
        activation: Literal["silu", "gelu", "gelu_tanh", "relu2"] = "silu",
        activation_alpha: float = 1.0,
        activation_limit: float | None = None,
        activation_up_offset: float = 0.0,
        activation_gate_softcap: float | None = None,
        activation_up_softcap: float | None = None,
    ) -> None:
        try:
            self._eng = _core.MoEEngine(
                num_experts,
                top_k,
                hidden_size,
                intermediate_size,
                lora_rank=lora_rank,
                lora_alpha=lora_alpha,
                lora_layout=lora_layout,
                weight_dtype=weight_dtype,
                max_tokens=max_tokens,
                max_cache_depth=max_cache_depth,
                num_threads=num_threads,
                isa=isa,
                group_size=group_size,
                tp=tp,
                activation_dtype=activation_dtype,
                backward_dtype=backward_dtype,
                activation_policy=activation_policy,
                activation=activation,
                activation_alpha=activation_alpha,
                activation_limit=activation_limit,
                activation_up_offset=activation_up_offset,
                activation_gate_softcap=activation_gate_softcap,
                activation_up_softcap=activation_up_softcap,
            )
        finally:
            _emit_dispatch_warnings()
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.lora_rank = lora_rank
        self.lora_layout = lora_layout
        self.max_tokens = max_tokens
        self.max_cache_depth = max_cache_depth
        self.weight_dtype = weight_dtype
        self.activation_dtype = activation_dtype
        self.backward_dtype = backward_dtype
        self.group_size = group_size

    # -- properties -------------------------------------------------------------------------

    @property
    def isa(self) -> str:
        """The kernel ISA this engine runs."""
        return str(self._eng.isa)

    @property
    def num_threads(self) -> int:
        """Threads this engine's phases run on (the caller plus pool workers)."""
        return int(self._eng.num_threads)

    @property
    def scaling(self) -> float:
        """LoRA scaling ``lora_alpha / lora_rank`` (1.0 without LoRA)."""
        return float(self._eng.scaling)

    @property
    def activation_policy(self) -> str:
        """``"retain"`` or ``"recompute"``: what later forwards keep for backward (settable;
        forwards already pending keep what they saved)."""
        return str(self._eng.activation_policy)

    @activation_policy.setter
    def activation_policy(self, policy: str) -> None:
        self._eng.activation_policy = policy

    @property
    def cache_depth(self) -> int:
        """Forwards saved for backward and not yet consumed."""
        return int(self._eng.cache_depth)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return bool(self._eng.closed)

    # -- weights ------------------------------------------------------------------------------

    def load_weights(
        self,
        *,
        gate_up: Array | None = None,
        gate: Array | None = None,
        up: Array | None = None,
        down: Array,
    ) -> None:
        """Convert and pack the frozen base weights (float32 or bfloat16, any strides).

        Pass ``gate_up`` (E, 2I, H) with the gate rows first (HF fused experts), or ``gate`` and
        ``up`` (E, I, H) each; ``down`` is (E, H, I). The engine keeps its own packed BF16 copy;
        the arrays may be freed afterwards.
        """
        self._eng.load_weights(gate_up=gate_up, gate=gate, up=up, down=down)

    @property
    def activation(self) -> dict[str, Any]:
        """The activation variant: ``{"name", "alpha", "limit", "up_offset", "gate_softcap",
        "up_softcap"}`` (None: no clamp / cap)."""
        return dict(self._eng.activation)

    def set_biases(
        self,
        *,
        gate_up: Array | None = None,
        gate: Array | None = None,
        up: Array | None = None,
        down: Array | None = None,
    ) -> None:
        """Set frozen biases of the projections (float32 or bfloat16, any strides; copied).

        ``gate_up`` (E, 2I) gate first, or ``gate`` and ``up`` (E, I) each; ``down`` (E, H). Any
        may be omitted (no bias there); each call replaces the earlier biases. Forward adds them
        to the projections' outputs (``g``, ``u`` before the activation; ``y`` before the routing
        weight); backward's ``grad_input`` and ``grad_routing_weights`` include them. LoRA does
        not train them.
        """
        self._eng.set_biases(gate_up=gate_up, gate=gate, up=up, down=down)

    @property
    def has_biases(self) -> tuple[bool, bool]:
        """Whether the engine holds a (gate/up, down) bias."""
        return tuple(self._eng.has_biases)  # type: ignore[return-value]

    def load_quantized_weights(
        self,
        *,
        gate_up: Array | None = None,
        gate_up_scale: Array | None = None,
        gate: Array | None = None,
        gate_scale: Array | None = None,
        up: Array | None = None,
        up_scale: Array | None = None,
        down: Array,
        down_scale: Array,
    ) -> None:
        """Load already-quantized weights (engine created with weight_dtype int8 or int4).

        Codes and scales per weight, in the format of :func:`kt_kernels.quantize_weights`:
        int8 codes ``int8 (E, N, K)`` + scales ``float32 (E, N)``; int4 codes ``uint8
        (E, N, K / 2)`` (even k in the low nibble, two's complement) + scales ``float32
        (E, N, K / group_size)``. ``gate_up`` is (E, 2I, H) gate rows first, or pass ``gate`` and
        ``up`` (E, I, H); ``down`` is (E, H, I). Scales must be finite and >= 0.
        """
        self._eng.load_quantized_weights(
            gate_up=gate_up,
            gate_up_scale=gate_up_scale,
            gate=gate,
            gate_scale=gate_scale,
            up=up,
            up_scale=up_scale,
            down=down,
            down_scale=down_scale,
        )

    def set_lora(
        self,
        *,
        a_gate_up: Array | None = None,
        b_gate_up: Array | None = None,
        a_gate: Array | None = None,
        a_up: Array | None = None,
        b_gate: Array | None = None,
        b_up: Array | None = None,
        a_down: Array | None = None,
        b_down: Array | None = None,
        grad_a_gate_up: Array | None = None,
        grad_b_gate_up: Array | None = None,
        grad_a_gate: Array | None = None,
        grad_a_up: Array | None = None,
        grad_b_gate: Array | None = None,
        grad_b_up: Array | None = None,
        grad_a_down: Array | None = None,
        grad_b_down: Array | None = None,
    ) -> None:
        """Bind the LoRA weights and (optionally) their gradient arrays.

        Fused layout: ``a_gate_up`` (E, r, H), ``b_gate_up`` (E, 2I, r). Split layout:
        ``a_gate``, ``a_up`` (E, r, H), ``b_gate``, ``b_up`` (E, I, r). Both: ``a_down``
        (E, r, I), ``b_down`` (E, H, r). Weights are float32 or bfloat16 with any strides (e.g.
        PEFT's expert-fastest ``lora_B`` viewed as (E, out, r)). Gradient arrays (all or none)
        have the same shapes, are float32 with any strides, and receive ``+=`` in backward.

        Lifetime: the engine keeps a reference to every bound array (through DLPack), so none of
        them can be freed while bound; binding again releases the previous ones. Values are read
        by the next forward or backward after ``set_lora`` or :meth:`lora_updated` (into the
        process-wide LoRA stage, see :func:`kt_kernels.memory_stats`): call ``lora_updated`` after
        changing them in place (an optimizer step). If an array's storage is replaced
        (``param.data = ...``), call ``set_lora`` again.
        """
        params = dict(locals())
        given = {k: v for k, v in params.items() if k != "self" and v is not None}
        self._eng.set_lora(**given)

    def lora_updated(self) -> None:
        """Re-read the bound LoRA weights after their values changed (e.g. an optimizer step)."""
        self._eng.lora_updated()

    # -- compute --------------------------------------------------------------------------------

    def forward(
        self,
        x: Array,
        expert_ids: Array,
        routing_weights: Array,
        out: Array,
        save_for_backward: bool = True,
    ) -> None:
        """Compute ``out[t] = sum_j routing_weights[t, j] * expert_{expert_ids[t, j]}(x[t])``.

        x: (T, H) float32/bfloat16, rows contiguous. expert_ids: (T, K) int64/int32 in [-1, E);
        -1 means "no expert" (its weight is ignored). routing_weights: (T, K) float32/bfloat16.
        out: (T, H) float32/bfloat16, written (not accumulated). With ``save_for_backward`` the
        activations are pushed on the cache for one :meth:`backward`.
        """
        self._eng.forward(x, expert_ids, routing_weights, out, save_for_backward)

    def submit_forward(
        self,
        x: Array,
        expert_ids: Array,
        routing_weights: Array,
        out: Array,
        save_for_backward: bool = True,
    ) -> None:
        """Start :meth:`forward` in the background and return at once; :meth:`sync_forward` waits.

        Arguments are checked before this returns. Until ``sync_forward``, the engine keeps the
        arrays alive, ``out`` must not be read, and any other call on this engine raises
        ``RuntimeError`` (``close`` waits for the forward instead).
        """
        self._eng.submit_forward(x, expert_ids, routing_weights, out, save_for_backward)

    def sync_forward(self) -> None:
        """Wait for the forward started by :meth:`submit_forward`; re-raises its error, if any."""
        self._eng.sync_forward()

    def backward(
        self,
        grad_out: Array,
        grad_input: Array,
        grad_routing_weights: Array,
        x: Array | None = None,
    ) -> None:
        """Backward of the most recent pending forward (last in, first out).

        grad_out: (T, H) float32/bfloat16. Writes grad_input (T, H) and grad_routing_weights
        (T, K) (0 where the id was -1), and adds the LoRA gradients into the bound gradient
        arrays (when given). x: that forward's input again (the same values, float32 or
        bfloat16), required when it ran with ``activation_policy="recompute"`` (its cache entry
        keeps only the routing: backward recomputes x A^T, [g | u] and h Ad^T from x with the
        forward's own tiles), ignored otherwise.
        """
        self._eng.backward(grad_out, grad_input, grad_routing_weights, x)

    def clear_cache(self) -> None:
        """Drop every pending forward (their memory returns to the process-wide pool)."""
        self._eng.clear_cache()

    # -- introspection -----------------------------------------------------------------------

    def memory_stats(self) -> dict[str, int]:
        """Bytes held: ``weight_bytes`` (packed base weights; codes + scales for int8/int4, plus
        per-row code sums for W8A8),
        ``lora_bytes`` (the process-wide LoRA stage: the fp32 kernel-layout copies of the LoRA
        weights of the engines that ran most recently, shared by all engines), ``cache_bytes`` (the cache entries of this
        engine's pending forwards), ``cache_peak_bytes`` (the most ``cache_bytes`` has been) and
        ``scratch_bytes`` (the process-wide scratch pool, shared by all engines: do not sum it
        over engines, nor ``lora_bytes``). Process totals by kind: :func:`kt_kernels.memory_stats`."""
        return {k: int(v) for k, v in self._eng.memory_stats().items()}

    def last_timings(self) -> dict[str, float]:
        """Milliseconds per phase of the last weight load (``load.*``: ``alloc``, then ``pack``
        (bf16 repack), ``quantize`` (int8 / int4 from float weights) or ``copy_codes``
        (:meth:`load_quantized_weights`), and ``total``), the last forward (``forward.*``) and the
        last backward (``backward.*``). W8A8 forwards add ``forward.quantize_x`` and
        ``forward.quantize_h``."""
        return {k: float(v) for k, v in self._eng.last_timings().items()}

    @property
    def tp(self) -> int:
        """Tensor-parallel slices of I this engine uses."""
        return int(self._eng.tp)

    @property
    def pinned_threads(self) -> bool:
        """Whether worker group ``s`` (the threads computing slice ``s``) is pinned to the CPUs of
        NUMA node ``s % nodes``: True when the machine has more than one node, ``tp`` is a
        multiple of the node count and ``KT_PIN_THREADS`` is not ``0``."""
        return bool(self._eng.pinned_threads)

    @property
    def engine_id(self) -> int:
        """Process-unique id of this engine (the ``engine`` of its trace events)."""
        return int(self._eng.engine_id)

    def profile_stats(self) -> dict[str, dict[str, float]]:
        """Per phase (``"load.pack"``, ``"forward.gate_up"``, ..., ``"backward.total"``) of the calls
        this engine ran while the profiler was on (:func:`kt_kernels.profile`): ``calls``,
        ``total_ms``, ``mean_ms``."""
        out = {}
        for name, (calls, total) in self._eng.profile_stats().items():
            out[str(name)] = {
                "calls": int(calls),
                "total_ms": float(total),
                "mean_ms": float(total) / max(int(calls), 1),
            }
        return out

    def profile_summary(self) -> str:
        """:meth:`profile_stats` as a text table, one row per phase in call order, with each
        phase's share of its call's total."""
        stats = self.profile_stats()
        if not stats:
            return "no profiled calls (run the engine inside kt_kernels.profile())"
        rows = [("phase", "calls", "total ms", "mean ms", "% of call")]
        for call in ("load", "forward", "backward"):
            names = [k for k in stats if k.startswith(call + ".")]
            total = stats.get(call + ".total", {}).get("total_ms", 0.0)
            rank = {p: i for i, p in enumerate(_PHASE_ORDER[call])}
            order = sorted(names, key=lambda k: (rank.get(k.split(".", 1)[1], len(rank)), k))
            for k in order:
                st = stats[k]
                share = 100.0 * st["total_ms"] / total if total > 0 else 0.0
                rows.append(
                    (
                        k,
                        str(st["calls"]),
                        f"{st['total_ms']:.3f}",
                        f"{st['mean_ms']:.3f}",
                        f"{share:.1f}",
                    )
                )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
            for r in rows
        ]
        return "\n".join(lines)

    def reset_profile(self) -> None:
        """Forget this engine's profile totals."""
        self._eng.reset_profile()

    def close(self) -> None:
        """Free the packed weights and caches and release the bound arrays. Waits for a
        submitted forward and for a call running on another thread first. Later calls raise
        ``RuntimeError``; closing twice is fine."""
        self._eng.close()

    def __enter__(self) -> MoEEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"isa={self.isa!r}, threads={self.num_threads}"
        return (
            f"MoEEngine(E={self.num_experts}, K={self.top_k}, H={self.hidden_size}, "
            f"I={self.intermediate_size}, r={self.lora_rank}, {self.lora_layout}, {state})"
        )
