"""Ctrl-C during training saves a resumable checkpoint (never a corrupt adapter); resuming
continues exactly where the run stopped; save_steps checkpoints and their pruning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kt_sft.train import load_train_config
from kt_sft.train.loop import train

pytestmark = pytest.mark.usefixtures("kt_cache")

SMALL = [
    "--max_samples",
    "64",
    "--per_device_train_batch_size",
    "4",
    "--cutoff_len",
    "64",
    "--disable_tqdm",
    "true",
    "--plot_loss",
    "false",
    "--logging_steps",
    "1",
]


def _cfg(out: Path, *extra: str):
    return load_train_config(None, [*SMALL, "--output_dir", str(out), *extra])


def _interrupt_at(step: int):
    def hook(state) -> None:
        if state.global_step == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def test_ctrl_c_saves_a_resumable_checkpoint_and_resume_matches(tmp_path: Path) -> None:
    straight = train(_cfg(tmp_path / "straight", "--max_steps", "6"), quiet=True)
    assert not straight.interrupted

    out = tmp_path / "interrupted"
    first = train(_cfg(out, "--max_steps", "6"), on_step_end=_interrupt_at(3), quiet=True)
    assert first.interrupted and first.state.global_step == 3
    ckpt = out / "checkpoint-3"
    assert first.checkpoint_dir == ckpt
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
    } <= {p.name for p in ckpt.iterdir()}
    assert not (out / "adapter").exists()  # no final adapter from an interrupted run
    assert not list(out.glob(".tmp-*"))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len(state["log"]) == 3

    resumed = train(_cfg(out, "--max_steps", "6", "--resume_from_checkpoint", "auto"), quiet=True)
    assert not resumed.interrupted and resumed.state.global_step == 6
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # the summary counts the whole run's time, and says which part this process ran
    summary = resumed.summary
    assert summary["resumed_from_step"] == 3
    assert summary["train_seconds_total"] == pytest.approx(
        first.summary["train_seconds"] + summary["train_seconds"]
    )
    a = [e["loss"] for e in straight.state.log]
    b = [e["loss"] for e in resumed.state.log]
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)

    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-5, k


def test_save_steps_and_total_limit(tmp_path: Path) -> None:
    out = tmp_path / "o"
    train(_cfg(out, "--max_steps", "5", "--save_steps", "1", "--save_total_limit", "2"), quiet=True)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_resume_problems(tmp_path: Path) -> None:
    from kt_sft.train import ConfigError

    with pytest.raises(ConfigError, match="holds no checkpoint"):
        train(
            _cfg(tmp_path / "empty", "--max_steps", "2", "--resume_from_checkpoint", "auto"),
            quiet=True,
        )
    with pytest.raises(ConfigError, match="is not a kt-sft checkpoint"):
        train(
            _cfg(tmp_path / "x", "--max_steps", "2", "--resume_from_checkpoint", str(tmp_path)),
            quiet=True,
        )


def test_ctrl_c_in_a_real_process(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "sub"
    env = dict(os.environ, KT_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kt_sft.cli",
            "train",
            *SMALL,
            "--max_steps",
            "500",
            "--output_dir",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines = []
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 2/"):
                proc.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, "".join(lines)
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    assert "resumable checkpoint" in text and "--resume_from_checkpoint" in text, text
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1, text
    from safetensors.torch import load_file

    assert load_file(str(ckpts[0] / "adapter_model.safetensors"))
    leftovers = sorted(p.name for p in out.iterdir())
    assert not (out / "adapter").exists() and not list(out.glob(".tmp-*")), (leftovers, text)


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path: Path) -> None:
    """4 x 2 accumulated sees the same examples as 8 x 1 and normalises the loss over the whole
    window, so losses and the trained adapter agree."""
    big = train(
        _cfg(tmp_path / "big", "--max_steps", "3", "--per_device_train_batch_size", "8"), quiet=True
    )
    acc = train(
        _cfg(
            tmp_path / "acc",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "2",
            "--gradient_checkpointing",
            "true",
        ),
        quiet=True,
    )
    assert [e["loss"] for e in acc.state.log] == pytest.approx(
        [e["loss"] for e in big.state.log], rel=1e-3
    )
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "big" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "acc" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-3 * max(1.0, float(wa[k].abs().max())), k
