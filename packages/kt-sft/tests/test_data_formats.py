"""Dataset files (JSONL/JSON/Parquet/CSV), formats, chat templates and loss masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kt_sft.data import (
    CHATML,
    IGNORE_INDEX,
    Columns,
    DataError,
    Example,
    collate,
    prepare_dataset,
    read_records,
    to_examples,
    tokenize_example,
)
from kt_sft.train.embedded import build_tokenizer

RECORDS = {
    "text": [{"text": "The river is long."}, {"text": "Tigers are big cats."}],
    "prompt_completion": [
        {"prompt": "2 + 2 =", "completion": " 4"},
        {"prompt": "Capital of Peru:", "completion": " Lima"},
    ],
    "messages": [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        }
    ],
    "alpaca": [{"instruction": "Add 1 and 2.", "input": "", "output": "3"}],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    ],
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tok_no_template(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def _write(path: Path, records: list[dict]) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif suffix == ".csv":
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(records[0]))
            w.writeheader()
            for r in records:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_every_file_type_and_format_reads(tmp_path: Path, tok, suffix: str, fmt: str) -> None:
    path = _write(tmp_path / f"data{suffix}", RECORDS[fmt])
    data = prepare_dataset([path], tok, cutoff_len=64)
    assert len(data.examples) == len(RECORDS[fmt]) and data.num_dropped == 0
    for ex in data.examples:
        assert len(ex.input_ids) == len(ex.labels) and ex.num_trained > 0


def test_json_with_a_data_key_and_json_lines_in_a_json_file(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"data": RECORDS["text"]}))
    assert read_records(tmp_path / "a.json") == RECORDS["text"]
    (tmp_path / "b.json").write_text("".join(json.dumps(r) + "\n" for r in RECORDS["text"]))
    assert read_records(tmp_path / "b.json") == RECORDS["text"]


def test_missing_dataset_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset file not found: .*nope\.jsonl"):
        read_records(tmp_path / "nope.jsonl")


def test_bad_files_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported extension '\.txt'"):
        read_records(tmp_path / "x.txt")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_records(tmp_path / "bad.parquet")
    (tmp_path / "nums.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="record 1 is a int"):
        read_records(tmp_path / "nums.json")


def test_no_usable_column_lists_what_was_found(tmp_path: Path, tok) -> None:
    path = _write(tmp_path / "d.csv", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError,
        match=r"no usable column: found \['answer', 'question'\].*"
        r"text_column",
    ):
        prepare_dataset([path], tok)
    with pytest.raises(DataError, match=r"read as 'text' but has no column 'text'"):
        prepare_dataset([path], tok, dataset_format="text")
    # the column keys make it usable
    data = prepare_dataset([path], tok, columns=Columns(prompt="question", completion="answer"))
    assert len(data.examples) == 1


def test_record_level_problems(tok) -> None:
    with pytest.raises(DataError, match=r"record 1 'messages' has no assistant turn"):
        to_examples([{"messages": [{"role": "user", "content": "hi"}]}], "auto", Columns(), "d")
    with pytest.raises(DataError, match=r"'role' must be system, user, assistant"):
        to_examples([{"messages": [{"role": "bot", "content": "hi"}]}], "auto", Columns(), "d")
    with pytest.raises(DataError, match=r"record 2 'text' is empty"):
        to_examples([{"text": "a"}, {"text": None}], "auto", Columns(), "d")
    with pytest.raises(DataError, match="'from' must be one of"):
        to_examples([{"conversations": [{"from": "alien", "value": "x"}]}], "auto", Columns(), "d")


def _trained_text(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_text_format_trains_every_token(tok) -> None:
    t = tokenize_example(Example(text="Tigers are big cats."), tok, template=None, cutoff_len=64)
    assert all(lab == tid for tid, lab in zip(t.input_ids, t.labels))
    assert tok.decode(t.input_ids).endswith("<|im_end|>")  # eos appended


def test_prompt_completion_masks_the_prompt(tok) -> None:
    ex = Example(prompt="Capital of Peru:", completion=" Lima")
    t = tokenize_example(ex, tok, template=None, cutoff_len=64)
    assert _trained_text(tok, t.input_ids, t.labels) == " Lima<|im_end|>"
    t2 = tokenize_example(ex, tok, template=None, cutoff_len=64, train_on_prompt=True)
    assert t2.num_trained == len(t2.input_ids)


def test_messages_train_only_assistant_turns(tok) -> None:
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "3 + 3 = 6."},
    ]
    t = tokenize_example(Example(messages=turns), tok, template=CHATML, cutoff_len=256)
    trained = _trained_text(tok, t.input_ids, t.labels)
    assert trained == "2 + 2 = 4.<|im_end|>\n3 + 3 = 6.<|im_end|>\n"
    assert "What is" not in trained and "Be brief" not in trained
    full = tokenize_example(
        Example(messages=turns), tok, template=CHATML, cutoff_len=256, train_on_prompt=True
    )
    assert full.num_trained == len(full.input_ids)


def test_truncation_and_dropping(tok) -> None:
    from kt_sft.data.tokenize import tokenize_examples

    long = Example(prompt="word " * 50, completion="end")
    t = tokenize_example(long, tok, template=None, cutoff_len=10)
    assert len(t.input_ids) == 10 and t.num_trained == 0
    short = Example(prompt="2 + 2 =", completion=" 4")
    kept, dropped = tokenize_examples([long, short], tok, template=None, cutoff_len=10)
    assert len(kept) == 1 and dropped == 1


def test_all_examples_dropped_is_an_error(tmp_path: Path, tok) -> None:
    path = _write(tmp_path / "long.jsonl", [{"prompt": "word " * 50, "completion": "end"}])
    with pytest.raises(DataError, match=r"has a trained token within cutoff_len=10"):
        prepare_dataset([path], tok, cutoff_len=10)


def test_chat_template_absent_for_messages(tmp_path: Path, tok_no_template) -> None:
    path = _write(tmp_path / "chat.jsonl", RECORDS["messages"])
    with pytest.raises(DataError, match=r"has no chat template.*`template: chatml`"):
        prepare_dataset([path], tok_no_template)
    # the built-in template fixes it; text data never needs one
    assert prepare_dataset([path], tok_no_template, template="chatml").examples
    text = _write(tmp_path / "t.jsonl", RECORDS["text"])
    assert prepare_dataset([text], tok_no_template).examples


def test_collate_pads_right_and_masks(tok) -> None:
    a = tokenize_example(Example(text="a b c d e"), tok, template=None, cutoff_len=64)
    b = tokenize_example(Example(text="a"), tok, template=None, cutoff_len=64)
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    n = len(b.input_ids)
    assert batch["attention_mask"][1, n:].sum() == 0
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, n:] == tok.pad_token_id).all()


def test_bundled_dataset_is_reproducible_and_loads(tok) -> None:
    from kt_sft.resources import make_demo_dataset as gen

    assert gen.DATASET_FILE.read_text(encoding="utf-8") == gen.render()
    data = prepare_dataset([gen.DATASET_FILE], tok, cutoff_len=128)
    assert 300 <= len(data.examples) <= 1000 and data.formats == {"messages": len(data.examples)}
    questions = [json.loads(line)["messages"] for line in gen.DATASET_FILE.open()]
    users = [m["content"] for turns in questions for m in turns if m["role"] == "user"]
    assert len(set(users)) == len(users)  # no duplicate prompts
