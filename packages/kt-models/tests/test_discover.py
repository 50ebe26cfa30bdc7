"""Architectures discovered from transformers' experts interface (no registry entry)."""

from __future__ import annotations

import pytest
import torch

import kt_models
from kt_models import UnsupportedArchitectureError, get_arch_spec, tiny
from kt_models.discover import (
    DEFAULT_LAYOUT,
    discover_arch_spec,
    experts_interface_model_types,
    experts_layout,
    find_experts_modules,
    unsupported_features,
)
from kt_models.gating import Gating, match_gating

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_enumeration_reads_the_installed_transformers() -> None:
    types = experts_interface_model_types()
    assert {"mixtral", "qwen3_moe", "cohere2_moe", "gpt_oss"} <= set(types)
    assert "llama" not in types  # dense: no experts interface
    everything = experts_interface_model_types(causal_lm_only=False)
    assert set(types) < set(everything)  # vision / audio sub-configs are left out by default


def test_unregistered_default_layout_type_is_discovered() -> None:
    assert "cohere2_moe" not in kt_models.supported_model_types()
    model = tiny.build_any("cohere2_moe")
    spec = get_arch_spec(model)
    assert spec.discovered is not None and spec.model_type == "cohere2_moe"
    assert (spec.layers_path, spec.moe_block_attr, spec.experts_attr) == (
        "model.layers",
        "mlp",
        "experts",
    )
    layers = spec.moe_layer_indices(model.config)
    assert layers == [0, 1]
    experts = spec.experts(model, layers[0])
    assert experts is model.model.layers[0].mlp.experts
    e, two_i, h = experts.gate_up_proj.shape
    assert (
        spec.num_experts(model.config),
        spec.hidden_size(model.config),
        spec.intermediate_size(model.config),
    ) == (e, h, two_i // 2)
    assert spec.top_k(model.config) == 2 and spec.activation(model.config) == "silu"
    assert get_arch_spec(model) is spec  # cached on the model


def test_config_and_model_type_string_are_discovered_on_meta() -> None:
    config = tiny.generic_tiny_config("cohere2_moe")
    spec = get_arch_spec(config)
    assert spec.discovered is not None and spec.discovered.num_experts == 8
    assert get_arch_spec("cohere2_moe").model_type == "cohere2_moe"


@pytest.mark.parametrize("model_type", sorted(kt_models.tiny.TINY_CONFIGS))
def test_discovery_agrees_with_every_registered_entry(model_type: str) -> None:
    """The registry's hand-written paths, MoE layers and sizes are what discovery reads."""
    model = tiny.build(model_type)
    registered = get_arch_spec(model)
    found = discover_arch_spec(model)
    config = model.config.get_text_config()
    assert found.layers_path == registered.layers_path
    assert (found.moe_block_attr, found.experts_attr) == (
        registered.moe_block_attr,
        registered.experts_attr,
    )
    assert found.moe_layer_indices(config) == registered.moe_layer_indices(config)
    for what in ("num_experts", "hidden_size", "intermediate_size", "top_k"):
        assert getattr(found, what)(config) == getattr(registered, what)(config), what
    layer = registered.moe_layer_indices(config)[0]
    for e, proj in ((0, "gate"), (5, "up"), (7, "down")):
        assert found.checkpoint_expert_key(layer, e, proj) == registered.checkpoint_expert_key(
            layer, e, proj
        ), (model_type, proj)


@pytest.mark.parametrize(
    ("model_type", "features"),
    [
        ("ergo", ("has_gate=False",)),
        ("nemotron_h", ("has_gate=False",)),
    ],
)
def test_refusals_name_the_model_type_and_the_feature(
    model_type: str, features: tuple[str, ...]
) -> None:
    model = tiny.build_any(model_type)
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_arch_spec(model)
    assert repr(model_type) in str(info.value) and info.value.model_type == model_type
    for feature in features:
        assert feature in str(info.value), feature


def test_layout_flags_and_features() -> None:
    model = tiny.build_any("ergo")
    (_, experts), *_ = find_experts_modules(model)
    layout = experts_layout(experts)
    assert not layout.has_gate and layout.is_transposed and layout.activation == "relu2"
    assert not layout.is_default and "is_transposed" in layout.variant
    # transposed storage is repacked at load, relu2 is an engine activation: the gate is missing
    assert len(unsupported_features(layout)) == 1
    qwen = tiny.build("qwen3_moe")
    (_, experts), *_ = find_experts_modules(qwen)
    layout = experts_layout(experts)
    assert layout.is_default and layout.variant == "default"
    assert unsupported_features(layout) == []
    assert {k: getattr(layout, k) for k in DEFAULT_LAYOUT} == DEFAULT_LAYOUT


def test_checkpoint_names_come_from_the_conversion_rules(tmp_path) -> None:
    minimax = tiny.build_any("minimax")
    spec = get_arch_spec(minimax)
    assert (
        spec.checkpoint_expert_key(0, 3, "up")
        == "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    )
    granite = tiny.build_any("granitemoe")
    spec = get_arch_spec(granite)
    assert (
        spec.checkpoint_fused_key(1, "gate_up")
        == "model.layers.1.block_sparse_moe.input_linear.weight"
    )
    # what save_pretrained writes is what the reader finds, value for value
    for model in (minimax, granite):
        path = tiny.save(model, tmp_path / model.config.model_type)
        reader = kt_models.CheckpointReader(path)
        for layer, weights in reader.iter_layer_experts(dtype=torch.float32):
            ref = kt_models.extract_expert_weights(model, layer, release=False)
            assert torch.equal(weights.gate_up, ref.gate_up)
            assert torch.equal(weights.down, ref.down)


def test_a_model_without_experts_is_not_discovered() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            num_hidden_layers=1,
            hidden_size=32,
            intermediate_size=16,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match="'llama'"):
        get_arch_spec(model)


def test_gate_override_computing_the_default_is_accepted() -> None:
    from kt_models.discover import gate_is_default

    beam = tiny.build_any("beam")  # overrides _apply_gate with an fp32 upcast of the default
    (_, experts), *_ = find_experts_modules(beam)
    assert type(experts)._apply_gate is not None and gate_is_default(experts)
    assert get_arch_spec(beam).discovered is not None
    clamped = tiny.build_any("deepseek_v4")  # clamps gate and up: a different function
    (_, experts), *_ = find_experts_modules(clamped)
    layout = experts_layout(experts)
    assert not gate_is_default(experts) and layout.custom_gate
    assert layout.gating is not None and layout.gating.limit == 10.0  # a clamp the engine runs
    assert unsupported_features(layout) == []


def test_transposed_storage_is_repacked_not_refused() -> None:
    model = tiny.build_any("aria_text")  # is_transposed=True, otherwise the default layout
    spec = get_arch_spec(model)
    (_, experts), *_ = find_experts_modules(model)
    layout = experts_layout(experts)
    assert layout.is_transposed and unsupported_features(layout) == []
    assert "repacked at load" in layout.variant
    e, h, two_i = experts.gate_up_proj.shape
    assert (
        spec.num_experts(model.config),
        spec.hidden_size(model.config),
        spec.intermediate_size(model.config),
    ) == (e, h, two_i // 2)
    assert spec.checkpoint_fused_transposed


@pytest.mark.parametrize(
    ("model_type", "want"),
    [
        ("gpt_oss", Gating("silu", 1.702, 7.0, 1.0, interleaved=True)),
        ("inkling2_text", Gating("silu", gate_softcap=4.0, up_softcap=25.0)),
        ("minimax_m3_vl_text", Gating("silu", 1.702, 7.0, 1.0)),
        ("hy_v4", Gating("silu", 1.0, 10.0, 0.0)),
        ("deepseek_v4", Gating("silu", 1.0, 10.0, 0.0)),
        ("qwen3_moe", Gating()),
    ],
)
def test_gatings_are_read_from_apply_gate(model_type: str, want: Gating) -> None:
    """The gating found for each family is the one its _apply_gate computes: the engine's
    formula (Gating.apply) agrees with the class's own on inputs far past the limit, and the
    layout is then supported (gpt-oss: interleaved gate/up, biases and the clamped GLU)."""
    import torch

    model = tiny.build_any(model_type)
    (_, experts), *_ = find_experts_modules(model)
    layout = experts_layout(experts)
    got = layout.gating
    assert got is not None
    assert (got.activation, got.limit, got.up_offset, got.interleaved) == (
        want.activation,
        want.limit,
        want.up_offset,
        want.interleaved,
    )
    assert (got.gate_softcap, got.up_softcap) == (want.gate_softcap, want.up_softcap)
    assert got.alpha == pytest.approx(want.alpha)
    assert unsupported_features(layout) == []
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(8, 2 * layout.intermediate_size, generator=gen) * 20
    with torch.no_grad():
        torch.testing.assert_close(
            got.apply(probe), type(experts)._apply_gate(experts, probe), rtol=1e-5, atol=1e-5
        )
    assert discover_arch_spec(model).discovered is not None
    if model_type == "gpt_oss":
        assert layout.has_bias and not layout.is_concatenated
        assert "gating silu, alpha 1.702, limit 7, up + 1" in layout.variant


def test_gating_candidates_need_an_exact_match() -> None:
    """A gating is found only when the engine's formula reproduces the override: the limit is
    the module's own (changed here), and a soft-capped GLU is no member of the family."""
    model = tiny.build_any("gpt_oss")
    (_, experts), *_ = find_experts_modules(model)
    experts.limit = 3.0
    assert match_gating(experts, 16).limit == 3.0

    class Softcapped(type(experts)):  # type: ignore[misc]
        def _apply_gate(self, gate_up):
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            return 30 * (gate / 30).tanh() * (gate * 1.702).sigmoid() * (up + 1)

    experts.__class__ = Softcapped
    assert match_gating(experts, 16) is None
    layout = experts_layout(experts)
    (problem,) = unsupported_features(layout)
    assert "custom gating" in problem and "Softcapped._apply_gate" in problem
