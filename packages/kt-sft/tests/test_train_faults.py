"""Training under faults: non-finite losses, out-of-range settings, interrupted saves."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kt_sft.loss import ChunkedCausalLMLoss
from kt_sft.train import ConfigError, load_train_config
from kt_sft.train.loop import NonFiniteLossError, train

pytestmark = pytest.mark.usefixtures("kt_cache")

SMALL = [
    "--max_samples",
    "32",
    "--per_device_train_batch_size",
    "4",
    "--cutoff_len",
    "48",
    "--disable_tqdm",
    "true",
    "--plot_loss",
    "false",
    "--logging_steps",
    "1",
]


def _cfg(out: Path, *extra: str):
    return load_train_config(None, [*SMALL, "--output_dir", str(out), *extra])


def _nan_loss_at(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    """Make the training loss NaN on the given (1-based) loss calls (one per micro-batch)."""
    real = ChunkedCausalLMLoss.__call__
    count = [0]

    def loss_call(self, *args, **kwargs):
        count[0] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if count[0] in calls else loss

    monkeypatch.setattr(ChunkedCausalLMLoss, "__call__", loss_call)


def _adapter_finite(directory: Path) -> bool:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors.values())


# -- non-finite losses ------------------------------------------------------------------------


def test_nonfinite_loss_stops_with_a_clear_error_and_writes_nothing_nonfinite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_loss_at(monkeypatch, {3})
    out = tmp_path / "o"
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan.*on_nonfinite_loss"):
        train(_cfg(out, "--max_steps", "4", "--save_steps", "1"), quiet=True)
    assert not (out / "adapter").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert _adapter_finite(out / "checkpoint-2")


def test_nonfinite_loss_skip_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_loss_at(monkeypatch, {2})
    r = train(_cfg(tmp_path / "o", "--max_steps", "4", "--on_nonfinite_loss", "skip"), quiet=True)
    assert r.state.global_step == 4 and r.state.skipped_steps == 1
    assert [e.get("skipped", 0.0) for e in r.state.log] == [0.0, 1.0, 0.0, 0.0]
    assert math.isnan(r.state.log[1]["loss"])
    assert r.summary["skipped_steps"] == 1 and math.isfinite(r.summary["loss_last"])
    assert _adapter_finite(r.adapter_dir)


def test_nonfinite_loss_cli_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kt_sft.cli import main

    _nan_loss_at(monkeypatch, {1})
    code = main(["train", *SMALL, "--max_steps", "2", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "step 1: the loss is nan" in err
    assert "done" not in capsys.readouterr().out
    assert not (tmp_path / "o" / "adapter").exists()


def test_nan_lora_alpha_is_rejected() -> None:
    import kt_kernels as kk
    from kt_sft import KTConfig
    from kt_sft.config import KTConfigError

    with pytest.raises(KTConfigError, match="lora_alpha must be a finite number"):
        KTConfig(lora_rank=4, lora_alpha=float("nan"))
    with pytest.raises(KTConfigError, match="lora_alpha"):
        KTConfig(lora_rank=4, lora_alpha=float("inf"))
    with pytest.raises(ValueError, match=r"lora_alpha.*got nan"):
        kk.MoEEngine(4, 2, 32, 32, lora_rank=2, lora_alpha=float("nan"), num_threads=1)
    with pytest.raises(ConfigError, match="lora_alpha"):
        load_train_config(None, ["--lora_alpha", "nan"])


# -- settings out of range --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            ["--gradient_accumulation_steps", "1e20"],
            r"gradient_accumulation_steps' must be <= 65536",
        ),
        (["--gradient_accumulation_steps", "65537"], "must be <= 65536"),
        (["--seed", str(2**63)], r"'seed' must be <= 9223372036854775807"),
        (["--seed", "-1"], r"'seed' must be >= 0"),
        (["--output_dir", ""], "'output_dir' must not be empty"),
        (["--output_dir", "  "], "'output_dir' must not be empty"),
        (["--on_nonfinite_loss", "ignore"], "must be one of error, skip"),
    ],
)
def test_out_of_range_settings(args: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, args)


def test_range_edges_accepted() -> None:
    cfg = load_train_config(
        None, ["--gradient_accumulation_steps", "65536", "--seed", str(2**63 - 1)]
    )
    assert cfg.gradient_accumulation_steps == 65536 and cfg.seed == 2**63 - 1


# -- exact resume -----------------------------------------------------------------------------


def test_ctrl_c_inside_an_accumulation_window_resumes_exactly_with_dropout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the first micro-batch of step 3 drops that partial window; the checkpoint
    holds the RNG state the window started from, so the resumed run draws the same LoRA dropout
    masks as an uninterrupted one and ends with the same adapter."""
    import os
    import signal

    from safetensors.torch import load_file

    args = (
        "--max_steps",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--lora_target",
        "q_proj,v_proj",
        "--lora_dropout",
        "0.3",
    )
    straight = train(_cfg(tmp_path / "straight", *args), quiet=True)

    real = ChunkedCausalLMLoss.__call__
    count = [0]

    def loss_call(self, *a, **k):
        count[0] += 1
        if count[0] == 5:  # step 3, first micro-batch
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **k)

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(ChunkedCausalLMLoss, "__call__", loss_call)
        first = train(_cfg(out, *args), quiet=True)
    assert first.interrupted and first.state.global_step == 2
    resumed = train(_cfg(out, *args, "--resume_from_checkpoint", "auto"), quiet=True)
    assert resumed.state.global_step == 4
    a = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_huge_kt_max_tokens_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """KT_MAX_TOKENS / kt_max_tokens reach the engine's bound: a ValueError naming the largest
    allowed value, before any buffer is allocated."""
    import kt_sft
    from kt_sft.backend import engine_available

    if not engine_available():
        pytest.skip("kt-kernels engine not built")
    tiny = pytest.importorskip("kt_models.tiny")
    monkeypatch.setenv("KT_MAX_TOKENS", str(2**40))
    with pytest.raises(ValueError, match=r"max_tokens=1099511627776 is too large.*largest"):
        kt_sft.wrap_model(tiny.build("qwen3_moe"), kt_sft.KTConfig(num_threads=1))
