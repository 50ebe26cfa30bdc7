"""`kt-sft chat` / `generate`: base + adapter through kt or stock transformers."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from kt_sft.cli import main

pytestmark = pytest.mark.usefixtures("kt_cache")


@pytest.fixture(scope="module")
def run_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KT_CACHE_DIR", str(cache_dir))
        from kt_sft.train import load_train_config
        from kt_sft.train.loop import train

        train(
            load_train_config(
                None,
                [
                    "--max_steps",
                    "40",
                    "--output_dir",
                    str(out),
                    "--plot_loss",
                    "false",
                    "--profile",
                    "false",
                ],
            ),
            quiet=True,
        )
    return out


def _run(capsys, argv: list[str]) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def test_generate_with_kt_and_with_stock_agree(run_dir: Path, capsys) -> None:
    prompts = ["--prompt", "What is the capital of Japan?", "--prompt", "What is 2 + 3?"]
    kt = _run(capsys, ["generate", "--adapter", str(run_dir), *prompts, "--max-new-tokens", "12"])
    stock = _run(
        capsys,
        [
            "generate",
            "--stock",
            "--adapter",
            str(run_dir / "adapter"),
            *prompts,
            "--max-new-tokens",
            "12",
        ],
    )
    kt_lines, stock_lines = kt.splitlines(), stock.splitlines()  # one line per prompt
    assert len(kt_lines) == len(stock_lines) == 2
    # bf16 experts vs fp32 experts: greedy decoding agrees on the first words at least
    for a, b in zip(kt_lines, stock_lines):
        assert a.split()[:2] == b.split()[:2], (kt, stock)


def test_compare_shows_base_and_fine_tuned(run_dir: Path, capsys) -> None:
    out = _run(
        capsys,
        [
            "chat",
            "--adapter",
            str(run_dir),
            "--compare",
            "--prompt",
            "What is the opposite of hot?",
            "--max-new-tokens",
            "10",
        ],
    )
    lines = out.splitlines()
    assert lines[0] == "prompt:     What is the opposite of hot?"
    assert lines[1].startswith("base:") and lines[2].startswith("fine-tuned:")
    assert lines[1] != lines[2].replace("fine-tuned:", "base:")


def test_generate_reads_prompts_from_stdin(run_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 4 + 4?\n\nName the capital of Peru.\n"))
    out = _run(capsys, ["generate", "--adapter", str(run_dir), "--max-new-tokens", "6"])
    assert len(out.splitlines()) == 2


def test_interactive_chat_until_empty_line(run_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 4 + 4?\n\n"))
    out = _run(capsys, ["chat", "--adapter", str(run_dir), "--max-new-tokens", "6"])
    assert out.startswith("you> ")


def test_base_model_alone(capsys) -> None:
    out = _run(capsys, ["generate", "--prompt", "Hello", "--max-new-tokens", "4"])
    assert out.strip()


def test_missing_adapter(tmp_path: Path, capsys) -> None:
    rc = main(["generate", "--adapter", str(tmp_path / "nope"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "adapter path not found" in err


def test_folder_without_an_adapter(tmp_path: Path, capsys) -> None:
    rc = main(["generate", "--adapter", str(tmp_path), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "no PEFT adapter in" in err and "adapter_config.json" in err


def test_adapter_of_another_shape(run_dir: Path, tmp_path: Path, capsys) -> None:
    """An adapter whose tensors do not fit the base model is refused, naming a tensor."""
    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "adapter", bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    for extra in ([], ["--stock"]):
        rc = main(["generate", *extra, "--adapter", str(bad), "--prompt", "x"])
        err = capsys.readouterr().err
        assert rc == 2 and "does not fit the model" in err and "q_proj" in err, err
    cfg = json.loads((bad / "adapter_config.json").read_text())
    assert cfg["r"] == 16


@pytest.mark.parametrize(
    "kt",
    [
        ["--kt", "kt_num_threads=1"],
        ["--kt", "kt_num_threads", "1"],
        ["--kt=--kt_num_threads=1"],
        ["--kt", "kt_num_threads=1", "kt_max_tokens=64"],
    ],
)
def test_kt_option_forms(kt: list[str], capsys, monkeypatch) -> None:
    """The documented `--kt kt_num_threads=2` form (and the others) reach the engine options."""
    import kt_sft.chat

    seen = {}

    def fake(*args, kt_options, **kwargs):
        seen.update(kt_options)
        raise SystemExit(0)

    monkeypatch.setattr(kt_sft.chat, "load_chat_session", fake)
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", *kt])
    assert seen["kt_num_threads"] in (1, "1")
    if len(kt) == 3 and "=" in kt[2]:
        assert seen["kt_max_tokens"] in (64, "64")
