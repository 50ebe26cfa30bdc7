"""Training data for `kt-sft train`: files -> records -> examples -> tokens with loss masks."""

from __future__ import annotations

from kt_sft.data.dataset import PreparedData, prepare_dataset, resolve_dataset_paths
from kt_sft.data.formats import FORMATS, Columns, Example, detect_format, to_examples
from kt_sft.data.records import DataError, bundled_dataset, read_records
from kt_sft.data.templates import CHATML, render_chat, resolve_template
from kt_sft.data.tokenize import IGNORE_INDEX, Tokenized, collate, tokenize_example

__all__ = [
    "CHATML",
    "FORMATS",
    "IGNORE_INDEX",
    "Columns",
    "DataError",
    "Example",
    "PreparedData",
    "Tokenized",
    "bundled_dataset",
    "collate",
    "detect_format",
    "prepare_dataset",
    "read_records",
    "render_chat",
    "resolve_dataset_paths",
    "resolve_template",
    "to_examples",
    "tokenize_example",
]
