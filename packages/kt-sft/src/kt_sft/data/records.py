"""Read dataset files into lists of records (dicts): JSONL, JSON, Parquet, CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

__all__ = ["SUFFIXES", "DataError", "bundled_dataset", "read_records"]

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """A dataset file is missing, unreadable, or has no usable column; the message names it."""


def bundled_dataset() -> Path:
    """Path of the bundled demo dataset (chat `messages`, a few hundred examples)."""
    from importlib.resources import files

    return Path(str(files("kt_sft.resources").joinpath("kt_demo.jsonl")))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of one dataset file; raises DataError with the file name on failure."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset file not found: {path}")
    if path.is_dir():
        raise DataError(
            f"dataset path is a directory, expected a file ({', '.join(SUFFIXES)}): {path}"
        )
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".parquet": _read_parquet,
        ".csv": _read_csv,
    }
    if suffix not in readers:
        raise DataError(
            f"dataset file {path} has an unsupported extension {suffix or '(none)'!r};"
            f" use one of {', '.join(SUFFIXES)}"
        )
    records = readers[suffix](path)
    if not records:
        raise DataError(f"dataset file {path} holds no records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(
                f"dataset file {path}: record {i + 1} is a {type(rec).__name__}, "
                "expected an object with named columns"
            )
    return records


def _read_jsonl(path: Path) -> list[Any]:
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"dataset file {path}, line {lineno}: not valid JSON ({exc.msg})"
                ) from exc
    return out


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        # a .json file holding JSON lines is common enough to accept
        try:
            return _read_jsonl(path)
        except DataError:
            raise DataError(
                f"dataset file {path}: not valid JSON (line {exc.lineno}: {exc.msg})"
            ) from exc
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1:  # {"data": [...]} / {"train": [...]}
            return data[lists[0]]
        raise DataError(
            f"dataset file {path}: expected a list of records (or an object with one "
            f"list of records), got an object with keys {sorted(data)}"
        )
    if not isinstance(data, list):
        raise DataError(
            f"dataset file {path}: expected a list of records, got {type(data).__name__}"
        )
    return data


def _read_parquet(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"reading {path} needs pyarrow: pip install 'kt-sft[parquet]'") from exc
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"dataset file {path}: not a readable Parquet file ({exc})") from exc


def _read_csv(path: Path) -> list[Any]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataError(f"dataset file {path}: CSV has no header row")
        rows = []
        for row in reader:
            if None in row:
                raise DataError(
                    f"dataset file {path}, line {reader.line_num}: more fields than "
                    f"the header's {len(reader.fieldnames)}"
                )
            rows.append(row)
        return rows
