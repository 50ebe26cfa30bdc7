"""`kt-sft estimate`: the memory formula, reading shapes from config.json, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kt_sft.cli import main
from kt_sft.estimate import (
    GIB,
    ModelShape,
    cache_entry_bytes,
    estimate_memory,
    rows_depth,
    scratch_bytes,
    shape_from_config,
)


@pytest.mark.parametrize("huge_pages", [None, "1", " Off "])
def test_scratch_is_whole_small_pages_with_or_without_huge_pages(
    monkeypatch: pytest.MonkeyPatch, huge_pages: str | None
) -> None:
    """The engine advises only a buffer's whole 2 MiB pages as huge pages, so its bytes do not
    depend on KT_HUGE_PAGES. T=2048, K=8, H=288, I=64, no LoRA, inference: the x rows slot is
    16384 * 288 * 2 = 9 MiB (not a whole number of 2 MiB), y 18 MiB, h 4 MiB, x 1.125 MiB."""
    kw = {"hidden_size": 288, "intermediate_size": 64, "top_k": 8, "lora_rank": 0}
    monkeypatch.delenv("KT_HUGE_PAGES", raising=False)
    if huge_pages is not None:
        monkeypatch.setenv("KT_HUGE_PAGES", huge_pages)
    got = scratch_bytes(2048, training=False, **kw)
    assert got == (9 << 20) + (4 << 20) + (18 << 20) + 2048 * 288 * 2


def test_rows_depth_follows_the_engine() -> None:
    """x and dY rows are as deep as the engine's gate_up blocks: H rounded up to 32, plus a zero
    step of 32 for bf16 weights when that is >= 1024 and a multiple of 512; the down blocks and h
    rows follow the same rule from I. The engine's bf16 weight bytes (gate_up 2I x the H depth,
    down H x the I depth) show the depths it uses."""
    hs = (512, 1000, 1024, 1056, 2048, 7168)
    assert [rows_depth(h) for h in hs] == [512, 1056, 1056, 1056, 2080, 7200]
    assert [rows_depth(h, "int8") for h in hs] == [512, 1024, 1024, 1056, 2048, 7168]
    assert rows_depth(2048, "int4") == 2048
    kw = {"hidden_size": 1024, "intermediate_size": 64, "top_k": 2, "lora_rank": 0}
    assert (
        cache_entry_bytes(16, **kw) - cache_entry_bytes(16, weight_dtype="int8", **kw)
        == 2 * 16 * 32
    )
    big = {**kw, "training": True}
    # the S = T K rows of x (dY) and the T rows of dout, each 32 bf16 deeper
    assert (
        scratch_bytes(4096, **big) - scratch_bytes(4096, weight_dtype="int8", **big)
        == (4096 * 2 + 4096) * 32 * 2
    )
    shape = ModelShape(
        num_experts=8, num_moe_layers=2, hidden_size=2048, intermediate_size=64, top_k=2
    )
    assert estimate_memory(shape).experts == 2 * 8 * (3 * 2048 * 64 + 2 * 64 * 32) * 2
    wide = shape.replace(intermediate_size=1024)  # down's blocks take the zero step too
    assert estimate_memory(wide).experts == 2 * 8 * (3 * 2048 * 1024 + (2 * 1024 + 2048) * 32) * 2
    assert estimate_memory(shape, weight_dtype="int8").experts == 2 * 8 * (
        3 * 2048 * 64 + (2 * 64 + 2048) * 4
    )
    if not __import__("kt_sft.backend").backend.engine_available():
        return
    import numpy as np

    import kt_kernels as kk

    for h, i in ((1024, 32), (1040, 32), (2048, 32), (64, 1024)):
        eng = kk.MoEEngine(2, 1, h, i, max_tokens=4, num_threads=1, tp=1)
        eng.load_weights(
            gate_up=np.zeros((2, 2 * i, h), dtype=np.float32),
            down=np.zeros((2, h, i), dtype=np.float32),
        )
        hb = -(-h // 16) * 16
        want = 2 * 2 * i * rows_depth(h) * 2 + 2 * hb * rows_depth(i) * 2
        assert eng.memory_stats()["weight_bytes"] == want
        eng.close()


def test_formula_by_hand() -> None:
    shape = ModelShape(
        num_experts=8,
        num_moe_layers=2,
        hidden_size=128,
        intermediate_size=64,
        top_k=2,
        other_params=1000,
    )
    kw = {"lora_rank": 8, "max_tokens": 16, "cache_depth": 1, "group_size": 128}
    bf16 = estimate_memory(shape, weight_dtype="bf16", **kw)
    assert bf16.experts == 2 * 8 * 3 * 128 * 64 * 2 == 786432
    assert bf16.expert_lora == 2 * 8 * 8 * (2 * 128 + 3 * 64) * 16 == 917504
    # entry = 2 T KpH + S (8 Ib + 8 r + 12), S = T K = 32 routed rows, per layer
    assert bf16.cache == 2 * 1 * (2 * 16 * 128 + 32 * (8 * 64 + 8 * 8 + 12)) == 45824
    # x rows, h, y (12 blocks of 16 columns), dout rows, small per-row buffers, each in pages
    assert bf16.scratch == 8192 + 8192 + 24576 + 4096 + 4096 == 49152
    assert bf16.activations == 19 * 2 * 16 * 128 * 4 == 311296
    assert bf16.rest == 4000 and bf16.overhead == GIB
    # both layers' fp32 copies fit the stage's 128 MiB budget; no vocabulary: no loss term
    assert bf16.lora_stage == 2 * 8 * 8 * (2 * 128 + 3 * 64) * 4 == 229376
    assert bf16.loss == 0
    assert bf16.total == 786432 + 917504 + 229376 + 45824 + 49152 + 311296 + 4000 + GIB
    recompute = estimate_memory(shape, policy="recompute", **kw)
    assert recompute.cache == 2 * 1 * 32 * 12 == 768  # the routing; x comes again in backward
    # + x rows, x A^T and h Ad^T, [g | u] (recomputed in backward), in pages
    assert recompute.scratch == 49152 + 4096 + 4096 + 32 * 2 * 64 * 4
    checkpointed = estimate_memory(shape, checkpointing="reentrant", **kw)
    assert checkpointed.cache == 45824 / 2
    assert checkpointed.scratch == 49152 + 4096 + 4096
    assert checkpointed.activations == (6 * 2 + 25) * 16 * 128 * 4
    assert estimate_memory(shape, weight_dtype="int8", **kw).experts == 393216 + 2 * 8 * 256 * 4
    assert (
        estimate_memory(shape, weight_dtype="int4", **kw).experts
        == 196608 + 2 * 8 * 3 * 128 * 64 // 128 * 4
    )
    # LM head and loss: one chunk of c = 256 MiB / (14 V) tokens' logits, or all T (full)
    big = shape.replace(vocab_size=151936, num_moe_layers=48, num_experts=128)
    chunked = estimate_memory(big, **{**kw, "max_tokens": 1024})
    c = (256 << 20) // (14 * 151936)
    assert chunked.loss == c * 151936 * 14 + 1024 * 128 * 4
    full = estimate_memory(big, loss="full", **{**kw, "max_tokens": 1024})
    assert full.loss == 1024 * 151936 * 14 + 1024 * 128 * 4
    # 48 layers of 128 experts: the stage keeps as many whole layers as fit in 128 MiB
    layer = 128 * 8 * (2 * 128 + 3 * 64) * 4
    assert chunked.lora_stage == min(48, (128 << 20) // layer) * layer
    inference = estimate_memory(shape, training=False, non_expert_on_gpu=True, **kw)
    assert inference.expert_lora == inference.cache == inference.rest == 0


def test_bad_shapes_and_options() -> None:
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        ModelShape(num_experts=0, num_moe_layers=1, hidden_size=1, intermediate_size=1)
    shape = ModelShape(num_experts=2, num_moe_layers=1, hidden_size=8, intermediate_size=8)
    with pytest.raises(ValueError, match="weight_dtype must be one of bf16, int8, int4"):
        estimate_memory(shape, weight_dtype="fp8")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral"])
def test_config_shape_counts_the_real_parameters(tmp_path: Path, model_type: str) -> None:
    """Expert + other parameters from config.json match the instantiated tiny model (norms,
    biases and other vectors aside)."""
    from kt_models import tiny

    model = tiny.build(model_type)
    model.config.to_json_file(tmp_path / "config.json")
    shape = shape_from_config(tmp_path)
    matrices = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    assert shape.expert_params + shape.other_params == pytest.approx(matrices, rel=0.02)
    assert shape.model_type == model_type


def test_aliases_and_nesting(tmp_path: Path) -> None:
    cfg = {
        "model_type": "custom_moe",
        "text_config": {
            "n_routed_experts": 64,
            "num_experts_per_tok": 6,
            "hidden_size": 2048,
            "moe_intermediate_size": 1408,
            "num_hidden_layers": 27,
            "first_k_dense_replace": 1,
            "vocab_size": 102400,
            "num_attention_heads": 16,
            "intermediate_size": 10944,
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = shape_from_config(tmp_path / "config.json")
    assert (shape.num_experts, shape.num_moe_layers, shape.top_k) == (64, 26, 6)
    assert (shape.hidden_size, shape.intermediate_size) == (2048, 1408)


def test_config_problems(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config not found"):
        shape_from_config(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2})
    )
    from kt_models import ConfigFieldError

    with pytest.raises(ConfigFieldError, match="number of routed experts"):
        shape_from_config(tmp_path)


def test_command_prints_a_table_and_json(capsys, tmp_path: Path) -> None:
    argv = [
        "estimate",
        "--experts",
        "128",
        "--layers",
        "48",
        "--hidden",
        "2048",
        "--intermediate",
        "768",
        "--top-k",
        "8",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "routed experts" in out and "total RAM" in out
    assert "bf16" in out and "int8" in out and "int4" in out
    # 48 x 128 x 3 x 2048 x 768 bf16 weights = 54 GiB, + 48 x 128 x 2 x 768 x 32 x 2 bytes of the
    # gate/up blocks' zero step (H = 2048 is a multiple of 512) = 0.56 GiB
    assert "54.6" in out
    assert main([*argv, "--dtype", "int4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["weight_dtype"] for r in rows] == ["int4"]
    assert rows[0]["experts"] == pytest.approx(48 * 128 * 3 * 2048 * 768 * (0.5 + 4 / 128))


def test_command_from_a_checkpoint_config(capsys, tmp_path: Path) -> None:
    from kt_models import tiny

    tiny.build("qwen3_moe").config.to_json_file(tmp_path / "config.json")
    assert main(["estimate", "--config", str(tmp_path), "--dtype", "bf16"]) == 0
    assert "qwen3_moe" in capsys.readouterr().out


def test_a_custom_shape_without_other_params_says_so(capsys) -> None:
    shape = [
        "--experts",
        "256",
        "--layers",
        "58",
        "--hidden",
        "7168",
        "--intermediate",
        "2048",
        "--dtype",
        "int4",
    ]
    assert main(["estimate", *shape]) == 0
    text = capsys.readouterr().out
    assert "not counted" in text and "give --other-params N" in text and " 0.00" not in text
    assert main(["estimate", *shape, "--other-params", "17e9", "--vocab", "129280"]) == 0
    text = capsys.readouterr().out
    assert "not counted" not in text and "other 17.00 B" in text


def test_command_needs_a_shape(capsys) -> None:
    with pytest.raises(SystemExit, match=r"--config PATH .* \(missing --layers --intermediate\)"):
        main(["estimate", "--experts", "8", "--hidden", "64"])


# Measured peak RSS growth of one training step (kt_sft.memory_probe: a fresh process, random
# qwen3_moe-shaped model, expert LoRA, one forward + backward) against `estimate_memory`'s
# step_growth. The engine's part (cache, scratch) is counted exactly; PyTorch's activations and
# the allocator's slack are the model's approximation, so the bound is the 15 % of the estimate
# the design asks for.
MEASURED = [
    # layers, tokens, policy, checkpointing
    (2, 1024, "retain", "none"),
    (4, 2048, "retain", "none"),
    (4, 2048, "recompute", "none"),
    (4, 2048, "retain", "reentrant"),
    (2, 2048, "retain", "non_reentrant"),
]


@pytest.mark.skipif(
    not __import__("kt_sft.backend").backend.engine_available(),
    reason="kt-kernels engine not built",
)
@pytest.mark.parametrize(("layers", "tokens", "policy", "checkpointing"), MEASURED)
def test_estimate_matches_measured_peak_rss(
    layers: int, tokens: int, policy: str, checkpointing: str
) -> None:
    from kt_sft.memory_probe import ProbeConfig, measure

    cfg = ProbeConfig(
        layers=layers,
        tokens=tokens,
        hidden_size=256,
        intermediate_size=512,
        num_experts=16,
        top_k=8,
        lora_rank=8,
        policy=policy,
        checkpointing=checkpointing,
    )
    got = measure(cfg, env={"KT_NUM_THREADS": "2", "OMP_NUM_THREADS": "1"})
    shape = ModelShape(
        num_experts=16, num_moe_layers=layers, hidden_size=256, intermediate_size=512, top_k=8
    )
    est = estimate_memory(
        shape, lora_rank=8, max_tokens=tokens, policy=policy, checkpointing=checkpointing
    )
    measured = got["rss_growth"]
    assert abs(est.step_growth - measured) <= 0.15 * measured, (est.to_dict(), got)
    # The engine's own peak by kind is the estimate's cache and scratch (page rounding aside).
    # (The engine counts its pooled buffers; the estimate adds the routing index, 12 bytes per
    # routed row.)
    engine = got["engine"]
    if policy == "retain":
        assert engine["cache_peak_bytes"] <= est.cache <= 1.01 * engine["cache_peak_bytes"]
    else:  # only the routing index, which the engine does not count as pooled memory
        assert engine["cache_peak_bytes"] == 0
    assert engine["scratch_peak_bytes"] == pytest.approx(est.scratch, rel=0.05)


def test_constants_match_the_code_they_model() -> None:
    """estimate.py stays torch-free, so it repeats two defaults: they must be the real ones."""
    from kt_sft import estimate
    from kt_sft.loss import DEFAULT_CHUNK_BYTES

    assert estimate.CHUNK_BYTES == DEFAULT_CHUNK_BYTES
    assert estimate.LORA_STAGE_BYTES == 128 << 20  # KT_LORA_STAGE_MIB's default (lora_stage.h)
