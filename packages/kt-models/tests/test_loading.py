"""Loading non-expert weights with transformers while the routed experts stay on meta."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
from transformers.monkey_patching import get_patch_mapping

import kt_models
from kt_models import (
    CheckpointReader,
    UnsupportedArchitectureError,
    experts_on_meta,
    from_pretrained_kwargs,
    get_arch_spec,
    load_model,
    tiny,
)


@pytest.mark.parametrize("model_type", kt_models.supported_model_types())
def test_load_model_skips_experts_and_loads_the_rest(tiny_models, saved_tiny, model_type) -> None:
    ref = tiny_models[model_type]
    model, info = load_model(saved_tiny[model_type], output_loading_info=True)
    spec = get_arch_spec(model)
    ref_sd = ref.state_dict()
    meta = set()
    for key, value in model.state_dict().items():
        if value.device.type == "meta":
            meta.add(key)
        else:
            assert torch.equal(value, ref_sd[key]), key
    moe = spec.moe_layer_indices(model.config)
    expected_meta = {
        f"{spec.layers_path}.{i}.{spec.moe_block_attr}.{spec.experts_attr}.{n}"
        for i in moe
        for n in ("gate_up_proj", "down_proj")
    }
    assert meta == expected_meta
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for i in moe:
        experts = spec.experts(model, i)
        assert type(experts) is type(
            ref.get_submodule(f"{spec.layers_path}.{i}.{spec.moe_block_attr}.{spec.experts_attr}")
        )
        assert kt_models.experts_released(model, i)
    assert not get_patch_mapping()


def test_experts_are_never_read(tiny_models, saved_tiny, tmp_path) -> None:
    """A checkpoint with no expert tensors at all loads the same way; plain transformers would
    have to invent (allocate and randomly initialise) them."""
    src = saved_tiny["qwen2_moe"] / "model.safetensors"
    with safe_open(str(src), "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if ".mlp.experts." not in k}
    out = tmp_path / "no_experts"
    out.mkdir()
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((saved_tiny["qwen2_moe"] / "config.json").read_text())
    model, info = load_model(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert kt_models.experts_released(model, 1) and kt_models.experts_released(model, 2)
    plain, plain_info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert "model.layers.1.mlp.experts.gate_up_proj" in plain_info["missing_keys"]
    assert plain.model.layers[1].mlp.experts.gate_up_proj.device.type == "cpu"


def test_rebinding_experts_from_the_reader_reproduces_the_model(tiny_models, saved_tiny) -> None:
    ref = tiny_models["deepseek_v3"]
    model = load_model(saved_tiny["deepseek_v3"])
    spec = get_arch_spec(model)
    reader = CheckpointReader(saved_tiny["deepseek_v3"])
    for layer, weights in reader.iter_layer_experts(dtype=torch.float32):
        experts = spec.experts(model, layer)
        experts.gate_up_proj = torch.nn.Parameter(weights.gate_up, requires_grad=False)
        experts.down_proj = torch.nn.Parameter(weights.down, requires_grad=False)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_experts_on_meta_is_scoped(tiny_models) -> None:
    config = tiny.tiny_config("olmoe")
    with pytest.raises(RuntimeError, match="boom"), experts_on_meta(config) as created:
        model = AutoModelForCausalLM.from_config(config)
        assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
        assert "OlmoeExperts" in get_patch_mapping()
        raise RuntimeError("boom")
    assert not get_patch_mapping()
    assert len(created) == 2 and all(type(m).__name__ == "OlmoeExperts" for m in created)
    fresh = AutoModelForCausalLM.from_config(config)
    assert fresh.model.layers[0].mlp.experts.gate_up_proj.device.type == "cpu"


def test_from_pretrained_kwargs(saved_tiny, tiny_models, tmp_path) -> None:
    kwargs = from_pretrained_kwargs(saved_tiny["mixtral"])
    assert kwargs["device_map"] == {"": "cpu"} and kwargs["dtype"] == "auto"
    assert kwargs["config"].model_type == "mixtral"
    assert "quantization_config" not in kwargs
    with experts_on_meta(kwargs["config"]):
        model = AutoModelForCausalLM.from_pretrained(saved_tiny["mixtral"], **kwargs)
    assert kt_models.experts_released(model, 0)
    assert not hasattr(model, "hf_device_map") or set(model.hf_device_map.values()) == {"cpu"}

    fp8 = tiny.write_checkpoint(tiny_models["deepseek_v3"], tmp_path / "fp8", fp8=True)
    kwargs = from_pretrained_kwargs(fp8, dtype=torch.bfloat16)
    qcfg = kwargs["quantization_config"]
    assert isinstance(qcfg, FineGrainedFP8Config) and qcfg.dequantize
    assert kwargs["dtype"] is torch.bfloat16


def test_fp8_checkpoint_loads_without_its_experts(tiny_models, tmp_path) -> None:
    ref = tiny_models["deepseek_v3"]
    fp8 = tiny.write_checkpoint(ref, tmp_path / "fp8", fp8=True, block_size=(16, 16))
    model = load_model(fp8, dtype=torch.float32)
    assert kt_models.experts_released(model, 1)
    torch.testing.assert_close(
        model.model.layers[0].self_attn.o_proj.weight, ref.model.layers[0].self_attn.o_proj.weight
    )


def test_unsupported_architecture_fails_before_loading(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedArchitectureError):
        from_pretrained_kwargs(tmp_path)


def test_expert_count_mismatch_shows_the_load_report(tmp_path, capsys) -> None:
    """A config whose expert count differs from the checkpoint's: the error carries
    transformers' load report (which kt silences) naming the mismatching tensors."""
    from kt_models import TensorShapeError, tiny

    out = tmp_path / "m"
    tiny.build("qwen3_moe").save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    experts = cfg["num_local_experts"]
    cfg["num_local_experts"] = experts - 2
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TensorShapeError, match="number of experts") as info:
        kt_models.load_model(out)
    text = str(info.value)
    assert "LOAD REPORT" in text and "mlp.gate.weight" in text and "MISMATCH" in text
    assert f"torch.Size([{experts}, 64])" in text and "\x1b[" not in text
    assert "LOAD REPORT" not in capsys.readouterr().err  # reported once, in the error
