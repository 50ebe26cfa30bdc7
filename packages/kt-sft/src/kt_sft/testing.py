"""Helpers for comparing a kt-wrapped model with the stock transformers + PEFT model.

Used by kt-sft's tests and the top-level parity tests (``tests/test_parity_*.py``); usable by
anyone checking kt on their own architecture. The stock side is the reference: fp32 on the
CPU, with the routed experts' weights rounded to bf16 when kt runs the compiled engine (the
engine stores bf16 weights), so the only difference left is the engine's bf16 rounding of
activations (with fp32 accumulation).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kt_sft.config import KTConfig

__all__ = [
    "ModelPair",
    "copy_lora",
    "lora_config_kwargs",
    "make_batch",
    "make_pair",
    "named_trainable",
    "rel_err",
    "round_experts_to_bf16",
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / max(||b||, tiny)`` in fp64."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def round_experts_to_bf16(model: nn.Module) -> None:
    """Round every fused experts module's ``gate_up_proj``/``down_proj`` to bf16 (in place)."""
    with torch.no_grad():
        for module in model.modules():
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(module, name, None)
                if isinstance(p, torch.Tensor) and p.dim() == 3 and p.numel():
                    p.copy_(p.to(torch.bfloat16).to(p.dtype))


@dataclass
class ModelPair:
    """A stock model and its kt-wrapped twin (same weights)."""

    stock: nn.Module
    kt: nn.Module
    cfg: KTConfig


def make_pair(model: nn.Module, cfg: KTConfig) -> ModelPair:
    """Deep-copy ``model`` into a stock reference and a kt-wrapped model.

    With ``cfg.backend == "engine"`` (or ``weight_dtype == "bf16"``) the stock copy's expert
    weights are rounded to bf16 first, as the engine stores them.
    """
    from kt_sft.inject import wrap_model

    stock = copy.deepcopy(model)
    if cfg.weight_dtype == "bf16":
        round_experts_to_bf16(stock)
    kt = copy.deepcopy(model)
    wrap_model(kt, cfg)
    return ModelPair(stock, kt, cfg)


def lora_config_kwargs(
    model: nn.Module,
    *,
    r: int = 4,
    lora_alpha: float = 8.0,
    experts: bool = True,
    attention: bool = True,
    router: bool = True,
) -> dict[str, Any]:
    """``LoraConfig`` kwargs targeting the experts (``target_parameters``), every other linear
    layer (``"all-linear"``: attention, shared experts, dense MLPs, linear routers) and, when
    the router is not an ``nn.Linear``, its weight parameter."""
    from kt_models import get_arch_spec, unwrap_model

    spec = get_arch_spec(model)
    base = unwrap_model(model)
    kwargs: dict[str, Any] = {"r": r, "lora_alpha": lora_alpha, "lora_dropout": 0.0}
    params: list[str] = []
    if experts:
        prefix = f"{spec.moe_block_attr}.{spec.experts_attr}"
        params += [f"{prefix}.gate_up_proj", f"{prefix}.down_proj"]
    if router:
        layer = spec.moe_layer_indices(base.config)[0]
        gate = spec.router(base, layer)
        if not isinstance(gate, nn.Linear) and isinstance(
            getattr(gate, "weight", None), torch.Tensor
        ):
            params.append(f"{spec.moe_block_attr}.{spec.router_attr}.weight")
    if params:
        kwargs["target_parameters"] = params
    if attention:
        # Every nn.Linear but the output head, by leaf name (what "all-linear" means; spelled out
        # because PEFT's "all-linear" shortcut combined with target_parameters gives the
        # experts' gate_up_proj LoRA twice the rank).
        head = base.get_output_embeddings()
        names = sorted(
            {
                name.rpartition(".")[2]
                for name, m in base.named_modules()
                if isinstance(m, nn.Linear) and m is not head
            }
        )
        kwargs["target_modules"] = names
    elif not params:
        raise ValueError("nothing to target")
    else:
        kwargs["target_modules"] = []
    return kwargs


def named_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, param)`` of every parameter that requires grad."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name, p


def copy_lora(src: nn.Module, dst: nn.Module, *, b_std: float | None = 0.02, seed: int = 0) -> None:
    """Give ``dst`` the LoRA values of ``src`` (same names).

    With ``b_std``, both first get fresh values from ``seed``: ``lora_B`` normal with that
    standard deviation (PEFT starts B at zero, which would zero every A gradient) and ``lora_A``
    from PEFT's default distribution, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so the values do not
    depend on the order in which a PEFT release creates its layers from the global RNG."""
    src_params = dict(named_trainable(src))
    dst_params = dict(named_trainable(dst))
    if src_params.keys() != dst_params.keys():
        only_src = sorted(src_params.keys() - dst_params.keys())[:5]
        only_dst = sorted(dst_params.keys() - src_params.keys())[:5]
        raise AssertionError(
            f"trainable parameters differ: stock-only {only_src}, kt-only {only_dst}"
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(src_params.items()):
            if b_std is not None and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
            elif b_std is not None and "lora_A" in name:
                bound = 1.0 / math.sqrt(p.shape[-1])
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            dst_params[name].copy_(p)


def make_batch(
    vocab_size: int,
    *,
    batch: int = 2,
    seq: int = 12,
    pad: int = 0,
    pad_side: str = "right",
    seed: int = 0,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (−100 at padding), deterministic."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        for row in range(1, batch):
            n = min(pad * row, seq - 2)
            if pad_side == "right":
                mask[row, seq - n :] = 0
            else:
                mask[row, :n] = 0
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_token_id))
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
