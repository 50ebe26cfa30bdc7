"""From dataset files to tokenized training examples, in one call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kt_sft.data.formats import Columns, Example, to_examples
from kt_sft.data.records import DataError, bundled_dataset, read_records
from kt_sft.data.templates import resolve_template
from kt_sft.data.tokenize import Tokenized, tokenize_examples

__all__ = ["PreparedData", "prepare_dataset", "resolve_dataset_paths"]


@dataclass
class PreparedData:
    examples: list[Tokenized]
    num_records: int
    num_dropped: int
    formats: dict[str, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(t.input_ids) for t in self.examples)


def resolve_dataset_paths(paths: Sequence[str], embedded: str = "embedded") -> list[Path]:
    """Map `embedded` to the bundled file; other entries are taken as file paths."""
    return [bundled_dataset() if p == embedded else Path(p).expanduser() for p in paths]


def prepare_dataset(
    paths: Sequence[str | Path],
    tokenizer: Any,
    *,
    dataset_format: str = "auto",
    columns: Columns | None = None,
    template: str = "auto",
    cutoff_len: int = 1024,
    max_samples: int | None = None,
    train_on_prompt: bool = False,
    tokenizer_path: str = "",
) -> PreparedData:
    """Read, convert and tokenize every file; raises DataError naming the file on bad input."""
    columns = columns or Columns()
    examples: list[Example] = []
    num_records = 0
    for path in paths:
        records = read_records(path)
        num_records += len(records)
        examples += to_examples(records, dataset_format, columns, str(path))
    if max_samples is not None:
        examples = examples[:max_samples]
    formats: dict[str, int] = {}
    for ex in examples:
        formats[ex.kind] = formats.get(ex.kind, 0) + 1
    chat = (
        resolve_template(tokenizer, template, tokenizer_path=tokenizer_path)
        if formats.get("messages")
        else None
    )
    kept, dropped = tokenize_examples(
        examples, tokenizer, template=chat, cutoff_len=cutoff_len, train_on_prompt=train_on_prompt
    )
    if not kept:
        raise DataError(
            f"no example of {', '.join(map(str, paths))} has a trained token within cutoff_len="
            f"{cutoff_len} (all {len(examples)} dropped); raise cutoff_len or check the "
            "completion / assistant columns"
        )
    return PreparedData(kept, num_records, dropped, formats)
