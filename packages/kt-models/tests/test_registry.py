"""The registry against the installed transformers: every entry resolves on a real module tree."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import kt_models
from kt_models import (
    ArchSpec,
    ConfigFieldError,
    ModulePathError,
    UnsupportedArchitectureError,
    get_arch_spec,
    register_arch,
    supported_model_types,
    tiny,
    unregister_arch,
)

REQUIRED = {
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "deepseek_v2",
    "deepseek_v3",
    "mixtral",
    "glm4_moe",
    "olmoe",
}
HAS_SHARED = {"qwen2_moe", "qwen3_next", "deepseek_v2", "deepseek_v3", "glm4_moe"}
HAS_DENSE_FIRST = {"qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe"}


def test_required_entries_are_registered() -> None:
    assert REQUIRED <= set(supported_model_types())


@pytest.mark.parametrize("model_type", sorted(kt_models.supported_model_types()))
def test_every_path_and_field_resolves_on_the_real_module_tree(tiny_models, model_type) -> None:
    model = tiny_models[model_type]
    spec = get_arch_spec(model)
    assert spec.model_type == model_type == get_arch_spec(model.config).model_type
    config = model.config
    layers = spec.decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == spec.num_layers(config)

    # Independent truth: which layers actually hold an experts module.
    actual_moe = [
        i
        for i, layer in enumerate(layers)
        if hasattr(getattr(layer, spec.moe_block_attr), spec.experts_attr)
    ]
    assert spec.moe_layer_indices(config) == actual_moe
    assert actual_moe, "tiny model has no MoE layer"

    for i in actual_moe:
        block = spec.moe_block(model, i)
        experts = spec.experts(model, i)
        assert getattr(block, spec.experts_attr) is experts
        assert type(experts).__name__ == spec.experts_class
        e, h, inter = (
            experts.gate_up_proj.shape[0],
            experts.down_proj.shape[1],
            experts.down_proj.shape[2],
        )
        assert experts.gate_up_proj.shape == (e, 2 * inter, h)
        assert (
            spec.num_experts(config),
            spec.hidden_size(config),
            spec.intermediate_size(config),
        ) == (e, h, inter)
        assert experts.is_concatenated and not experts.is_transposed and not experts.has_bias
        router = spec.router(model, i)
        router_weight = router.weight
        assert router_weight.shape == (e, h)
        assert spec.top_k(config) == router.top_k
        shared = spec.shared_experts(model, i)
        assert (shared is not None) == (model_type in HAS_SHARED)
        if shared is not None:
            assert isinstance(shared.down_proj, nn.Linear)
        if spec.shared_expert_gate_attr:
            assert spec.shared_expert_gate(model, i).weight.shape == (1, h)
        # The activation the registry reports is the one the experts module applies.
        act = spec.activation(config)
        x = torch.linspace(-3, 3, 7)
        assert act == "silu"
        torch.testing.assert_close(experts.act_fn(x), torch.nn.functional.silu(x))

    dense = [i for i in range(len(layers)) if i not in actual_moe]
    assert bool(dense) == (model_type in HAS_DENSE_FIRST or model_type == "qwen3_moe")
    for i in dense:
        with pytest.raises(ModulePathError, match=f"layer {i} has no routed experts"):
            spec.experts(model, i)


@pytest.mark.parametrize("model_type", sorted(kt_models.supported_model_types()))
def test_checkpoint_expert_key_names_what_transformers_writes(saved_tiny, model_type) -> None:
    from safetensors import safe_open

    spec = get_arch_spec(model_type)
    with safe_open(str(saved_tiny[model_type] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    layer = spec.moe_layer_indices(kt_models.CheckpointReader(saved_tiny[model_type]).config)[-1]
    per_expert = spec.checkpoint_expert_key(layer, 3, "up")
    fused = spec.checkpoint_fused_key(layer, "gate_up")
    assert per_expert in keys or fused in keys
    if per_expert in keys:
        assert spec.checkpoint_expert_key(layer, 3, "gate") in keys
        assert spec.checkpoint_expert_key(layer, 3, "down") in keys


def test_checkpoint_expert_key_examples() -> None:
    assert (
        get_arch_spec("deepseek_v3").checkpoint_expert_key(3, 5, "gate")
        == "model.layers.3.mlp.experts.5.gate_proj.weight"
    )
    mixtral = get_arch_spec("mixtral")
    assert (
        mixtral.checkpoint_expert_key(0, 1, "up")
        == "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    )
    assert (
        mixtral.checkpoint_expert_key(0, 1, "down_proj")
        == "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    )
    with pytest.raises(ValueError, match="unknown projection"):
        mixtral.checkpoint_expert_key(0, 1, "w9")


def test_peft_wrapped_model_resolves_to_the_same_modules(tiny_models) -> None:
    peft = pytest.importorskip("peft")
    base = tiny.build("qwen3_moe", seed=3)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    spec = get_arch_spec(wrapped)
    assert spec.model_type == "qwen3_moe"
    assert spec.decoder_layers(wrapped) is base.model.layers
    assert spec.experts(wrapped, 1) is base.model.layers[1].mlp.experts
    assert kt_models.unwrap_model(wrapped.base_model) is base


def test_unsupported_type_lists_supported_and_how_to_register() -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_arch_spec({"model_type": "llama", "hidden_size": 8})
    message = str(info.value)
    for model_type in supported_model_types():
        assert model_type in message
    assert "register_arch" in message and "ArchSpec" in message
    assert info.value.model_type == "llama"


def test_gpt_oss_is_discovered_not_refused() -> None:
    """gpt-oss's interleaved, biased, clamped-GLU experts are an engine variant now."""
    from transformers import AutoConfig

    spec = get_arch_spec(AutoConfig.for_model("gpt_oss"))
    assert spec.discovered is not None and spec.checkpoint_fused_transposed
    assert "gpt_oss" not in kt_models.refused_model_types()


