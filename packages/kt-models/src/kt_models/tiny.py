"""Tiny random-weight reference models of every registered architecture, and their checkpoints.

:func:`build` gives a seeded FP32 model small enough for unit tests (2-4 decoder layers, hidden
size 64, 8 experts, top-2, with shared experts and dense leading layers where the architecture
has them). :func:`save` writes it the way transformers does (``save_pretrained``: per-expert keys
on disk); :func:`write_checkpoint` writes chosen on-disk layouts directly with safetensors
(per-expert or fused expert keys, optional DeepSeek-style FP8 experts with block scales).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from kt_models.auto_class import auto_model_class
from kt_models.registry import ArchSpec, get_arch_spec

__all__ = [
    "FP8_E4M3_MAX",
    "GENERIC_SIZES",
    "SECOND_LAYER_CHOICES",
    "TINY_CONFIGS",
    "build",
    "build_any",
    "generic_tiny_config",
    "quantize_fp8_blockwise",
    "save",
    "tiny_config",
    "write_checkpoint",
]

FP8_E4M3_MAX = 448.0

_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

#: Config keyword arguments of each architecture's tiny model (``_COMMON`` comes first).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2_moe": {
        "num_hidden_layers": 3,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "num_hidden_layers": 4,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
    "qwen3_next": {
        "num_hidden_layers": 2,
        "layer_types": ["linear_attention", "full_attention"],
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "norm_topk_prob": True,
    },
    "qwen3_vl_moe": {
        "text_config": {
            "num_hidden_layers": 2,
            "intermediate_size": 96,
            "moe_intermediate_size": 48,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 2, 2],
            },
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
    },
    "deepseek_v2": {
        "num_hidden_layers": 3,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "num_key_value_heads": 4,
        "head_dim": 8,
    },
    "deepseek_v3": {
        "num_hidden_layers": 3,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "num_key_value_heads": 4,
        "head_dim": 8,
    },
    "mixtral": {
        "num_hidden_layers": 2,
        "intermediate_size": 32,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "glm4_moe": {
        "num_hidden_layers": 3,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "partial_rotary_factor": 0.5,
    },
    "olmoe": {
        "num_hidden_layers": 2,
        "intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
    },
}


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The transformers config of the tiny ``model_type`` model (``overrides`` merged in;
    nested dicts such as ``text_config`` are merged key by key)."""
    from transformers import AutoConfig

    get_arch_spec(model_type)  # refuses unsupported / unregistered types with the usual error
    if model_type not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for {model_type!r}; known: {sorted(TINY_CONFIGS)}")
    base = TINY_CONFIGS[model_type]
    if "text_config" in base:
        kwargs = _merge(base, {"text_config": _merge(_COMMON, base["text_config"])})
    else:
        kwargs = _merge(_COMMON, base)
    kwargs = _merge(kwargs, overrides)
    return AutoConfig.for_model(model_type, **kwargs)


#: Fields :func:`generic_tiny_config` sets wherever a model type's default config has them.
GENERIC_SIZES: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "expert_intermediate_size": 32,
    "moe_ffn_hidden_size": 32,
    "ffn_hidden_size": 96,
    "n_routed_experts": 8,
    "num_experts": 8,
    "num_local_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k": 2,
    "n_group": 1,
    "num_expert_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "qk_head_dim": 16,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "first_k_dense_replace": 1,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "sliding_window": 16,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
}
_GENERIC_LAYERS = 2
_LAYER_COUNT_FIELDS = ("num_hidden_layers", "num_layers", "n_layer")


