"""The gatings of routed experts that the compiled engine computes besides plain SwiGLU.

transformers' experts interface gives each experts class ``_apply_gate(gate_up) -> h``: the
default ``act_fn(gate) * up``, or a class override. The engine computes one family of gatings
(``kt_kernels.MoEEngine``'s ``activation*`` options):

    h = f(min(gate, limit)) * (cap_u(clamp(up, -limit, limit)) + up_offset)

with ``f`` SiLU with a scaled sigmoid and an optional soft-capped linear factor
(``cap_g(g) * sigmoid(alpha * g)``, ``cap_c(x) = c tanh(x / c)``), GELU (erf or tanh form) or
ReLU^2. That covers gpt-oss (``alpha`` 1.702, ``limit`` 7, ``up_offset`` 1, gate and up
interleaved), MiniMax-M3 (the same, concatenated), the clamped SwiGLU of DeepSeek-V4 and HY-V4
and Inkling-2's soft-capped SwiGLU (caps 4 and 25). :func:`match_gating` finds the member of the
family an override computes: candidates built from the module's own attributes (``limit`` /
``swiglu_limit``, ``alpha`` / ``swiglu_alpha``, soft-caps of its ``act_fn`` or config, its
``act_fn``) are compared with the override on seeded probes that reach far past any limit, and
the first that agrees to float32 rounding wins. Nothing is accepted on the strength of a name
alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ENGINE_ACTIVATIONS", "Gating", "match_gating"]

#: transformers ``ACT2FN`` names -> the engine's activation names.
ENGINE_ACTIVATIONS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu2": "relu2",
}

# Probe magnitudes: limits in transformers' configs are single or double digits.
_PROBE_SCALES = (0.5, 2.0, 10.0, 100.0)
# float32: the candidate and the override may order their operations differently.
_RTOL = 1e-5


@dataclass(frozen=True)
class Gating:
    """One member of the engine's gating family (see the module docstring)."""

    #: engine activation name: ``silu``, ``gelu``, ``gelu_tanh`` or ``relu2``
    activation: str = "silu"
    alpha: float = 1.0
    #: ``None``: no clamp
    limit: float | None = None
    up_offset: float = 0.0
    #: gate and up columns alternate (``is_concatenated=False``) instead of ``[gate | up]``
    interleaved: bool = False
    #: soft-caps ``c tanh(x / c)`` of the gate's linear factor and of up (``None``: none)
    gate_softcap: float | None = None
    up_softcap: float | None = None

    @property
    def is_default(self) -> bool:
        """Plain ``act(gate) * up`` on concatenated gate/up."""
        return (
            self.alpha == 1.0
            and self.limit is None
            and self.up_offset == 0.0
            and not self.interleaved
            and self.gate_softcap is None
            and self.up_softcap is None
        )

    def engine_kwargs(self) -> dict[str, Any]:
        """The ``kt_kernels.MoEEngine`` activation options of this gating."""
        return {
            "activation": self.activation,
            "activation_alpha": self.alpha,
            "activation_limit": self.limit,
            "activation_up_offset": self.up_offset,
            "activation_gate_softcap": self.gate_softcap,
            "activation_up_softcap": self.up_softcap,
        }

    def describe(self) -> str:
        """Short text for tables and messages (``"silu, alpha 1.702, limit 7, up + 1"``)."""
        parts = [self.activation]
        if self.alpha != 1.0:
            parts.append(f"alpha {self.alpha:g}")
        if self.limit is not None:
            parts.append(f"limit {self.limit:g}")
        if self.up_offset:
            parts.append(f"up + {self.up_offset:g}")
        if self.gate_softcap is not None:
            parts.append(f"gate soft-cap {self.gate_softcap:g}")
        if self.up_softcap is not None:
            parts.append(f"up soft-cap {self.up_softcap:g}")
        return ", ".join(parts)

    def split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) of the last dim of ``gate_up`` in this gating's column order."""
        if self.interleaved:
            return gate_up[..., 0::2], gate_up[..., 1::2]
        return gate_up.chunk(2, dim=-1)

    def apply(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``h`` of ``gate_up`` (last dim ``2I``) in torch, the engine's formula."""
        gate, up = self.split(gate_up)
        if self.limit is not None:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
        if self.up_softcap is not None:
            up = torch.tanh(up / self.up_softcap) * self.up_softcap
        if self.activation == "silu":
            lin = gate
            if self.gate_softcap is not None:
                lin = torch.tanh(gate / self.gate_softcap) * self.gate_softcap
            f = lin * torch.sigmoid(gate * self.alpha)
        elif self.activation == "gelu":
            f = torch.nn.functional.gelu(gate)
        elif self.activation == "gelu_tanh":
            f = torch.nn.functional.gelu(gate, approximate="tanh")
        else:
            f = torch.relu(gate) ** 2
        return f * (up + self.up_offset)


def _number(module: nn.Module, names: tuple[str, ...]) -> float | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)) and value > 0:
                return float(value)
    return None


