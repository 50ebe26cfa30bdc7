"""Bad input to `kt-sft train`: each case exits with code 2 and one clear message."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from kt_sft.cli import main

pytestmark = pytest.mark.usefixtures("kt_cache")


@pytest.fixture(scope="module")
def demo_model(cache_dir: Path) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KT_CACHE_DIR", str(cache_dir))
        from kt_sft.train.embedded import embedded_model_dir

        return embedded_model_dir(quiet=True)


def _fails(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("kt-sft train: error: "), err
    assert "Traceback" not in err
    return err


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_missing_model_path(tmp_path: Path, capsys) -> None:
    cfg = _yaml(tmp_path, "dataset: embedded\nlearning_rate: 1.0e-4\n")
    assert "missing model path: set 'model_name_or_path'" in _fails(capsys, ["train", cfg])


def test_model_path_that_does_not_exist(tmp_path: Path, capsys) -> None:
    err = _fails(
        capsys,
        [
            "train",
            "--model_name_or_path",
            str(tmp_path / "no-model"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
    )
    assert "model path not found" in err and "no-model" in err


def test_unknown_key_suggests_the_closest(tmp_path: Path, capsys) -> None:
    cfg = _yaml(
        tmp_path,
        """
        model_name_or_path: embedded
        dataset: embedded
        per_device_batch_size: 4
    """,
    )
    err = _fails(capsys, ["train", cfg])
    assert "unknown key 'per_device_batch_size'" in err
    assert "did you mean 'per_device_train_batch_size'" in err
    err = _fails(capsys, ["train", "--gradient_acumulation_steps", "2"])
    assert "did you mean 'gradient_accumulation_steps'" in err


def test_dataset_file_missing(tmp_path: Path, capsys) -> None:
    err = _fails(
        capsys,
        [
            "train",
            "--dataset",
            str(tmp_path / "missing.jsonl"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
    )
    assert "dataset file not found" in err and "missing.jsonl" in err


def test_dataset_with_no_usable_column(tmp_path: Path, capsys) -> None:
    data = _jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    err = _fails(
        capsys,
        [
            "train",
            "--dataset",
            str(data),
            "--dataset_format",
            "auto",
            "--output_dir",
            str(tmp_path / "o"),
        ],
    )
    assert "has no usable column: found ['answer', 'question']" in err
    assert "prompt_column" in err


def test_chat_template_absent_for_messages(tmp_path: Path, demo_model: Path, capsys) -> None:
    model = tmp_path / "no-template-model"
    shutil.copytree(demo_model, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    err = _fails(
        capsys, ["train", "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "o")]
    )
    assert "has no chat template" in err and "template: chatml" in err


def test_output_dir_not_writable(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = _fails(capsys, ["train", "--output_dir", str(blocker / "out")])
    assert "is not writable" in err and "--output_dir" in err


def test_output_dir_read_only(tmp_path: Path, capsys) -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root ignores permission bits; sysfs refuses new directories even to root
        assert "is not writable" in _fails(
            capsys, ["train", "--output_dir", "/sys/kernel/kt-sft-out"]
        )
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "is not writable" in _fails(capsys, ["train", "--output_dir", str(ro / "out")])
    finally:
        ro.chmod(0o700)


def test_output_dir_with_a_previous_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    err = _fails(capsys, ["train", "--output_dir", str(out), "--overwrite_output_dir", "false"])
    assert "already holds a training run (checkpoint-5)" in err
    assert "overwrite_output_dir: true" in err and "resume_from_checkpoint: auto" in err


def _previous_run(out: Path) -> dict[str, bytes]:
    """A previous run's results in out: adapter, checkpoint, summary (name -> content)."""
    files = {
        "adapter/adapter_config.json": b'{"r": 8}',
        "adapter/adapter_model.safetensors": b"weights",
        "checkpoint-4/trainer_state.json": b'{"global_step": 4}',
        "train_summary.json": b'{"steps": 4}',
    }
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return files