def _shrink(raw: dict[str, Any], second_layer: str = "last") -> dict[str, Any]:
    """``raw`` (a config dict) with :data:`GENERIC_SIZES` applied and per-layer lists / dicts cut
    to the first and last of the original layers (so hybrid models keep both layer kinds)."""
    num_layers = next((raw[k] for k in _LAYER_COUNT_FIELDS if isinstance(raw.get(k), int)), 0)
    per_layer = [
        v for v in raw.values() if isinstance(v, list) and num_layers > 1 and len(v) == num_layers
    ]
    # The second layer kept: the last one, or ("varied") the first of those differing from
    # layer 0 in the most per-layer lists (hybrid models keep both kinds of layer).
    differing = [sum(v[i] != v[0] for v in per_layer) for i in range(num_layers)]
    second = num_layers - 1
    if second_layer == "varied" and num_layers > 1 and max(differing) > 0:
        second = differing.index(max(differing))
    keep = {0: 0, second: 1} if num_layers > 1 else {0: 0}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in GENERIC_SIZES:
            value = copy.deepcopy(GENERIC_SIZES[key])
        elif isinstance(value, list) and num_layers > 1 and len(value) == num_layers:
            value = [value[0], value[second]]
        elif key.endswith("_layer_period") and isinstance(value, int) and value > 1:
            value = 2  # e.g. attention / experts every other layer, offset 1
        elif key.endswith("_layer_offset") and isinstance(value, int) and value > 0:
            value = 1
        elif (
            isinstance(value, dict)
            and num_layers > 1
            and value
            and all(str(k).isdigit() for k in value)
        ):
            value = {keep[int(k)]: v for k, v in value.items() if int(k) in keep}
        elif (
            key.endswith("_layers")
            and isinstance(value, list)
            and num_layers > 1
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            value = [keep[v] for v in value if v in keep]
        out[key] = value
    for key in _LAYER_COUNT_FIELDS:
        if key in raw:
            out[key] = _GENERIC_LAYERS
    if "qk_rope_head_dim" in raw and "head_dim" in raw:
        out["head_dim"] = out["qk_rope_head_dim"]  # multi-head latent attention: rope dims
    return out


#: The choices of :func:`generic_tiny_config`'s ``second_layer``, in the order tried.
SECOND_LAYER_CHOICES: tuple[str, ...] = ("last", "varied")


def generic_tiny_config(model_type: str, *, second_layer: str = "last") -> Any:
    """A small config of any model type, derived from its default config alone.

    The default config's sizes are replaced by :data:`GENERIC_SIZES` (hidden size 64, 8 experts,
    top-2 ...), 2 decoder layers are kept (per-layer lists cut to the first layer and, with
    ``second_layer="last"``, the last one, or with ``"varied"`` the first layer that differs
    most from the first: hybrid models whose last layer is of the first one's kind), and
    a nested ``text_config`` is shrunk the same way. Types whose configs need more than that
    fail here or when the model is built (the generated tests skip them with the reason).
    Registered types with a hand-tuned :data:`TINY_CONFIGS` entry use that one instead.
    """
    from transformers import AutoConfig

    if model_type in TINY_CONFIGS:
        return tiny_config(model_type)
    raw = AutoConfig.for_model(model_type).to_dict()
    for key in ("architectures", "transformers_version", "model_type", "_name_or_path", "dtype"):
        raw.pop(key, None)
    if second_layer not in SECOND_LAYER_CHOICES:
        raise ValueError(
            f"second_layer must be one of {SECOND_LAYER_CHOICES}, got {second_layer!r}"
        )
    raw = _shrink(raw, second_layer)
    if isinstance(raw.get("text_config"), dict):
        raw["text_config"] = _shrink(raw["text_config"], second_layer)
    return AutoConfig.for_model(model_type, **raw)


def build_any(model_type: str, *, seed: int = 0, second_layer: str = "last") -> Any:
    """:func:`build` for any model type: :func:`generic_tiny_config`, seeded FP32 weights."""
    config = generic_tiny_config(model_type, second_layer=second_layer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_model_class(config).from_config(config, dtype=torch.float32)
    return model.eval()


def build(model_type: str, *, seed: int = 0, **overrides: Any) -> Any:
    """A small random FP32 model of ``model_type`` (a transformers ``PreTrainedModel``).

    Weights are initialised by transformers' own ``_init_weights`` under ``torch.manual_seed(
    seed)``, inside a forked RNG so the caller's random state is untouched: the same arguments
    give the same weights. ``overrides`` change config fields (see :data:`TINY_CONFIGS`). The
    model is returned in eval mode, as ``from_pretrained`` returns it.
    """
    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_model_class(config).from_config(config, dtype=torch.float32)
    return model.eval()


def save(
    model: Any, directory: str | os.PathLike[str], *, shard_size: int | str | None = None
) -> Path:
    """``model.save_pretrained(directory)`` as safetensors, sharded when ``shard_size`` (bytes or
    a string such as ``"200KB"``) is given. transformers writes routed experts per expert
    (``...experts.{e}.gate_proj.weight``), as real checkpoints have them. Returns the directory.
    """
    directory = Path(directory)
    kwargs: dict[str, Any] = {}
    if shard_size is not None:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(str(directory), **kwargs)
    return directory


def quantize_fp8_blockwise(
    weight: torch.Tensor, block_size: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8_e4m3 weight, float32 scale_inv)`` with one scale per ``b0 x b1`` block, such that
    ``weight ~= fp8.float() * scale_inv[i // b0, j // b1]`` (DeepSeek-V3's checkpoint format)."""
    rows, cols = weight.shape
    b0, b1 = block_size
    nr, nc = math.ceil(rows / b0), math.ceil(cols / b1)
    w = weight.detach().to(torch.float32)
    scale = torch.empty((nr, nc), dtype=torch.float32)
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            block = w[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
            amax = float(block.abs().max())
            s = amax / FP8_E4M3_MAX if amax > 0 else 1.0
            scale[i, j] = s
            q[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (block / s).to(torch.float8_e4m3fn)
    return q, scale


def _expert_tensors(
    model: Any,
    spec: ArchSpec,
    layout: str,
    fp8: bool,
    block_size: tuple[int, int],
    dtype: torch.dtype | None,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """On-disk expert tensors and the in-memory state-dict keys they replace."""
    from kt_models.extract import extract_expert_weights

    out: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    base_prefix = _state_dict_prefix(model, spec)
    for layer in spec.moe_layer_indices(model.config):
        weights = extract_expert_weights(model, layer, release=False, spec=spec)
        if dtype is not None:
            weights = weights.to(dtype)
        experts_path = f"{base_prefix}{layer}.{spec.moe_block_attr}.{spec.experts_attr}"
        replaced.update({f"{experts_path}.gate_up_proj", f"{experts_path}.down_proj"})
        gate, up, down = weights.split()
        if layout == "per_expert":
            for e in range(weights.num_experts):
                for proj, tensor in (("gate", gate[e]), ("up", up[e]), ("down", down[e])):
                    key = spec.checkpoint_expert_key(layer, e, proj)
                    _put(out, key, tensor, fp8, block_size)
        else:
            gate_up = torch.cat([gate, up], dim=1)
            tensors = {"gate_up": gate_up, "down": down}
            for which, tensor in tensors.items():
                key = spec.checkpoint_fused_key(layer, which)  # type: ignore[arg-type]
                if fp8:
                    qs = [quantize_fp8_blockwise(t, block_size) for t in tensor]
                    q = torch.stack([a for a, _ in qs])
                    s = torch.stack([b for _, b in qs])
                    if spec.checkpoint_fused_transposed:
                        raise ValueError("FP8 fused transposed experts are not written")
                    out[key], out[key + "_scale_inv"] = q, s
                else:
                    t = tensor.transpose(1, 2) if spec.checkpoint_fused_transposed else tensor
                    out[key] = t.contiguous()
    return out, replaced


def _put(
    out: dict[str, torch.Tensor],
    key: str,
    tensor: torch.Tensor,
    fp8: bool,
    block_size: tuple[int, int],
) -> None:
    if fp8:
        q, s = quantize_fp8_blockwise(tensor, block_size)
        out[key], out[key + "_scale_inv"] = q, s
    else:
        out[key] = tensor.detach().contiguous().clone()


def _state_dict_prefix(model: Any, spec: ArchSpec) -> str:
    return spec.layers_path + "."


def _write_safetensors(
    tensors: dict[str, torch.Tensor], directory: Path, shard_size: int | None
) -> None:
    if shard_size is None:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(
    model: Any,
    directory: str | os.PathLike[str],
    *,
    layout: Literal["per_expert", "fused"] = "per_expert",
    fp8: bool = False,
    block_size: tuple[int, int] = (128, 128),
    shard_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as a checkpoint directory with a chosen on-disk expert layout.

    Routed experts are written per expert (``...experts.{e}.gate_proj.weight``, the architecture's
    on-disk names) or fused (``...experts.gate_up_proj``/``down_proj``); with ``fp8=True`` they
    are block-quantized to float8_e4m3 with ``weight_scale_inv`` scales and ``config.json`` gets
    a DeepSeek-style ``quantization_config``. Other tensors keep their state-dict names. The
    model's own state is not changed. ``shard_size`` (bytes) splits the tensors into shards
    with a ``model.safetensors.index.json``. Returns the directory.
    """
    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', got {layout!r}")
    spec = get_arch_spec(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    experts, replaced = _expert_tensors(model, spec, layout, fp8, block_size, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key in replaced:
            continue
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous().clone()
    tensors.update(experts)
    _write_safetensors(tensors, directory, shard_size)
    config = model.config.to_dict()
    if fp8:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block_size),
        }
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory
