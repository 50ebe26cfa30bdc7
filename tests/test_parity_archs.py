"""Parity: one LoRA training step with kt vs stock transformers + PEFT, every architecture.

For each registered architecture's tiny model (kt-models), the same weights, batch and LoRA
initialisation go through the stock model with PEFT (fp32, CPU) and through the kt-wrapped model
with the same ``LoraConfig``: LoRA on the routed experts (``target_parameters``), on every other
linear layer (attention, shared experts, dense MLPs, linear routers) and on the router weight
where the router is not an ``nn.Linear``. Compared: the loss and every LoRA gradient with
stock's, and after one AdamW step kt's weights with the same step taken on plain tensors (see
below); plain, with gradient checkpointing (reentrant and non-reentrant), with gradient
accumulation over two micro-batches, and with padded batches (attention masks).

Tolerances (relative L2 error unless stated), and why:

* ``backend="engine"`` (the compiled kt-kernels engine): expert weights are bf16 in the engine,
  so the stock model's expert weights are rounded to bf16 first; what remains is the engine's
  bf16 rounding of activations (x, the SwiGLU hidden state and the LoRA intermediates) with
  fp32 accumulation: 2^-9 relative per rounding, a handful of roundings per path, partly
  cancelling. Observed on these models (``copy_lora``'s seed 0, every scenario): loss ≤ 3.1e-6
  relative, gradients ≤ 9.0e-3. Tolerances: loss 1e-4, gradients 2e-2.
* ``backend="torch"`` (kt's fp32 PyTorch reference of the operator): the same math in fp32, only
  the summation order differs from HF's expert loop. Observed: loss ≤ 1e-7, gradients ≤ 1.2e-6.
  Tolerances: loss 1e-5, gradients 1e-4.

Weights after AdamW are not compared with stock's: Adam's first step is lr·g/(|g| + eps) per
element, so a component whose gradient is within its rounding of zero may step either way (by up
to 2·lr), and which components do depends on the random LoRA values (a PEFT release that creates
its layers in another order moved such tolerances past their limits), not on kt. Instead kt's
weights must equal, bit for bit, the same AdamW step taken on plain tensors holding the initial
values and kt's gradients: the optimizer sees kt's parameters as ordinary leaves.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

import kt_sft
from kt_sft.backend import engine_available
from kt_sft.testing import (
    copy_lora,
    lora_config_kwargs,
    make_batch,
    make_pair,
    named_trainable,
    rel_err,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # transformers' renamed checkpointing API
    # PEFT's transformers-4 target conversion adds rank/alpha patterns some archs do not use
    pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning"),
]

kt_models = pytest.importorskip("kt_models")
tiny = pytest.importorskip("kt_models.tiny")

ARCHS = kt_models.supported_model_types()
BACKENDS = [
    pytest.param(
        "engine",
        marks=pytest.mark.skipif(not engine_available(), reason="kt-kernels engine not built"),
    ),
    "torch",
]
SCENARIOS = ["plain", "gc_reentrant", "gc_non_reentrant", "accum2", "padding"]

TOL = {
    "engine": {"loss": 1e-4, "grad": 2e-2},
    "torch": {"loss": 1e-5, "grad": 1e-4},
}
LR = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Any:
    # Tiny matrices: torch's intra-op threads only add overhead (and thrash on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    return {}


def _model(cache: dict[str, torch.nn.Module], arch: str) -> torch.nn.Module:
    if arch not in cache:
        cache[arch] = tiny.build(arch)
    return cache[arch]


def _cfg(backend: str) -> kt_sft.KTConfig:
    # LoRA r=4 for PEFT; the engine is built for rank 8: PEFT's v4->v5 target conversion gives
    # gate_up_proj rank 2r when gate_proj and up_proj are both targeted (as here, through the
    # dense / shared-expert MLP names), and down_proj rank r (bound zero-padded).
    return kt_sft.KTConfig(
        backend=backend,
        weight_dtype="bf16" if backend == "engine" else "fp32",
        lora_rank=8,
        lora_alpha=16.0,
    )


def _vocab(model: torch.nn.Module) -> int:
    return int(model.config.get_text_config().vocab_size)


def _run(pm: Any, scenario: str, vocab: int) -> float:
    pm.train()
    if scenario in ("gc_reentrant", "gc_non_reentrant"):
        # HF's activation checkpointing (the new name of gradient_checkpointing_enable)
        pm.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": scenario == "gc_reentrant"}
        )
    if scenario == "accum2":
        batch = make_batch(vocab, batch=4, seq=10, seed=1)
        total = 0.0
        for i in range(2):
            micro = {k: v[2 * i : 2 * i + 2] for k, v in batch.items()}
            loss = pm(**micro).loss / 2
            loss.backward()
            total += float(loss.detach())
        return total
    batch = make_batch(
        vocab, batch=3, seq=12, seed=2, pad=4 if scenario == "padding" else 0, pad_side="left"
    )
    loss = pm(**batch).loss
    loss.backward()
    return float(loss.detach())


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_parity(tiny_models: dict, arch: str, backend: str, scenario: str) -> None:
    model = _model(tiny_models, arch)
    tol = TOL[backend]
    pair = make_pair(model, _cfg(backend))
    kwargs = lora_config_kwargs(pair.stock)
    torch.manual_seed(0)
    stock = get_peft_model(pair.stock, LoraConfig(**kwargs))
    kt = kt_sft.get_peft_model(pair.kt, LoraConfig(**copy.deepcopy(kwargs)))
    copy_lora(stock, kt)  # same LoRA values, B non-zero so every A gets a gradient
    before = {n: p.detach().clone() for n, p in named_trainable(stock)}

    vocab = _vocab(model)
    loss_stock = _run(stock, scenario, vocab)
    loss_kt = _run(kt, scenario, vocab)
    assert abs(loss_kt - loss_stock) <= tol["loss"] * abs(loss_stock), (loss_kt, loss_stock)

    stock_params = dict(named_trainable(stock))
    kt_params = dict(named_trainable(kt))
    assert stock_params.keys() == kt_params.keys()
    expert_grads = 0
    for name, p in stock_params.items():
        q = kt_params[name]
        if p.grad is None:
            assert q.grad is None or float(q.grad.abs().max()) == 0.0, name
            continue
        assert q.grad is not None, f"{name}: no gradient on the kt side"
        err = rel_err(q.grad, p.grad)
        assert err <= tol["grad"], f"{name}: gradient relative error {err:.2e}"
        expert_grads += ".experts." in name
    assert expert_grads >= 4  # the routed experts' LoRA was trained and compared

    if scenario in ("plain", "accum2"):
        # kt's LoRA parameters take the step plain tensors with their values and gradients take
        # (why not stock's weights: the module docstring).
        kt_leaves = [(name, q) for name, q in named_trainable(kt) if q.grad is not None]
        plain = [before[name].clone().requires_grad_(True) for name, _ in kt_leaves]
        for t, (_, q) in zip(plain, kt_leaves):
            t.grad = q.grad.detach().clone()
        for params in ([q for _, q in kt_leaves], plain):
            torch.optim.AdamW(params, lr=LR).step()
        for t, (name, q) in zip(plain, kt_leaves):
            assert torch.equal(q.detach(), t.detach()), f"{name}: AdamW step differs"
            assert not torch.equal(q.detach(), before[name]), f"{name}: not updated"
    assert all(layer.pending_forwards == 0 for _, _, layer in kt_sft.inject.experts_layers(kt))
    kt_sft.close(kt)