@pytest.mark.parametrize(
    "mistake, message",
    [
        (["--dataset", "missing.jsonl"], "dataset file not found"),
        (["--dataset", "empty.jsonl"], "empty.jsonl"),
        (["--dataset", "broken.jsonl"], "broken.jsonl"),
        (["--model_name_or_path", "no-such-model"], "model path not found"),
    ],
    ids=["missing-dataset", "empty-dataset", "malformed-dataset", "bad-model"],
)
def test_a_failed_run_keeps_the_previous_results(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, mistake: list[str], message: str
) -> None:
    """overwrite_output_dir: true (the demo default) replaces a previous run only once the new
    run writes its own results: a typo in the dataset or model leaves it whole."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"messages": [\n')
    out = tmp_path / "out"
    files = _previous_run(out)
    err = _fails(
        capsys, ["train", *mistake, "--output_dir", str(out), "--overwrite_output_dir", "true"]
    )
    assert message in err
    assert {name: (out / name).read_bytes() for name in files} == files


def test_overwrite_replaces_the_previous_run_once_the_new_one_saves(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    _previous_run(out)
    (out / "checkpoint-9").mkdir()  # a later step than the new run reaches
    (out / "checkpoint-9" / "trainer_state.json").write_text('{"global_step": 9}')
    argv = [
        "train",
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--max_samples",
        "16",
        "--disable_tqdm",
        "true",
        "--output_dir",
        str(out),
        "--overwrite_output_dir",
        "true",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert "checkpoint-4" not in names and "checkpoint-9" not in names
    assert {"adapter", "checkpoint-1", "checkpoint-2", "train_summary.json"} <= set(names)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2
    assert (out / "adapter" / "adapter_config.json").read_bytes() != b'{"r": 8}'


def test_bad_value_on_the_command_line(tmp_path: Path, capsys) -> None:
    err = _fails(capsys, ["train", "--learning_rate", "fast"])
    assert "'learning_rate' must be a number, got 'fast'" in err


def test_lora_target_matching_nothing(tmp_path: Path, capsys) -> None:
    err = _fails(
        capsys,
        [
            "train",
            "--lora_target",
            "no_such_proj",
            "--max_steps",
            "1",
            "--output_dir",
            str(tmp_path / "o"),
        ],
    )
    assert "'lora_target' no_such_proj matches no module" in err
    assert "q_proj" in err  # lists the names that exist


def test_lora_dropout_with_expert_lora(tmp_path: Path, capsys) -> None:
    err = _fails(
        capsys,
        ["train", "--lora_dropout", "0.1", "--max_steps", "1", "--output_dir", str(tmp_path / "o")],
    )
    assert "'lora_dropout' 0.1 cannot be used with LoRA on the routed experts" in err


def test_train_help(capsys) -> None:
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kt-sft train [CONFIG.yaml]") and "--print-config" in out


def test_a_key_without_its_value(capsys) -> None:
    err = _fails(capsys, ["train", "--max_steps"])
    assert "--max_steps needs a value (--max_steps VALUE)" in err


def test_a_missing_column_names_the_key_to_set(tmp_path: Path, capsys) -> None:
    data = _jsonl(tmp_path / "qa.jsonl", [{"question": "1 + 1?", "completion": " 2"}])
    err = _fails(
        capsys,
        [
            "train",
            "--dataset",
            str(data),
            "--dataset_format",
            "prompt_completion",
            "--output_dir",
            str(tmp_path / "out"),
        ],
    )
    assert "no column 'prompt'" in err and "set prompt_column: <column>" in err


def test_version_and_help_with_defaults(capsys) -> None:
    from kt_sft import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"kt-sft {__version__}"
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--learning_rate [0.0001]" in text and "--cutoff_len [1024]" in text
    assert max(len(line) for line in text.splitlines()) <= 100
