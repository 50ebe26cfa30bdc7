"""A no-grad forward with the adapter disabled between a forward and its backward (what TRL's
DPO reference pass does) under non-reentrant gradient checkpointing: training goes on and
gives the same losses and gradients as without the extra forward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig

import kt_sft
from kt_sft.testing import make_batch

tiny = pytest.importorskip("kt_models.tiny")


def _train(base: torch.nn.Module, *, interleave: bool, steps: int = 3):
    torch.manual_seed(0)
    kt = kt_sft.wrap_model(
        copy.deepcopy(base), kt_sft.KTConfig(lora_rank=4, lora_alpha=8.0, num_threads=1)
    )
    pm = kt_sft.get_peft_model(
        kt,
        LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights=False,
            target_modules=["q_proj", "v_proj"],
            **kt_sft.default_expert_lora_targets(kt),
        ),
    )
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = make_batch(128)
    losses, grads = [], []
    for _ in range(steps):
        out = pm(input_ids=batch["input_ids"], labels=batch["input_ids"])
        if interleave:
            with torch.no_grad(), pm.disable_adapter():
                pm(input_ids=batch["input_ids"])
        out.loss.backward()
        losses.append(float(out.loss))
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad()
    kt_sft.close(pm)
    return losses, grads


def test_disabled_adapter_forward_between_forward_and_backward() -> None:
    base = tiny.build("qwen3_moe")
    want_losses, want_grads = _train(base, interleave=False)
    losses, grads = _train(base, interleave=True)
    assert losses == want_losses
    for step_want, step_got in zip(want_grads, grads):
        for w, g in zip(step_want, step_got):
            assert torch.equal(w, g)
