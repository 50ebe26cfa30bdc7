"""CheckpointReader on real safetensors files written in tmp_path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import kt_models
from kt_models import (
    CheckpointReader,
    ConfigFieldError,
    CorruptCheckpointError,
    MissingScaleError,
    MissingShardError,
    MissingTensorError,
    TensorShapeError,
    dequantize_fp8_blockwise,
    extract_expert_weights,
    get_arch_spec,
    tiny,
)

# ---- helpers: checkpoints written directly with safetensors, independent of kt_models ----------

H, INTER, E = 40, 24, 4  # not multiples of the 16x16 FP8 blocks used below: partial blocks


def _config(layers: int = 3, **extra) -> dict:
    cfg = {
        "model_type": "deepseek_v3",
        "hidden_size": H,
        "moe_intermediate_size": INTER,
        "n_routed_experts": E,
        "num_experts_per_tok": 2,
        "num_hidden_layers": layers,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 32,
    }
    cfg.update(extra)
    return cfg


def _reference(layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-expert on-disk tensors (float32) of every MoE layer, DeepSeek names."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(1, layers):
        for e in range(E):
            for proj, shape in (
                ("gate_proj", (INTER, H)),
                ("up_proj", (INTER, H)),
                ("down_proj", (H, INTER)),
            ):
                out[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = torch.randn(
                    shape, generator=gen
                )
    out["model.embed_tokens.weight"] = torch.randn(32, H, generator=gen)
    return out


def _quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent block FP8 quantizer (per-element scale map, no loops over blocks)."""
    rows, cols = w.shape
    nr, nc = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(nr * block, nc * block)
    padded[:rows, :cols] = w.abs()
    amax = padded.reshape(nr, block, nc, block).amax(dim=(1, 3))
    scale = (amax / 448.0).clamp_min(1e-12)
    full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale


