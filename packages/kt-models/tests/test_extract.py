"""Expert weights out of instantiated models, released to meta."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kt_models
from kt_models import (
    ArchSpec,
    ExpertsReleasedError,
    ModulePathError,
    experts_released,
    extract_expert_weights,
    get_arch_spec,
    register_arch,
    release_experts,
    tiny,
    unregister_arch,
)


def _params_of(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()


@pytest.mark.parametrize("model_type", kt_models.supported_model_types())
def test_extract_and_release_every_moe_layer(tiny_models, model_type) -> None:
    model = copy.deepcopy(tiny_models[model_type])
    spec = get_arch_spec(model)
    for layer in spec.moe_layer_indices(model.config):
        experts = spec.experts(model, layer)
        gate_up_ref, down_ref = _params_of(experts)
        inter = down_ref.shape[2]
        weights = extract_expert_weights(model, layer)
        assert weights.is_fused and weights.dtype == torch.float32
        assert torch.equal(weights.gate_up, gate_up_ref)
        assert torch.equal(weights.down, down_ref)
        gate, up, _ = weights.split()
        assert torch.equal(gate, gate_up_ref[:, :inter]) and torch.equal(up, gate_up_ref[:, inter:])
        assert (weights.num_experts, weights.hidden_size, weights.intermediate_size) == (
            spec.num_experts(model.config),
            spec.hidden_size(model.config),
            spec.intermediate_size(model.config),
        )
        # Released: meta parameters of the same shape and dtype, frozen, no memory.
        for name, ref in (("gate_up_proj", gate_up_ref), ("down_proj", down_ref)):
            param = getattr(experts, name)
            assert param.device.type == "meta" and param.shape == ref.shape
            assert param.dtype == ref.dtype and not param.requires_grad
        assert experts_released(model, layer)
        with pytest.raises(ExpertsReleasedError, match="meta"):
            extract_expert_weights(model, layer)


def test_the_experts_math_matches_the_hf_module(tiny_models) -> None:
    """The extracted layout (gate rows first, nn.Linear out x in) computes what HF computes."""
    model = copy.deepcopy(tiny_models["qwen3_moe"])
    experts = get_arch_spec(model).experts(model, 1)
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    ids = torch.tensor([[0, 3], [7, 7], [2, 5], [1, 0], [6, 4]])
    w = torch.rand(5, 2)
    with torch.no_grad():
        want = experts(x, ids, w)
    weights = extract_expert_weights(model, 1, release=False)
    gate, up, down = weights.split()
    got = torch.zeros_like(x)
    for t in range(5):
        for j in range(2):
            e = ids[t, j]
            h = torch.nn.functional.silu(x[t] @ gate[e].T) * (x[t] @ up[e].T)
            got[t] += w[t, j] * (h @ down[e].T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_release_false_leaves_the_model_untouched_and_shares_storage(tiny_models) -> None:
    model = copy.deepcopy(tiny_models["deepseek_v3"])
    experts = get_arch_spec(model).experts(model, 2)
    weights = extract_expert_weights(model, 2, release=False)
    assert not experts_released(model, 2)
    assert weights.gate_up.data_ptr() == experts.gate_up_proj.data_ptr()


def test_release_keeps_the_storage_alive_in_the_result(tiny_models) -> None:
    model = copy.deepcopy(tiny_models["mixtral"])
    experts = get_arch_spec(model).experts(model, 0)
    ptr = experts.gate_up_proj.data_ptr()
    weights = extract_expert_weights(model, 0)
    assert weights.gate_up.data_ptr() == ptr  # no copy was made


def test_dense_layer_is_refused_and_nothing_is_released(tiny_models) -> None:
    model = copy.deepcopy(tiny_models["deepseek_v2"])
    with pytest.raises(ModulePathError, match="layer 0 has no routed experts"):
        extract_expert_weights(model, 0)
    assert not any(p.device.type == "meta" for p in model.parameters())


def test_shape_mismatch_with_config_releases_nothing(tiny_models) -> None:
    model = copy.deepcopy(tiny_models["olmoe"])
    model.config.intermediate_size = 31
    with pytest.raises(ValueError, match="config implies"):
        extract_expert_weights(model, 0)
    assert not any(p.device.type == "meta" for p in model.parameters())


def test_release_experts_without_reading(tiny_models) -> None:
    model = copy.deepcopy(tiny_models["glm4_moe"])
    release_experts(model, 1)
    assert experts_released(model, 1) and not experts_released(model, 2)


def test_extract_through_peft_target_parameters() -> None:
    peft = pytest.importorskip("peft")
    model = tiny.build("qwen3_moe", seed=5)
    ref = _params_of(model.model.layers[1].mlp.experts)
    config = peft.LoraConfig(
        r=2,
        target_modules=[],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    wrapped = peft.get_peft_model(model, config)
    weights = extract_expert_weights(wrapped, 1)
    assert torch.equal(weights.gate_up, ref[0]) and torch.equal(weights.down, ref[1])
    assert experts_released(wrapped, 1)
    lora = [
        n for n, p in wrapped.named_parameters() if "layers.1.mlp.experts" in n and "lora_" in n
    ]
    assert lora and all(p.device.type == "cpu" for n, p in wrapped.named_parameters() if n in lora)


# ---- ModuleList experts (remote-code style) ----------------------------------------------------


class _Expert(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)


class _Block(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.router = nn.Linear(cfg["hidden_size"], cfg["num_experts"], bias=False)
        self.experts = nn.ModuleList(
            _Expert(cfg["hidden_size"], cfg["moe_intermediate_size"])
            for _ in range(cfg["num_experts"])
        )


class _Layer(nn.Module):
    def __init__(self, cfg: dict, moe: bool) -> None:
        super().__init__()
        self.ffn = _Block(cfg) if moe else nn.Linear(cfg["hidden_size"], cfg["hidden_size"])


class _ToyModel(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList(
            _Layer(cfg, i >= 1) for i in range(cfg["num_hidden_layers"])
        )


@pytest.fixture
def toy_arch():
    spec = register_arch(
        ArchSpec(
            model_type="toy_modulelist_moe",
            layers_path="backbone.blocks",
            moe_block_attr="ffn",
            router_attr="router",
            expert_storage="modulelist",
            proj_names=("w1", "w3", "w2"),
            moe_layers=kt_models.after_first_k_dense,
        )
    )
    yield spec
    unregister_arch("toy_modulelist_moe")


def test_modulelist_experts_are_stacked_and_released(toy_arch) -> None:
    cfg = {
        "model_type": "toy_modulelist_moe",
        "num_hidden_layers": 3,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "hidden_size": 12,
        "moe_intermediate_size": 5,
        "first_k_dense_replace": 1,
    }
    torch.manual_seed(0)
    model = _ToyModel(cfg)
    assert toy_arch.moe_layer_indices(cfg) == [1, 2]
    experts = toy_arch.experts(model, 2)
    ref = [
        [
            experts[e].w1.weight.detach().clone(),
            experts[e].w3.weight.detach().clone(),
            experts[e].w2.weight.detach().clone(),
        ]
        for e in range(4)
    ]
    weights = extract_expert_weights(model, 2)
    assert not weights.is_fused
    for e in range(4):
        assert torch.equal(weights.gate[e], ref[e][0])
        assert torch.equal(weights.up[e], ref[e][1])
        assert torch.equal(weights.down[e], ref[e][2])
    gate_up, _ = weights.fused()
    assert torch.equal(gate_up[1, :5], ref[1][0]) and torch.equal(gate_up[1, 5:], ref[1][1])
    assert all(experts[e].w2.weight.device.type == "meta" for e in range(4))
    assert toy_arch.experts(model, 1)[0].w1.weight.device.type == "cpu"
    with pytest.raises(ExpertsReleasedError):
        extract_expert_weights(model, 2)