def _softcaps(module: nn.Module) -> tuple[float | None, float | None]:
    """Soft-caps the module declares: its act_fn's ``gate_softcap`` / ``up_softcap`` children
    (with a ``softcap`` value), else its config's ``mlp_gate_softcap`` / ``mlp_up_softcap``."""
    act = getattr(module, "act_fn", None)
    config = getattr(module, "config", None)
    caps: list[float | None] = []
    for which in ("gate", "up"):
        holder = getattr(act, f"{which}_softcap", None) if act is not None else None
        value = _number(holder, ("softcap",)) if isinstance(holder, nn.Module) else None
        if value is None and config is not None:
            value = _number(config, (f"mlp_{which}_softcap",))
        caps.append(value)
    return caps[0], caps[1]


def _candidates(module: nn.Module, activation: str | None) -> list[Gating]:
    interleaved = not bool(getattr(module, "is_concatenated", True))
    limit = _number(module, ("limit", "swiglu_limit"))
    alpha = _number(module, ("alpha", "swiglu_alpha"))
    gate_cap, up_cap = _softcaps(module)
    engine_act = ENGINE_ACTIVATIONS.get(activation or "silu", None)
    out: list[Gating] = []
    acts = [engine_act] if engine_act is not None else []
    if "silu" not in acts:
        acts.append("silu")  # e.g. a GLU written as g * sigmoid(alpha g) with no act_fn
    for act in acts:
        alphas = [1.0] if act != "silu" or alpha is None else [alpha, 1.0]
        for a in alphas:
            for lim in [limit, None] if limit is not None else [None]:
                for off in (0.0, 1.0):
                    out.append(Gating(act, a, lim, off, interleaved))
    if gate_cap is not None or up_cap is not None:
        out.append(Gating("silu", alpha or 1.0, limit, 0.0, interleaved, gate_cap, up_cap))
    return out


def match_gating(module: nn.Module, inter: int, activation: str | None = None) -> Gating | None:
    """The :class:`Gating` that ``module``'s ``_apply_gate`` computes, or ``None``.

    ``activation`` is the ``ACT2FN`` name of the module's ``act_fn`` (``None``: none or not
    one). Every candidate is compared with the override on seeded float32 probes of width
    ``2 * min(inter, 256)`` at each of several magnitudes; it matches when all outputs agree to
    a relative 1e-5 of the largest. A failing override (or none that matches) gives ``None``.
    """
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is None:
        return None
    width = max(1, min(int(inter), 256))
    gen = torch.Generator().manual_seed(0)
    probes = [
        torch.randn(16, 2 * width, generator=gen, dtype=torch.float32) * s for s in _PROBE_SCALES
    ]
    try:
        with torch.no_grad():
            wants = [apply_gate(module, p.clone()).float() for p in probes]
    except Exception:
        return None
    for cand in _candidates(module, activation):
        ok = True
        for p, want in zip(probes, wants):
            got = cand.apply(p)
            if got.shape != want.shape or not torch.isfinite(want).all():
                ok = False
                break
            scale = float(want.abs().max()) or 1.0
            if float((got - want).abs().max()) > _RTOL * scale:
                ok = False
                break
        if ok:
            return cand
    return None
