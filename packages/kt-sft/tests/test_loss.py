"""The chunked next-token loss equals cross-entropy over the whole logits tensor, with the same
gradients, on a kt-wrapped MoE model with PEFT LoRA and on stock ones; models whose logits are
not lm_head(decoder(x)) keep the full logits."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from torch.nn import functional as F

import kt_sft
from kt_models import tiny
from kt_sft.loss import ChunkedCausalLMLoss


def _stock_loss(model, ids, mask, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=-100,
        reduction="sum",
    )


def _batch(vocab: int, T: int = 23) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (2, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :6] = -100  # a prompt without loss
    return ids, mask, labels


def _loss_and_grads(model, fn, ids, mask, labels) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = fn(model, ids, mask, labels)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in params]


def _lora_model(use_kt: bool, lora_head: bool = False):
    model = tiny.build("qwen3_moe", seed=3)
    if use_kt:
        model = kt_sft.wrap_model(model, kt_sft.KTConfig(lora_rank=4))
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", *(["lm_head"] if lora_head else [])],
        **(kt_sft.default_expert_lora_targets(model) if use_kt else {}),
    )
    pm = (
        kt_sft.get_peft_model(model, cfg)
        if use_kt
        else __import__("peft").get_peft_model(model, cfg)
    )
    pm.train()
    return pm


@pytest.mark.parametrize(("use_kt", "lora_head"), [(False, False), (True, False), (True, True)])
def test_chunked_loss_equals_full_logits(use_kt: bool, lora_head: bool) -> None:
    """Summation order is the only difference: fp32 sums of ~40 token losses of ~ln(V) agree to
    a few ulps of the total (rtol 1e-5); gradients are sums of the same per-token terms (rtol
    1e-4, atol 1e-6 for entries near 0). A frozen plain head takes the fused path (d hidden made
    in the forward), LoRA on the head the checkpointed one (its LoRA gradients too)."""
    torch.manual_seed(0)
    model = _lora_model(use_kt, lora_head)
    ids, mask, labels = _batch(model.config.vocab_size)
    # 3 tokens per chunk: several chunks, one of them all prompt (-100) and skipped
    chunked = ChunkedCausalLMLoss(model, chunk_bytes=14 * model.config.vocab_size * 3)
    assert chunked.chunk_tokens == 3
    want, want_grads = _loss_and_grads(model, _stock_loss, ids, mask, labels)
    got, got_grads = _loss_and_grads(model, lambda m, *a: chunked(*a), ids, mask, labels)
    assert chunked.chunked is True
    head = model.get_base_model().get_output_embeddings()
    assert (type(head) is torch.nn.Linear) is (not lora_head)
    assert got == pytest.approx(want, rel=1e-5)
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_no_target_still_reaches_every_layer() -> None:
    """All labels -100: the loss is 0 and backward still runs (zero gradients), as the stock
    sum does; a distributed rank with no example relies on that."""
    model = _lora_model(use_kt=True)
    ids, mask, _ = _batch(model.config.vocab_size)
    chunked = ChunkedCausalLMLoss(model, chunk_bytes=14 * model.config.vocab_size * 4)
    loss = chunked(ids, mask, torch.full_like(ids, -100))
    assert float(loss.detach()) == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and float(g.abs().max()) == 0.0 for g in grads)


def test_soft_capped_logits_keep_the_full_path() -> None:
    """A model whose forward soft-caps the logits is detected by the probe and keeps the stock
    loss (exactly: the same code runs)."""
    model = tiny.build_any("gemma2")
    assert getattr(model.config, "final_logit_softcapping", None)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    ids, mask, labels = _batch(model.config.vocab_size)
    chunked = ChunkedCausalLMLoss(model, chunk_bytes=14 * model.config.vocab_size * 3)
    want, want_grads = _loss_and_grads(model, _stock_loss, ids, mask, labels)
    got, got_grads = _loss_and_grads(model, lambda m, *a: chunked(*a), ids, mask, labels)
    assert chunked.chunked is False
    assert got == want
    torch.testing.assert_close(got_grads[0], want_grads[0], rtol=0, atol=0)


def test_probe_leaves_the_random_stream_and_mode_alone() -> None:
    model = _lora_model(use_kt=False)
    ids, mask, _ = _batch(model.config.vocab_size)
    chunked = ChunkedCausalLMLoss(model)
    state = torch.get_rng_state()
    assert chunked._same_logits(ids, mask) is True
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training


def test_bad_chunk_bytes() -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        ChunkedCausalLMLoss(_lora_model(use_kt=False), chunk_bytes=0)