def test_text_config_nesting_for_vision_language_configs() -> None:
    raw = {
        "model_type": "qwen3_vl_moe",
        "text_config": {
            "model_type": "qwen3_vl_moe_text",
            "num_experts": 6,
            "num_experts_per_tok": 3,
            "hidden_size": 40,
            "moe_intermediate_size": 12,
            "num_hidden_layers": 2,
        },
    }
    spec = get_arch_spec(raw)
    assert spec.model_type == "qwen3_vl_moe"
    assert (
        spec.num_experts(raw),
        spec.top_k(raw),
        spec.hidden_size(raw),
        spec.intermediate_size(raw),
    ) == (6, 3, 40, 12)
    assert spec.moe_layer_indices(raw) == [0, 1]
    # An unregistered wrapper whose text model is registered resolves through text_config.
    wrapper = {"model_type": "some_vlm", "text_config": {"model_type": "mixtral"}}
    assert get_arch_spec(wrapper).model_type == "mixtral"


@pytest.mark.parametrize("field", ["n_routed_experts", "num_experts", "num_local_experts"])
def test_expert_count_aliases(field: str) -> None:
    raw = {
        "model_type": "deepseek_v3",
        field: 12,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 2,
    }
    spec = get_arch_spec(raw)
    assert spec.num_experts(raw) == 12
    assert spec.moe_layer_indices(raw) == [2, 3]


def test_layer_rules_follow_the_config() -> None:
    qwen = get_arch_spec("qwen2_moe")
    raw = {
        "model_type": "qwen2_moe",
        "num_hidden_layers": 6,
        "num_experts": 4,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
    }
    assert qwen.moe_layer_indices(raw) == [1, 5]
    assert get_arch_spec("mixtral").moe_layer_indices(
        {"model_type": "mixtral", "num_hidden_layers": 3, "num_local_experts": 4}
    ) == [0, 1, 2]


def test_config_missing_expert_fields_names_the_fields() -> None:
    spec = get_arch_spec("deepseek_v3")
    raw = {"model_type": "deepseek_v3", "num_hidden_layers": 2}
    with pytest.raises(ConfigFieldError, match="n_routed_experts") as info:
        spec.num_experts(raw)
    assert "num_local_experts" in str(info.value)
    with pytest.raises(ConfigFieldError):
        spec.moe_layer_indices(raw)
    with pytest.raises(ConfigFieldError, match="must be an integer"):
        spec.num_experts({"model_type": "deepseek_v3", "n_routed_experts": "many"})


def test_register_and_unregister_a_new_architecture() -> None:
    spec = ArchSpec(
        model_type="toy_moe",
        layers_path="backbone.blocks",
        moe_block_attr="ffn",
        expert_storage="modulelist",
        proj_names=("w1", "w3", "w2"),
    )
    register_arch(spec)
    try:
        assert get_arch_spec({"model_type": "toy_moe"}) is spec
        with pytest.raises(ValueError, match="already registered"):
            register_arch(spec)
        assert (
            register_arch(
                dataclasses.replace(spec, router_attr="router"), overwrite=True
            ).router_attr
            == "router"
        )
    finally:
        unregister_arch("toy_moe")
    assert "toy_moe" not in supported_model_types()


@pytest.mark.parametrize(
    "bad",
    [
        {"expert_storage": "packed"},
        {"proj_names": ("a", "b")},
        {"layers_path": ""},
        {"num_experts_fields": ()},
        {"router_kind": "magic"},
    ],
)
def test_invalid_spec_registers_nothing(bad) -> None:
    before = supported_model_types()
    with pytest.raises(ValueError):
        register_arch(ArchSpec(model_type="broken_moe", **bad))
    assert supported_model_types() == before