def _dequant_reference(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = q.shape
    r = torch.arange(rows)[:, None] // block
    c = torch.arange(cols)[None, :] // block
    return q.to(torch.float32) * scale[r, c]


def _write(
    directory: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 1
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    keys = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, str(directory / name))
        weight_map.update(dict.fromkeys(part, name))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return directory


def _expect_layer(
    ref: dict[str, torch.Tensor], layer: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    def k(e: int, p: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"

    gate_up = torch.stack(
        [torch.cat([ref[k(e, "gate_proj")], ref[k(e, "up_proj")]]) for e in range(E)]
    ).to(dtype)
    down = torch.stack([ref[k(e, "down_proj")] for e in range(E)]).to(dtype)
    return gate_up, down


# ---- happy paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32])
def test_per_expert_checkpoint_reads_exactly(tmp_path, shards, stored) -> None:
    ref = {k: v.to(stored) for k, v in _reference(3).items()}
    ckpt = _write(tmp_path / "ckpt", ref, _config(), shards=shards)
    reader = CheckpointReader(ckpt)
    assert reader.moe_layer_indices == [1, 2]
    assert len(reader.files) == shards
    for layer in (1, 2):
        assert reader.layout(layer) == "per_expert"
        for dtype in (torch.float32, torch.bfloat16):
            weights = reader.layer_experts(layer, dtype=dtype)
            gate_up, down = _expect_layer({k: v.float() for k, v in ref.items()}, layer, dtype)
            assert weights.dtype == dtype
            assert torch.equal(weights.gate_up, gate_up) and torch.equal(weights.down, down)
        assert reader.layer_experts(layer, dtype=None).dtype == stored
    assert reader.non_expert_keys() == ["model.embed_tokens.weight"]
    assert torch.equal(
        reader.get_tensor("model.embed_tokens.weight"), ref["model.embed_tokens.weight"]
    )


def test_single_file_path_with_explicit_config(tmp_path) -> None:
    ref = _reference(2)
    ckpt = _write(tmp_path / "one", ref, _config(layers=2))
    reader = CheckpointReader(ckpt / "model.safetensors", config=_config(layers=2))
    gate_up, down = _expect_layer(ref, 1, torch.float32)
    weights = reader.layer_experts(1, dtype=torch.float32)
    assert torch.equal(weights.gate_up, gate_up) and torch.equal(weights.down, down)


@pytest.mark.parametrize("shards", [1, 2])
def test_fp8_block_scaled_experts_are_dequantized_block_wise(tmp_path, shards) -> None:
    block = 16
    ref = _reference(3, seed=7)
    tensors, dequant = {}, {}
    for key, value in ref.items():
        if ".experts." in key:
            q, s = _quantize(value, block)
            tensors[key], tensors[key + "_scale_inv"] = q, s
            dequant[key] = _dequant_reference(q, s, block)
        else:
            tensors[key] = value
    config = _config(
        quantization_config={
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": [block, block],
        }
    )
    reader = CheckpointReader(_write(tmp_path / "fp8", tensors, config, shards=shards))
    assert reader.block_size == (block, block)
    for layer in (1, 2):
        weights = reader.layer_experts(layer, dtype=torch.float32)
        gate_up, down = _expect_layer(dequant, layer, torch.float32)
        assert torch.equal(weights.gate_up, gate_up) and torch.equal(weights.down, down)
        # and FP8 e4m3 is within its 3-bit mantissa of the original weights
        orig_gu, _ = _expect_layer(ref, layer, torch.float32)
        assert ((weights.gate_up - orig_gu).abs() <= orig_gu.abs() / 16 + 1e-3).all()
        bf16 = reader.layer_experts(layer)
        assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.gate_up, gate_up.bfloat16())


def test_dequantize_fp8_blockwise_matches_an_elementwise_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(300, 200, generator=gen) * 3
    q, s = _quantize(w, 128)
    got = dequantize_fp8_blockwise(q, s, (128, 128), torch.float32)
    assert torch.equal(got, _dequant_reference(q, s, 128))
    with pytest.raises(ValueError, match="expected"):
        dequantize_fp8_blockwise(q, s[:1], (128, 128))


@pytest.mark.parametrize("model_type", kt_models.supported_model_types())
def test_save_pretrained_checkpoints_read_back_exactly(tiny_models, saved_tiny, model_type) -> None:
    model = tiny_models[model_type]
    reader = CheckpointReader(saved_tiny[model_type])
    spec = get_arch_spec(model)
    for layer in spec.moe_layer_indices(model.config):
        ref = extract_expert_weights(model, layer, release=False)
        got = reader.layer_experts(layer, dtype=torch.float32)
        assert torch.equal(got.gate_up, ref.gate_up) and torch.equal(got.down, ref.down)
        assert torch.equal(reader.layer_experts(layer).gate_up, ref.gate_up.bfloat16())


def test_sharded_save_pretrained(tiny_models, tmp_path) -> None:
    model = tiny_models["qwen2_moe"]
    directory = tiny.save(model, tmp_path / "sharded", shard_size="60KB")
    reader = CheckpointReader(directory)
    assert reader.index_path is not None and len(reader.files) > 3
    for layer in reader.moe_layer_indices:
        ref = extract_expert_weights(model, layer, release=False)
        got = reader.layer_experts(layer, dtype=torch.float32)
        assert torch.equal(got.gate_up, ref.gate_up) and torch.equal(got.down, ref.down)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_vl_moe", "mixtral"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_written_layouts_read_back_exactly(tiny_models, tmp_path, model_type, layout) -> None:
    model = tiny_models[model_type]
    directory = tiny.write_checkpoint(model, tmp_path / layout, layout=layout, shard_size=40_000)
    reader = CheckpointReader(directory)
    spec = get_arch_spec(model)
    for layer in spec.moe_layer_indices(model.config):
        assert reader.layout(layer) == layout
        ref = extract_expert_weights(model, layer, release=False)
        got = reader.layer_experts(layer, dtype=torch.float32)
        assert torch.equal(got.gate_up, ref.gate_up) and torch.equal(got.down, ref.down)
        if layout == "fused":
            key = spec.checkpoint_fused_key(layer, "down")
            stored = reader.get_tensor(key)
            assert torch.equal(reader.get_slice(key, 3), stored[3])
    if model_type == "qwen3_vl_moe" and layout == "fused":
        # hub layout: E x H x 2I on disk
        key = spec.checkpoint_fused_key(0, "gate_up")
        assert reader.tensor_info(key).shape == (8, 64, 96)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_fp8_tiny_checkpoint(tiny_models, tmp_path, layout) -> None:
    model = tiny_models["deepseek_v3"]
    directory = tiny.write_checkpoint(
        model, tmp_path / layout, layout=layout, fp8=True, block_size=(16, 16)
    )
    reader = CheckpointReader(directory)
    for layer in reader.moe_layer_indices:
        ref = extract_expert_weights(model, layer, release=False)
        got = reader.layer_experts(layer, dtype=torch.float32)
        err = (got.gate_up - ref.gate_up).abs()
        assert (err <= ref.gate_up.abs() / 16 + 1e-4).all() and err.max() > 0
        key = (
            reader.spec.checkpoint_expert_key(layer, 2, "down")
            if layout == "per_expert"
            else reader.spec.checkpoint_fused_key(layer, "down")
        )
        q = reader.get_tensor(key, dtype=torch.float32)
        expect = got.down[2] if layout == "per_expert" else got.down
        assert torch.equal(q, expect)
        if layout == "fused":  # one expert alone, dequantized with its own block scales
            assert torch.equal(reader.get_slice(key, 5, dtype=torch.float32), got.down[5])
            assert reader.get_slice(key, 5).dtype == torch.bfloat16


# ---- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path) -> Path:
    return _write(tmp_path / "ck", _reference(3), _config(), shards=3)


def test_missing_shard_names_file_and_key(sharded) -> None:
    victim = sharded / "model-00002-of-00003.safetensors"
    victim.unlink()
    with pytest.raises(MissingShardError) as info:
        CheckpointReader(sharded)
    assert info.value.path == victim and info.value.key
    assert "model-00002-of-00003.safetensors" in str(info.value)


def test_index_naming_a_missing_key(sharded) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.1.mlp.experts.9.gate_proj.weight"] = (
        "model-00001-of-00003.safetensors"
    )
    index_path.write_text(json.dumps(index))
    with pytest.raises(MissingTensorError) as info:
        CheckpointReader(sharded)
    assert info.value.key == "model.layers.1.mlp.experts.9.gate_proj.weight"
    assert info.value.path.name == "model-00001-of-00003.safetensors"


@pytest.mark.parametrize("how", ["parent", "absolute", "nested_parent"])
def test_shard_names_stay_inside_the_model_directory(sharded, how: str) -> None:
    """An index naming a shard outside the model directory is refused, even when that file
    exists and is a valid shard (it is never opened)."""
    outside = sharded.parent / "outside"
    outside.mkdir()
    victim = "model-00002-of-00003.safetensors"
    (outside / victim).write_bytes((sharded / victim).read_bytes())
    name = {
        "parent": f"../outside/{victim}",
        "absolute": str(outside / victim),
        "nested_parent": f"sub/../../outside/{victim}",
    }[how]
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: (name if v == victim else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="outside the model directory") as info:
        CheckpointReader(sharded)
    assert info.value.path == index_path and info.value.key


def test_shards_in_a_subfolder_and_symlinked_shards_are_fine(sharded, tmp_path) -> None:
    """Relative names without '..' work, including symlinks to blobs elsewhere (the layout of a
    Hugging Face cache snapshot)."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (sharded / "sub").mkdir()
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"
    (sharded / first).rename(blobs / "blob1")
    (sharded / first).symlink_to(blobs / "blob1")
    (sharded / second).rename(sharded / "sub" / second)
    index["weight_map"] = {
        k: (f"sub/{second}" if v == second else v) for k, v in index["weight_map"].items()
    }
    index_path.write_text(json.dumps(index))
    reader = CheckpointReader(sharded)
    assert len(reader.keys()) == len(index["weight_map"])


def test_layer_without_expert_keys(tmp_path) -> None:
    ref = _reference(3)
    ref = {k: v for k, v in ref.items() if ".layers.2." not in k}
    reader = CheckpointReader(_write(tmp_path / "ck", ref, _config()))
    reader.layer_experts(1)
    with pytest.raises(MissingTensorError, match=r"layers\.2\.mlp\.experts\.0\.gate_proj"):
        reader.layer_experts(2)


def test_one_missing_expert_fails_before_any_read(tmp_path) -> None:
    ref = _reference(3)
    del ref["model.layers.1.mlp.experts.3.down_proj.weight"]
    reader = CheckpointReader(_write(tmp_path / "ck", ref, _config()))
    with pytest.raises(MissingTensorError, match=r"experts\.3\.down_proj"):
        reader.layer_experts(1)


def test_wrong_shape_names_file_key_and_shapes(tmp_path) -> None:
    ref = _reference(3)
    ref["model.layers.2.mlp.experts.1.up_proj.weight"] = torch.zeros(INTER, H + 1)
    reader = CheckpointReader(_write(tmp_path / "ck", ref, _config()))
    with pytest.raises(TensorShapeError) as info:
        reader.layer_experts(2)
    assert info.value.key == "model.layers.2.mlp.experts.1.up_proj.weight"
    assert f"({INTER}, {H + 1})" in str(info.value) and f"({INTER}, {H})" in str(info.value)
    assert info.value.path.name == "model.safetensors"


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_file_names_the_file(sharded, cut) -> None:
    victim = sharded / "model-00003-of-00003.safetensors"
    raw = victim.read_bytes()
    victim.write_bytes(raw[:-100] if cut == "data" else raw[:50])
    with pytest.raises(CorruptCheckpointError) as info:
        CheckpointReader(sharded)
    assert info.value.path == victim


def test_garbage_file_and_garbage_index(tmp_path, sharded) -> None:
    (sharded / "model-00001-of-00003.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    )
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        CheckpointReader(sharded)
    (sharded / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CorruptCheckpointError, match="index"):
        CheckpointReader(sharded)


def test_fp8_without_scales(tmp_path) -> None:
    ref = _reference(3)
    tensors = {k: (v.to(torch.float8_e4m3fn) if ".experts." in k else v) for k, v in ref.items()}
    reader = CheckpointReader(_write(tmp_path / "ck", tensors, _config()))
    with pytest.raises(MissingScaleError) as info:
        reader.layer_experts(1)
    assert info.value.key == "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert "weight_scale_inv" in str(info.value)


def test_fp8_scales_of_the_wrong_shape(tmp_path) -> None:
    ref = _reference(2)
    tensors = dict(ref)
    for key in [k for k in ref if ".experts." in k]:
        q, _ = _quantize(ref[key], 128)
        tensors[key], tensors[key + "_scale_inv"] = q, torch.ones(2, 2)
    reader = CheckpointReader(_write(tmp_path / "ck", tensors, _config(layers=2)))
    with pytest.raises(TensorShapeError, match="block scales"):
        reader.layer_experts(1)


def test_config_missing_expert_fields(tmp_path) -> None:
    config = _config()
    del config["n_routed_experts"]
    ckpt = _write(tmp_path / "ck", _reference(3), config)
    with pytest.raises(ConfigFieldError) as info:
        CheckpointReader(ckpt)
    message = str(info.value)
    assert "config.json" in message and "n_routed_experts" in message
    assert "num_local_experts" in message


def test_missing_config_and_missing_checkpoint(tmp_path) -> None:
    ckpt = _write(tmp_path / "ck", _reference(2), _config(layers=2))
    (ckpt / "config.json").unlink()
    with pytest.raises(MissingShardError, match=r"config\.json"):
        CheckpointReader(ckpt)
    with pytest.raises(MissingShardError, match="does not exist"):
        CheckpointReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingShardError, match="neither"):
        CheckpointReader(tmp_path / "empty")


def test_dense_layer_is_refused(sharded) -> None:
    reader = CheckpointReader(sharded)
    with pytest.raises(ValueError, match="layer 0 has no routed experts"):
        reader.layer_experts(0)


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_failed_read_leaves_nothing_mapped_and_the_reader_usable(sharded) -> None:
    reader = CheckpointReader(sharded)
    victim = sharded / "model-00002-of-00003.safetensors"
    saved = victim.read_bytes()
    victim.unlink()
    with pytest.raises(MissingShardError) as info:
        reader.layer_experts(1)
    assert info.value.path == victim
    assert not any(_mapped(f) for f in reader.files)
    victim.write_bytes(saved)
    weights = reader.layer_experts(1, dtype=torch.float32)
    gate_up, _ = _expect_layer(_reference(3), 1, torch.float32)
    assert torch.equal(weights.gate_up, gate_up)
    assert not any(_mapped(f) for f in reader.files)
