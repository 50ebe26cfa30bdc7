"""The embedded default run (`kt-sft train` with no config), with fewer steps: it trains through the
kt engine, the loss falls, and it writes a standard PEFT adapter, a loss curve and a trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kt_sft.cli import main

STEPS = 30


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kt-cache")


@pytest.fixture(scope="module")
def run(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("run") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KT_CACHE_DIR", str(cache_dir))
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(
                [
                    "train",
                    "--max_steps",
                    str(STEPS),
                    "--output_dir",
                    str(out),
                    "--disable_tqdm",
                    "true",
                ]
            )
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue()


def test_prints_throughput_and_time_split(run: tuple[Path, str]) -> None:
    _, stdout = run
    assert f"done: {STEPS} steps" in stdout
    assert "tokens/s" in stdout
    assert "CPU experts" in stdout and "%: attention, router" in stdout
    assert "experts in the kt engine" in stdout


def test_loss_clearly_decreases(run: tuple[Path, str]) -> None:
    out, _ = run
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["use_kt"] is True
    assert summary["loss_last5_mean"] < summary["loss_first5_mean"] - 0.5, summary


def test_writes_a_standard_peft_adapter(run: tuple[Path, str], cache_dir: Path) -> None:
    out, _ = run
    adapter = out / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    from kt_sft.train import embedded_defaults

    assert cfg["peft_type"] == "LORA" and cfg["r"] == embedded_defaults()["lora_rank"]
    assert any("experts" in t for t in cfg.get("target_parameters") or [])
    # stock transformers + PEFT (no kt) load it onto the stock model with every tensor used
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert cfg["base_model_name_or_path"] == "embedded"  # as the user named it, no local path
    (base_dir,) = [str(p) for p in cache_dir.iterdir() if p.name.startswith("tiny-qwen3-moe-")]
    stock = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(stock, str(adapter))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert len(saved) == len(loaded) > 0
    assert not any("embed_tokens.weight" in k or k.endswith("lm_head.weight") for k in saved)
    ids = torch.tensor([[1, 5, 9, 30, 60]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert (tuned - plain).abs().max() > 1e-3  # the adapter changes the model


def test_loss_curve_and_trace(run: tuple[Path, str]) -> None:
    out, _ = run
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads((out / "trace.json").read_text())
    names = {e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert {"forward", "backward", "optimizer", "experts fwd L0", "experts bwd L0"} <= names
    engine = [e for e in trace["traceEvents"] if e.get("cat") == "engine"]
    if engine:  # the compiled engine reports its phases
        assert {e["name"].split()[0] for e in engine} == {"forward", "backward"}
    engine_trace = json.loads((out / "engine_trace.json").read_text())
    assert any(e.get("cat") == "kt" for e in engine_trace["traceEvents"])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["engine_trace"] == str(out / "engine_trace.json")
    split = summary["time_split"]
    assert split["moe_layers_timed"] == 2
    assert 0 < split["experts_seconds"] < summary["train_seconds"]
    assert summary["tokens_per_second"] > 0
