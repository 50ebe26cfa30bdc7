"""Dataset formats: detect which one a file uses and turn its records into examples.

An example is one of
- `Example(text=...)`: plain text, loss on every token;
- `Example(prompt=..., completion=...)`: strings joined as they are, loss on the completion;
- `Example(messages=[{"role", "content"}, ...])`: rendered with the chat template, loss on
  assistant turns. `alpaca` (instruction/input/output) and `sharegpt` (conversations of
  from/value) records become messages, as do prompt/completion records whose values are
  lists of turns (TRL's conversational prompt-completion).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kt_sft.data.records import DataError

__all__ = ["FORMATS", "Columns", "Example", "detect_format", "to_examples"]

FORMATS = ("text", "prompt_completion", "messages", "alpaca", "sharegpt")

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "bot": "assistant",
}


@dataclass(frozen=True)
class Columns:
    """Column names for each format (the `*_column` config keys)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass
class Example:
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] | None = None

    @property
    def kind(self) -> str:
        if self.messages is not None:
            return "messages"
        return "text" if self.text is not None else "prompt_completion"


def _required(fmt: str, cols: Columns) -> tuple[str, ...]:
    return {
        "text": (cols.text,),
        "prompt_completion": (cols.prompt, cols.completion),
        "messages": (cols.messages,),
        "alpaca": ("instruction", "output"),
        "sharegpt": ("conversations",),
    }[fmt]


def detect_format(records: Sequence[dict[str, Any]], cols: Columns, source: str) -> str:
    """Pick the format whose columns the first record has (messages first, text last)."""
    present = set(records[0])
    for fmt in ("messages", "sharegpt", "prompt_completion", "alpaca", "text"):
        if all(c in present for c in _required(fmt, cols)):
            return fmt
    wanted = "; ".join(
        f"{fmt}: {' + '.join(repr(c) for c in _required(fmt, cols))}" for fmt in FORMATS
    )
    raise DataError(
        f"dataset {source} has no usable column: found {sorted(present)}, expected "
        f"one of ({wanted}). Rename the columns, or set dataset_format and "
        "text_column / prompt_column / completion_column / messages_column"
    )


def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise DataError(f"{where} is empty")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where} must be a string, got {type(value).__name__}")


def _turns(value: Any, where: str, *, sharegpt: bool = False) -> list[dict[str, str]]:
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is a string that is not a JSON list of turns") from exc
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where} must be a non-empty list of turns")
    out = []
    for j, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(f"{where}, turn {j + 1}: expected an object, got {type(turn).__name__}")
        if sharegpt:
            role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise DataError(
                    f"{where}, turn {j + 1}: 'from' must be one of "
                    f"{sorted(_SHAREGPT_ROLES)}, got {turn.get('from')!r}"
                )
            content = turn.get("value")
        else:
            role, content = turn.get("role"), turn.get("content")
            if role not in ("system", "user", "assistant", "tool"):
                raise DataError(
                    f"{where}, turn {j + 1}: 'role' must be system, user, assistant "
                    f"or tool, got {role!r}"
                )
        out.append({"role": role, "content": _text(content, f"{where}, turn {j + 1} content")})
    if not any(t["role"] == "assistant" for t in out):
        raise DataError(f"{where} has no assistant turn to train on")
    return out


def to_examples(
    records: Sequence[dict[str, Any]], fmt: str, cols: Columns, source: str
) -> list[Example]:
    """Convert records of one file to examples; `fmt` may be `auto`."""
    if fmt == "auto":
        fmt = detect_format(records, cols, source)
    missing = [c for c in _required(fmt, cols) if c not in records[0]]
    if missing:
        keys = {
            cols.text: "text_column",
            cols.prompt: "prompt_column",
            cols.completion: "completion_column",
            cols.messages: "messages_column",
        }
        settable = [
            f"{keys[c]}: <column>"
            for c in missing
            if c in keys and fmt in ("text", "prompt_completion", "messages")
        ]
        hint = f"; set {' and '.join(settable)} to read other columns" if settable else ""
        raise DataError(
            f"dataset {source} is read as {fmt!r} but has no column "
            f"{', '.join(repr(c) for c in missing)}; found {sorted(records[0])}" + hint
        )
    out: list[Example] = []
    for i, rec in enumerate(records):
        where = f"{source}, record {i + 1}"
        if fmt == "text":
            out.append(Example(text=_text(rec.get(cols.text), f"{where} '{cols.text}'")))
        elif fmt == "prompt_completion":
            prompt, completion = rec.get(cols.prompt), rec.get(cols.completion)
            if isinstance(prompt, (list, tuple)) or isinstance(completion, (list, tuple)):
                turns = _turns(list(prompt or []) + list(completion or []), where)
                out.append(Example(messages=turns))
            else:
                out.append(
                    Example(
                        prompt=_text(prompt, f"{where} '{cols.prompt}'"),
                        completion=_text(completion, f"{where} '{cols.completion}'"),
                    )
                )
        elif fmt == "messages":
            out.append(
                Example(messages=_turns(rec.get(cols.messages), f"{where} '{cols.messages}'"))
            )
        elif fmt == "sharegpt":
            out.append(
                Example(
                    messages=_turns(
                        rec.get("conversations"), f"{where} 'conversations'", sharegpt=True
                    )
                )
            )
        elif fmt == "alpaca":
            instruction = _text(rec.get("instruction"), f"{where} 'instruction'")
            extra = rec.get("input") or ""
            user = f"{instruction}\n\n{_text(extra, where + ' input')}" if extra else instruction
            turns = []
            if rec.get("system"):
                turns.append({"role": "system", "content": _text(rec["system"], where)})
            turns += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": _text(rec.get("output"), f"{where} 'output'")},
            ]
            out.append(Example(messages=turns))
        else:  # pragma: no cover - the schema restricts fmt
            raise DataError(f"unknown dataset_format {fmt!r}")
    return out
