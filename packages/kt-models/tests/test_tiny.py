"""Tiny reference models: size limits, determinism, round trip through save/from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

import kt_models
from kt_models import get_arch_spec, tiny

HAS_SHARED = {"qwen2_moe", "qwen3_next", "deepseek_v2", "deepseek_v3", "glm4_moe"}
DENSE_FIRST = {
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
}  # qwen3_moe: sparse step 2


@pytest.mark.parametrize("model_type", kt_models.supported_model_types())
def test_tiny_model_is_small_and_has_the_arch_features(tiny_models, model_type) -> None:
    model = tiny_models[model_type]
    spec = get_arch_spec(model)
    config = model.config
    assert 2 <= spec.num_layers(config) <= 4
    assert spec.hidden_size(config) <= 256
    assert 4 <= spec.num_experts(config) <= 16
    assert 2 <= spec.top_k(config) <= 4
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moe = spec.moe_layer_indices(config)
    assert (spec.shared_experts(model, moe[0]) is not None) == (model_type in HAS_SHARED)
    assert (moe[0] > 0) == (model_type in DENSE_FIRST)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 6, 128) and torch.isfinite(logits).all()


def test_build_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = tiny.build("mixtral", seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    b = tiny.build("mixtral", seed=4)
    c = tiny.build("mixtral", seed=5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(
        a.model.layers[0].mlp.experts.gate_up_proj, c.model.layers[0].mlp.experts.gate_up_proj
    )


def test_overrides_reach_the_config() -> None:
    model = tiny.build("qwen3_moe", num_experts=4, num_hidden_layers=2, moe_intermediate_size=16)
    spec = get_arch_spec(model)
    assert (spec.num_experts(model.config), spec.intermediate_size(model.config)) == (4, 16)
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape == (4, 32, 64)
    vl = tiny.tiny_config("qwen3_vl_moe", text_config={"num_experts": 4})
    assert vl.text_config.num_experts == 4 and vl.text_config.hidden_size == 64


def test_unknown_or_refused_type() -> None:
    with pytest.raises(kt_models.UnsupportedArchitectureError):
        tiny.build("nemotron_h")  # no gate projection
    with pytest.raises(KeyError, match="no tiny config"):
        tiny.build("gpt_oss")  # discovered, built with tiny.build_any


@pytest.mark.parametrize("shard_size", [None, "50KB"])
def test_saved_checkpoint_loads_with_from_pretrained(tiny_models, tmp_path, shard_size) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_models["qwen3_next"]
    directory = tiny.save(model, tmp_path / "ckpt", shard_size=shard_size)
    index = directory / "model.safetensors.index.json"
    if shard_size is None:
        assert (directory / "model.safetensors").is_file() and not index.exists()
    else:
        assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_quantize_fp8_blockwise_round_trip() -> None:
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    q, s = tiny.quantize_fp8_blockwise(w, (16, 16))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    back = kt_models.dequantize_fp8_blockwise(q, s, (16, 16), torch.float32)
    assert ((back - w).abs() <= w.abs() / 16 + 1e-6).all()
