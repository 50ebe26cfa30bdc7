"""Tokenize examples into `input_ids` + `labels` with the loss mask of their format.

The text of an example is built as a list of character spans, each marked trained or not:
- text: one trained span (plus EOS);
- prompt/completion: the prompt untrained, the completion + EOS trained;
- messages: the chat template's rendering; each assistant turn (content and end-of-turn marker)
  trained, everything else untrained. Assistant spans are found by rendering the conversation up
  to each assistant turn with the generation prompt, then including the turn; the difference of
  the two renderings is the turn. Templates that are not prefix-stable are refused.
The whole text is tokenized once with character offsets, and a token is trained when its
characters overlap a trained span. Labels of untrained tokens are -100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kt_sft.data.formats import Example
from kt_sft.data.records import DataError
from kt_sft.data.templates import render_chat

__all__ = ["IGNORE_INDEX", "Tokenized", "collate", "tokenize_example", "tokenize_examples"]

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _spans(
    example: Example, tokenizer: Any, template: str | None, train_on_prompt: bool
) -> tuple[str, list[tuple[int, int]], bool]:
    """Return (text, trained spans, add_special_tokens)."""
    eos = tokenizer.eos_token or ""
    if example.kind == "text":
        text = example.text + eos
        return text, [(0, len(text))], True
    if example.kind == "prompt_completion":
        text = example.prompt + example.completion + eos
        start = 0 if train_on_prompt else len(example.prompt)
        return text, [(start, len(text))], True
    if template is None:
        raise DataError("the messages format needs a chat template")
    turns = example.messages
    full = render_chat(tokenizer, template, turns)
    if train_on_prompt:
        return full, [(0, len(full))], False
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = (
            render_chat(tokenizer, template, turns[:i], add_generation_prompt=True)
            if i
            else render_chat(tokenizer, template, [], add_generation_prompt=True)
        )
        upto = render_chat(tokenizer, template, turns[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                "the chat template is not prefix-stable (rendering the first turns of a "
                "conversation is not a prefix of rendering all of it), so assistant turns cannot "
                "be located for the loss mask; use `template: chatml` or `train_on_prompt: true`"
            )
        spans.append((len(before), len(upto)))
    return full, spans, False


def tokenize_example(
    example: Example,
    tokenizer: Any,
    *,
    template: str | None,
    cutoff_len: int,
    train_on_prompt: bool = False,
) -> Tokenized:
    """Tokenize one example with its loss mask, truncated to `cutoff_len` tokens."""
    text, spans, add_special = _spans(example, tokenizer, template, train_on_prompt)
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    labels = []
    for tok, (s, e) in zip(ids, offsets):
        trained = e > s and any(s < hi and e > lo for lo, hi in spans)
        labels.append(tok if trained else IGNORE_INDEX)
    return Tokenized(ids[:cutoff_len], labels[:cutoff_len])


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    template: str | None,
    cutoff_len: int,
    train_on_prompt: bool = False,
) -> tuple[list[Tokenized], int]:
    """Tokenize all examples; drop those with no trained token left after truncation.

    Returns (kept, number dropped).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "kt-sft needs a fast (Rust) tokenizer for loss masks; the tokenizer "
            f"{type(tokenizer).__name__} has no offset mapping"
        )
    kept, dropped = [], 0
    for ex in examples:
        tok = tokenize_example(
            ex, tokenizer, template=template, cutoff_len=cutoff_len, train_on_prompt=train_on_prompt
        )
        if tok.num_trained > 1:
            kept.append(tok)
        else:
            dropped += 1
    return kept, dropped


def collate(batch: Sequence[Tokenized], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch to its longest example; returns torch tensors."""
    import torch

    width = max(len(t.input_ids) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, t in enumerate(batch):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        labels[i, :n] = torch.tensor(t.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
