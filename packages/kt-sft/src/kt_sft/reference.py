"""The routed-experts operator in plain PyTorch, with the engine's Python API.

:class:`TorchMoEEngine` computes exactly the math of DESIGN §2 in fp32 (frozen weights rounded
to ``weight_dtype`` first) and offers the same methods as ``kt_kernels.MoEEngine``: weights are
loaded once, LoRA arrays are bound by reference (``set_lora``) and gradients are *accumulated*
into the bound gradient arrays; forwards push an entry on a LIFO cache of depth
``max_cache_depth`` and backwards pop it. It is the fp32 reference kt-sft's tests compare the
engine with, and the backend selected by ``KTConfig(backend="torch")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kt_sft.options import ExpertsOptions

__all__ = ["ACTIVATIONS", "TorchMoEEngine", "gated", "moe_reference"]

#: Gate activations the operator implements, by HF ``hidden_act`` name.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda t: F.relu(t) ** 2,
}


def gated(
    activation: str = "silu", options: dict[str, Any] | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``h(g, u)`` of the engine's activation options (``kt_kernels.MoEEngine``):
    ``f(min(g, limit)) * (cap_u(clamp(u, -limit, limit)) + up_offset)``, ``f`` the activation
    (SiLU: ``cap_g(g) * sigmoid(alpha * g)``, ``cap_c(x) = c tanh(x / c)``). No options:
    ``act(g) * u``."""
    act = ACTIVATIONS[activation]
    if not options:
        return lambda g, u: act(g) * u
    alpha = float(options.get("activation_alpha", 1.0))
    limit = options.get("activation_limit")
    offset = float(options.get("activation_up_offset", 0.0))
    gate_cap = options.get("activation_gate_softcap")
    up_cap = options.get("activation_up_softcap")
    if (alpha != 1.0 or gate_cap is not None or up_cap is not None) and act is not F.silu:
        raise ValueError(f"activation options {options} need the 'silu' activation")

    def h(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if limit is not None:
            g = g.clamp(max=float(limit))
            u = u.clamp(min=-float(limit), max=float(limit))
        if up_cap is not None:
            u = torch.tanh(u / float(up_cap)) * float(up_cap)
        if gate_cap is not None:
            f = torch.tanh(g / float(gate_cap)) * float(gate_cap) * torch.sigmoid(g * alpha)
        else:
            f = g * torch.sigmoid(g * alpha) if alpha != 1.0 else act(g)
        return f * (u + offset)

    return h


_FUSED = ("a_gate_up", "b_gate_up", "a_down", "b_down")
_SPLIT = ("a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down")
_WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def moe_reference(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    routing_weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    lora: dict[str, torch.Tensor] | None = None,
    scaling: float | dict[str, float] = 0.0,
    activation: str = "silu",
    return_expert_outputs: bool = False,
    activation_options: dict[str, Any] | None = None,
    biases: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Differentiable fp32 routed-experts forward (DESIGN §2).

    Args:
        x: ``T x H``. expert_ids: ``T x K`` int (−1 = no expert). routing_weights: ``T x K``.
        gate, up: ``E x I x H``; down: ``E x H x I`` (HF ``nn.Linear`` layout).
        lora: per-expert arrays, fused (``a_gate_up E×r×H``, ``b_gate_up E×2I×r``, ``a_down``,
            ``b_down``) or split (``a_gate``, ``b_gate``, ``a_up``, ``b_up``, ``a_down``,
            ``b_down``); absent pairs contribute nothing; ``None`` for no LoRA.
        scaling: the LoRA scaling, or one per kind (``gate_up``, ``gate``, ``up``, ``down``).
        return_expert_outputs: also return the per-slot expert outputs ``T x K x H``.
        activation_options: the engine's ``activation_alpha`` / ``_limit`` / ``_up_offset``
            (see :func:`gated`).
        biases: frozen ``gate`` / ``up`` (``E x I``) and ``down`` (``E x H``) biases, any of them.
    """
    gate_fn = gated(activation, activation_options)
    biases = biases or {}
    if isinstance(scaling, dict):
        s_of = {k: float(scaling.get(k, 0.0)) for k in ("gate_up", "gate", "up", "down")}
    else:
        s_of = dict.fromkeys(("gate_up", "gate", "up", "down"), float(scaling))
    num_tokens, top_k = expert_ids.shape
    hidden = x.shape[-1]
    inter = gate.shape[1]
    flat_ids = expert_ids.reshape(-1).long()
    token_of = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)
    slot_out = x.new_zeros(num_tokens * top_k, hidden)
    for e in torch.unique(flat_ids[flat_ids >= 0]).tolist():
        sel = (flat_ids == e).nonzero().squeeze(1)
        xs = x.index_select(0, token_of[sel])
        g = xs @ gate[e].T
        u = xs @ up[e].T
        if lora:
            if "a_gate_up" in lora:
                gu = (xs @ lora["a_gate_up"][e].T) @ lora["b_gate_up"][e].T
                g = g + s_of["gate_up"] * gu[:, :inter]
                u = u + s_of["gate_up"] * gu[:, inter:]
            if "a_gate" in lora:
                g = g + s_of["gate"] * (xs @ lora["a_gate"][e].T) @ lora["b_gate"][e].T
            if "a_up" in lora:
                u = u + s_of["up"] * (xs @ lora["a_up"][e].T) @ lora["b_up"][e].T
        if "gate" in biases:
            g = g + biases["gate"][e]
        if "up" in biases:
            u = u + biases["up"][e]
        h = gate_fn(g, u)
        y = h @ down[e].T
        if lora and "a_down" in lora:
            y = y + s_of["down"] * (h @ lora["a_down"][e].T) @ lora["b_down"][e].T
        if "down" in biases:
            y = y + biases["down"][e]
        slot_out = slot_out.index_copy(0, sel, y)
    weights = torch.where(
        expert_ids >= 0,
        routing_weights.to(x.dtype),
        torch.zeros((), dtype=x.dtype, device=x.device),
    )
    per_slot = slot_out.view(num_tokens, top_k, hidden)
    out = (per_slot * weights.unsqueeze(-1)).sum(dim=1)
    if return_expert_outputs:
        return out, per_slot
    return out


class TorchMoEEngine:
    """PyTorch implementation of the ``kt_kernels.MoEEngine`` API (fp32 math).

    Arrays are torch tensors. LoRA arrays given to :meth:`set_lora` are kept by reference and
    read at every call (``lora_updated`` is accepted and does nothing); LoRA gradients are added
    into the bound gradient arrays. An :class:`~kt_sft.experts_backend.ExpertsBackend` that
    always retains its activations.
    """

    collective = False
    supports_recompute = False

    @classmethod
    def from_options(
        cls,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        options: ExpertsOptions,
    ) -> TorchMoEEngine:
        """The reference for one layer built with ``options`` (``backend="torch"``)."""
        return cls(
            num_experts,
            top_k,
            hidden_size,
            intermediate_size,
            lora_rank=options.lora_rank,
            lora_alpha=options.lora_alpha,
            lora_layout=options.lora_layout,
            weight_dtype=options.weight_dtype,
            max_tokens=options.max_tokens,
            max_cache_depth=options.max_cache_depth,
            num_threads=options.num_threads,
            isa=options.isa,
            activation=options.activation,
            activation_alpha=options.activation_alpha,
            activation_limit=options.activation_limit,
            activation_up_offset=options.activation_up_offset,
            activation_gate_softcap=options.activation_gate_softcap,
            activation_up_softcap=options.activation_up_softcap,
        )

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_layout: str = "fused",
        weight_dtype: str = "bf16",
        max_tokens: int = 4096,
        max_cache_depth: int = 1,
        num_threads: int | None = None,
        isa: str | None = None,
        activation: str = "silu",
        activation_alpha: float = 1.0,
        activation_limit: float | None = None,
        activation_up_offset: float = 0.0,
        activation_gate_softcap: float | None = None,
        activation_up_softcap: float | None = None,
        **_: Any,
    ) -> None:
        if lora_layout not in ("fused", "split"):
            raise ValueError(f"lora_layout must be 'fused' or 'split', got {lora_layout!r}")
        if weight_dtype not in _WEIGHT_DTYPES:
            raise ValueError(
                f"weight_dtype must be one of {sorted(_WEIGHT_DTYPES)} for the torch "
                f"backend, got {weight_dtype!r}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else lora_rank)
        self.lora_layout = lora_layout
        self.weight_dtype = weight_dtype
        self.max_tokens = max_tokens
        self.max_cache_depth = max_cache_depth
        self.activation = activation
        self.activation_options = {
            "activation_alpha": float(activation_alpha),
            "activation_limit": activation_limit,
            "activation_up_offset": float(activation_up_offset),
            "activation_gate_softcap": activation_gate_softcap,
            "activation_up_softcap": activation_up_softcap,
        }
        gated(activation, self.activation_options)  # checks the options
        self._biases: dict[str, torch.Tensor] = {}
        self._weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._lora: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending: tuple[Any, ...] | None = None
        self._closed = False

    # -- setup ----------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def activation_policy(self) -> str:
        """Always ``"retain"``: the reference keeps its inputs for backward."""
        return "retain"

    @activation_policy.setter
    def activation_policy(self, policy: str) -> None:
        if policy != "retain":
            raise ValueError(f"the torch reference only retains activations, got {policy!r}")

    def last_timings(self) -> dict[str, float]:
        """No per-phase timings (an empty dict)."""
        return {}

    @property
    def cache_depth(self) -> int:
        """Forwards saved for backward and not yet popped."""
        return len(self._cache)

    def load_weights(
        self,
        *,
        gate_up: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
        up: torch.Tensor | None = None,
        down: torch.Tensor,
    ) -> None:
        self._check_open()
        dtype = _WEIGHT_DTYPES[self.weight_dtype]
        E, inter, hidden = self.num_experts, self.intermediate_size, self.hidden_size
        if gate_up is not None:
            _check_shape("gate_up", gate_up, (E, 2 * inter, hidden))
            gate, up = gate_up[:, :inter], gate_up[:, inter:]
        if gate is None or up is None:
            raise ValueError("load_weights needs gate_up=, or gate= and up=")
        _check_shape("gate", gate, (E, inter, hidden))
        _check_shape("up", up, (E, inter, hidden))
        _check_shape("down", down, (E, hidden, inter))
        self._weights = tuple(  # type: ignore[assignment]
            t.detach().to("cpu", dtype).to(torch.float32).contiguous() for t in (gate, up, down)
        )

    def set_biases(
        self,
        *,
        gate_up: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
        up: torch.Tensor | None = None,
        down: torch.Tensor | None = None,
    ) -> None:
        """Frozen biases (``kt_kernels.MoEEngine.set_biases``); each call replaces the last."""
        self._check_open()
        E, inter, hidden = self.num_experts, self.intermediate_size, self.hidden_size
        if gate_up is not None:
            _check_shape("gate_up", gate_up, (E, 2 * inter))
            gate, up = gate_up[:, :inter], gate_up[:, inter:]
        arrays = {"gate": gate, "up": up, "down": down}
        shapes = {"gate": (E, inter), "up": (E, inter), "down": (E, hidden)}
        self._biases = {}
        for name, t in arrays.items():
            if t is not None:
                _check_shape(name, t, shapes[name])
                self._biases[name] = t.detach().to("cpu", torch.float32).contiguous()

    def set_lora(self, **arrays: torch.Tensor) -> None:
        self._check_open()
        names = _FUSED if self.lora_layout == "fused" else _SPLIT
        unknown = set(arrays) - set(names) - {f"grad_{n}" for n in names}
        if unknown:
            raise ValueError(
                f"set_lora got unknown arrays {sorted(unknown)} for the "
                f"{self.lora_layout} layout (expected {names} and grad_*)"
            )
        missing = [n for n in names if n not in arrays]
        if missing:
            raise ValueError(f"set_lora is missing {missing}")
        E, r, H, inter = self.num_experts, self.lora_rank, self.hidden_size, self.intermediate_size
        shapes = {
            "a_gate_up": (E, r, H),
            "b_gate_up": (E, 2 * inter, r),
            "a_gate": (E, r, H),
            "b_gate": (E, inter, r),
            "a_up": (E, r, H),
            "b_up": (E, inter, r),
            "a_down": (E, r, inter),
            "b_down": (E, H, r),
        }
        for name in names:
            _check_shape(name, arrays[name], shapes[name])
            grad = arrays.get(f"grad_{name}")
            if grad is not None:
                _check_shape(f"grad_{name}", grad, shapes[name])
                if grad.dtype != torch.float32:
                    raise TypeError(f"grad_{name} must be float32, got {grad.dtype}")
        self._lora = {n: arrays[n] for n in names}
        self._grads = {n: arrays[f"grad_{n}"] for n in names if f"grad_{n}" in arrays}

    def lora_updated(self) -> None:
        self._check_open()

    # -- compute --------------------------------------------------------------------------
    def _lora_fp32(self) -> dict[str, torch.Tensor] | None:
        if not self.lora_rank:
            return None
        if not self._lora:
            raise RuntimeError("lora_rank > 0 but set_lora() was not called")
        return {n: t.detach().to(torch.float32) for n, t in self._lora.items()}

    def forward(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        routing_weights: torch.Tensor,
        out: torch.Tensor,
        save_for_backward: bool = True,
    ) -> None:
        self._check_open()
        if self._weights is None:
            raise RuntimeError("load_weights() must be called before forward()")
        self._check_inputs(x, expert_ids, routing_weights)
        if save_for_backward and len(self._cache) >= self.max_cache_depth:
            raise RuntimeError(
                f"activation cache full: {len(self._cache)} forwards await their "
                f"backward (max_cache_depth={self.max_cache_depth})"
            )
        if x.shape[0] > self.max_tokens:
            self.max_tokens = int(x.shape[0])  # grows on demand
        xf = x.detach().to(torch.float32)
        with torch.no_grad():
            y = moe_reference(
                xf,
                expert_ids,
                routing_weights.detach().to(torch.float32),
                *self._weights,
                lora=self._lora_fp32(),
                scaling=self.scaling,
                activation=self.activation,
                activation_options=self.activation_options,
                biases=self._biases,
            )
        out.copy_(y)
        if save_for_backward:
            self._cache.append(
                (
                    xf.clone(),
                    expert_ids.detach().clone(),
                    routing_weights.detach().to(torch.float32).clone(),
                )
            )

    def submit_forward(self, *args: Any, **kwargs: Any) -> None:
        if self._pending is not None:
            raise RuntimeError("submit_forward() called twice without sync_forward()")
        self.forward(*args, **kwargs)
        self._pending = ()

    def sync_forward(self) -> None:
        if self._pending is None:
            raise RuntimeError("sync_forward() without a pending submit_forward()")
        self._pending = None

    def backward(
        self,
        grad_out: torch.Tensor,
        grad_input: torch.Tensor,
        grad_routing_weights: torch.Tensor,
        *,
        x: torch.Tensor | None = None,
    ) -> None:
        """``x`` is accepted for the engine's API; the reference kept its own copy."""
        self._check_open()
        if not self._cache:
            raise RuntimeError(
                "backward() without a pending forward (the activation cache is empty)"
            )
        assert self._weights is not None
        x, ids, w = self._cache.pop()
        x = x.requires_grad_(True)
        w = w.requires_grad_(True)
        lora = self._lora_fp32()
        leaves = []
        if lora is not None:
            lora = {n: t.clone().requires_grad_(True) for n, t in lora.items()}
            leaves = list(lora.values())
        with torch.enable_grad():
            y = moe_reference(
                x,
                ids,
                w,
                *self._weights,
                lora=lora,
                scaling=self.scaling,
                activation=self.activation,
                activation_options=self.activation_options,
                biases=self._biases,
            )
            grads = torch.autograd.grad(
                y, [x, w, *leaves], grad_out.detach().to(torch.float32), allow_unused=True
            )
        dx = grads[0] if grads[0] is not None else torch.zeros_like(x)
        dw = grads[1] if grads[1] is not None else torch.zeros_like(w)
        grad_input.copy_(dx)
        grad_routing_weights.copy_(torch.where(ids >= 0, dw, torch.zeros_like(dw)))
        if lora is not None:
            for (name, _), g in zip(lora.items(), grads[2:]):
                target = self._grads.get(name)
                if target is not None and g is not None:
                    target.add_(g.to(target.dtype))

    def clear_cache(self) -> None:
        """Drop every pending forward."""
        self._cache.clear()

    def close(self) -> None:
        self._weights = None
        self._lora = {}
        self._grads = {}
        self._cache.clear()
        self._closed = True

    # -- checks ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine was closed")

    def _check_inputs(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x must be T x {self.hidden_size}, got {tuple(x.shape)}")
        if ids.shape != (x.shape[0], self.top_k) or w.shape != ids.shape:
            raise ValueError(
                f"expert_ids and routing_weights must be {x.shape[0]} x {self.top_k}, "
                f"got {tuple(ids.shape)} and {tuple(w.shape)}"
            )
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.num_experts):
            raise ValueError(f"expert_ids must lie in [-1, {self.num_experts})")


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
