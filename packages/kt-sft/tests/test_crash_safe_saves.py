"""Saves survive kills: the directory swap always leaves a complete version (restored by the
next run when a kill parked it mid-swap), leftovers of interrupted writes are cleaned, a full
disk is reported as such, and a `kt-sft train` killed at random points around its saves always
leaves a loadable adapter or checkpoint."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kt_sft import _swap
from kt_sft.train import artifacts


def _complete(directory: Path, step: int) -> None:
    directory.mkdir()
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (directory / "adapter_config.json").write_text("{}")


def test_checkpoint_parked_mid_swap_is_restored_and_leftovers_removed(tmp_path: Path) -> None:
    """What a kill between the two renames of the old swap left: the old checkpoint under its
    parked name, no checkpoint-3, the new copy's temporary folder and an adapter temp inside it."""
    out = tmp_path / "out"
    out.mkdir()
    _complete(out / "checkpoint-2", 2)
    _complete(out / ".tmp-old-checkpoint-3-4242", 3)
    _complete(out / ".tmp-checkpoint-3-abcd", 3)
    (out / "..tmp-checkpoint-3-abcd.tmp-efgh").mkdir()
    (out / ".adapter.tmp-ijkl").mkdir()
    (out / ".tmp-train_summary.json").write_text("{")
    artifacts.prepare_output_dir(out, overwrite=False, resuming=True)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert artifacts.latest_checkpoint(out) == out / "checkpoint-3"
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text()) == {
        "global_step": 3
    }


def test_parked_copy_with_a_published_target_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _complete(out / "checkpoint-3", 3)
    _complete(out / ".checkpoint-3.old-77", 2)
    assert _swap.clean_leftovers(out) == [out / ".checkpoint-3.old-77"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_dir_replaces_and_leaves_nothing(
    tmp_path: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not exchange:
        monkeypatch.setattr(_swap, "_exchange", lambda a, b: False)
    target = tmp_path / "checkpoint-1"
    artifacts.atomic_dir(target, lambda d: (d / "v").write_text("1"))
    artifacts.atomic_dir(target, lambda d: (d / "v").write_text("2"))
    assert (target / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


@pytest.mark.parametrize("exchange", [True, False])
def test_kill_inside_the_swap_always_leaves_a_complete_version(
    tmp_path: Path, exchange: bool
) -> None:
    """The process dies (os._exit) right after each rename of the swap in turn; the target, or
    the copy the next run restores, is always a complete version."""
    for die_after in (1, 2):
        out = tmp_path / f"{exchange}-{die_after}"
        out.mkdir()
        code = f"""
            import os, sys
            from pathlib import Path
            from kt_sft import _swap
            from kt_sft.train import artifacts
            if not {exchange}:
                _swap._exchange = lambda a, b: False
            out = Path({str(out)!r})
            artifacts.atomic_dir(out / "checkpoint-1", lambda d: (d / "v").write_text("old"))
            calls = [0]
            real_replace, real_exchange = os.replace, _swap._exchange
            def count(result):
                calls[0] += 1
                if calls[0] == {die_after}:
                    os._exit(9)
                return result
            os.replace = lambda a, b: count(real_replace(a, b))
            _swap._exchange = lambda a, b: count(real_exchange(a, b))
            artifacts.atomic_dir(out / "checkpoint-1", lambda d: (d / "v").write_text("new"))
        """
        r = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode != 9:  # the swap took fewer steps than die_after: it completed
            assert r.returncode == 0, r.stderr
        artifacts.prepare_output_dir(out, overwrite=False, resuming=True)
        assert [p.name for p in out.iterdir()] == ["checkpoint-1"], r.stderr
        assert (out / "checkpoint-1" / "v").read_text() in ("old", "new")


def test_disk_full_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save on a full disk fails with an iostream error; the save names the cause."""

    class _Full:
        f_bavail, f_frsize = 3, 4096

    def write(d: Path) -> None:
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0 "
            "(basic_ios::clear: iostream error)"
        )

    monkeypatch.setattr(os, "statvfs", lambda p: _Full())
    with pytest.raises(OSError, match="No space left on device") as info:
        artifacts.atomic_dir(tmp_path / "checkpoint-1", write)
    assert info.value.errno == errno.ENOSPC and "12288 bytes free" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_write_errors_with_space_left_are_not_disk_full(tmp_path: Path) -> None:
    def write(d: Path) -> None:
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        artifacts.atomic_dir(tmp_path / "checkpoint-1", write)


# -- fault injection: kill `kt-sft train` at random points around its saves ------------------

SMALL = [
    "--max_samples",
    "32",
    "--per_device_train_batch_size",
    "4",
    "--cutoff_len",
    "32",
    "--disable_tqdm",
    "true",
    "--plot_loss",
    "false",
    "--logging_steps",
    "1",
    "--profile",
    "false",
]


def _loadable(out: Path) -> Path:
    """The adapter a user would load from `out` after a crash (as `kt-sft chat` finds it), and
    check it loads: its config parses and its tensors read."""
    from safetensors.torch import load_file

    found = artifacts.find_adapter_dir(out)
    json.loads((found / "adapter_config.json").read_text())
    assert load_file(str(found / "adapter_model.safetensors"))
    return found


def test_random_kills_around_saves_always_leave_a_loadable_adapter(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rng = random.Random(1234)
    env = dict(
        os.environ,
        KT_CACHE_DIR=str(tmp_path_factory.mktemp("kt-cache")),
        PYTHONUNBUFFERED="1",
        KT_NUM_THREADS="1",
    )
    out = tmp_path / "run"
    budget = time.monotonic() + 45
    kills = 0
    for it in range(5):
        if time.monotonic() > budget:
            break
        resume = ["--resume_from_checkpoint", "auto"] if artifacts.list_checkpoints(out) else []
        args = [
            sys.executable,
            "-m",
            "kt_sft.cli",
            "train",
            *SMALL,
            "--max_steps",
            "400",
            "--save_steps",
            "1",
            "--save_total_limit",
            "2",
            "--output_dir",
            str(out),
            "--overwrite_output_dir",
            "true",
            *resume,
        ]
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        # Wait for a step line of this attempt (the second of the first attempt: its first
        # checkpoint is then written), then kill after a random delay: saves run every step, so
        # kills land before, inside and after them.
        wait_for = 1 if resume else 2
        steps = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("step "):
                steps += 1
                if steps == wait_for:
                    time.sleep(rng.uniform(0.0, 0.3))
                    break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        _loadable(out)  # before any cleanup: what a reader sees right after the kill
        artifacts.prepare_output_dir(out, overwrite=False, resuming=True)
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], it
        _loadable(out)
    assert kills >= 2


def test_cli_reports_disk_full(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kt_sft import cli

    def full(args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device while writing /x/checkpoint-3")

    monkeypatch.setattr(cli, "_cmd_train", full)
    assert cli.main(["train"]) == 1
    err = capsys.readouterr().err
    assert "kt-sft train: error: No space left on device while writing /x/checkpoint-3" in err
