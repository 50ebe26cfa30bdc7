"""Next-token loss of a causal LM without the whole logits tensor.

A model's forward computes the logits of every token (T × vocabulary) before the loss: for a
151,936-token vocabulary at T = 1024 that is 0.58 GiB in fp32, and the loss and its backward
hold three or four such tensors at once — more than a 48-layer model's checkpointed activations.
:class:`ChunkedCausalLMLoss` runs the model's decoder, then the LM head and the cross-entropy on
a few hundred tokens at a time, so at most one chunk's logits exist. A frozen plain head (the
usual LoRA case) makes each chunk's logits once and turns them into the gradient of the hidden
states right away (as fast as the full logits: the same GEMMs); any other head (LoRA on it, a
bias, a trainable head) runs each chunk under activation checkpointing (logits recomputed in
backward, one more head GEMM). Same math as
``cross_entropy(logits[:, :-1].float(), labels[:, 1:], reduction="sum")``; only the summation
order differs.

A model whose forward does more than ``lm_head(decoder(...))`` (soft-capping, logit scaling) is
detected on the first call by comparing both paths on a short prefix (bitwise); it then keeps
the full logits (with a warning).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["DEFAULT_CHUNK_BYTES", "ChunkedCausalLMLoss"]

log = logging.getLogger(__name__)

# Budget for one chunk's logits and their fp32 copies (bf16 logits, fp32 logits, log-softmax,
# gradient: about 14 bytes per logit).
DEFAULT_CHUNK_BYTES = 256 * 2**20
_BYTES_PER_LOGIT = 14
_PROBE_TOKENS = 8


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``F.linear(hidden, weight)`` for a frozen head, chunk by chunk,
    with the gradient of ``hidden`` computed in the forward: each chunk's logits are made once
    (the checkpointed path makes them twice), softmax − one-hot turns into d hidden right away,
    and only d hidden (N × H) is kept for backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            y = labels[start : start + chunk]
            valid = y != -100
            if not bool(valid.any()):
                continue
            logits = F.linear(hidden[start : start + chunk], weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            rows = valid.nonzero().squeeze(1)
            target = logits[rows, y[rows]]
            total += (lse[rows] - target).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[rows, y[rows]] -= 1.0
                probs[~valid] = 0.0
                grad[start : start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        return grad * grad_total.to(grad.dtype), None, None, None


class ChunkedCausalLMLoss:
    """Sum over tokens of the next-token cross-entropy (labels ``-100`` ignored), chunk by chunk.

    ``model``: a transformers causal LM or a PEFT model around one. ``chunk_bytes``: memory for
    one chunk's logits (the chunk is ``chunk_bytes / (14 · vocabulary)`` tokens, at least 1).
    """

    def __init__(self, model: Any, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        self._head = (
            base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        )
        vocab = int(getattr(self._head, "out_features", 0) or 0)
        self.chunk_tokens = max(1, chunk_bytes // (_BYTES_PER_LOGIT * max(vocab, 1)))
        # None: not probed yet; False: the model's logits are not lm_head(decoder(...)).
        self.chunked: bool | None = None if self._decoder is not None and vocab else False

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """The summed loss of predicting ``labels[:, 1:]`` from the tokens before them."""
        if self.chunked is None:
            self.chunked = self._same_logits(input_ids, attention_mask)
        if not self.chunked:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            return F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten(),
                ignore_index=-100,
                reduction="sum",
            )
        hidden = self._decoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        h = hidden[:, :-1].flatten(0, 1)
        y = labels[:, 1:].flatten().to(h.device)
        head = self._head
        if (
            type(head) is torch.nn.Linear
            and head.bias is None
            and not head.weight.requires_grad
            and bool((y != -100).any())
        ):
            # a frozen plain head (the usual case): logits once per chunk, no recompute
            return _FrozenHeadCrossEntropy.apply(h, head.weight, y, self.chunk_tokens)
        total: torch.Tensor | None = None
        for start in range(0, h.shape[0], self.chunk_tokens):
            stop = start + self.chunk_tokens
            if not bool((y[start:stop] != -100).any()):
                continue  # no target in the chunk: its loss and gradient are 0
            part = checkpoint(
                _chunk_loss, self._head, h[start:stop], y[start:stop], use_reentrant=False
            )
            total = part if total is None else total + part
        if total is None:
            # No target at all: a zero that still reaches every layer in backward (ranks of a
            # distributed run exchange in every layer's backward).
            total = h.float().sum() * 0.0
        return total

    def _same_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        """Whether the model's logits are lm_head(decoder(x)), on a short prefix (eval mode, no
        dropout, so the random number stream is untouched)."""
        ids = input_ids[:1, :_PROBE_TOKENS]
        mask = None if attention_mask is None else attention_mask[:1, :_PROBE_TOKENS]
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                stock = self.model(input_ids=ids, attention_mask=mask).logits.float()
                ours = self._head(self._decoder(input_ids=ids, attention_mask=mask)[0]).float()
        finally:
            self.model.train(training)
        # Bitwise: the same decoder and head on the same input; a soft cap of small random logits
        # changes them by less than any tolerance could tell from noise. Falling back is safe.
        same = stock.shape == ours.shape and torch.equal(stock, ours)
        if not same:
            log.warning(
                "%s: the model's logits are not lm_head(decoder(x)) (soft-capping or scaling); "
                "the loss uses the full logits",
                type(self.model).__name__,
            )
        return same
