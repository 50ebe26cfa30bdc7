"""Registry entries for the MoE architectures built into transformers 5.

Each entry was checked against the installed transformers: module paths against the modeling
file, config fields against the configuration file, on-disk names against the checkpoint
conversion mapping (transformers fuses per-expert ``experts.{e}.gate_proj.weight`` keys into
``experts.gate_up_proj`` when it loads). ``packages/kt-models/tests/test_registry.py`` instantiates every entry's tiny
model and resolves every path and field on it.
"""

from __future__ import annotations

from kt_models.config_fields import NUM_EXPERTS_FIELDS
from kt_models.registry import (
    ArchSpec,
    after_first_k_dense,
    every_layer,
    register_arch,
    sparse_step,
)

__all__ = ["BUILTIN_ARCHS"]

_MOE_I = ("moe_intermediate_size",)


def _experts(first: str) -> tuple[str, ...]:
    """Every alias of E, the architecture's own field first."""
    return (first, *(f for f in NUM_EXPERTS_FIELDS if f != first))


_DENSE_I = ("intermediate_size",)

BUILTIN_ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(
        model_type="qwen2_moe",
        experts_class="Qwen2MoeExperts",
        moe_layers=sparse_step,
        shared_experts_attr="shared_expert",
        shared_expert_gate_attr="shared_expert_gate",
        num_experts_fields=_experts("num_experts"),
        intermediate_size_fields=_MOE_I,
        notes="sigmoid-gated shared expert; mlp_only_layers / decoder_sparse_step",
    ),
    ArchSpec(
        model_type="qwen3_moe",
        experts_class="Qwen3MoeExperts",
        moe_layers=sparse_step,
        num_experts_fields=_experts("num_experts"),
        intermediate_size_fields=_MOE_I,
        notes="no shared expert; mlp_only_layers / decoder_sparse_step",
    ),
    ArchSpec(
        model_type="qwen3_next",
        experts_class="Qwen3NextExperts",
        moe_layers=sparse_step,
        shared_experts_attr="shared_expert",
        shared_expert_gate_attr="shared_expert_gate",
        num_experts_fields=_experts("num_experts"),
        intermediate_size_fields=_MOE_I,
        notes="hybrid linear/full attention; SwiGLU routed experts + gated shared expert",
    ),
    ArchSpec(
        model_type="qwen3_vl_moe",
        experts_class="Qwen3VLMoeTextExperts",
        moe_layers=sparse_step,
        layers_path="model.language_model.layers",
        checkpoint_layers_prefix="model.language_model.layers",
        checkpoint_fused_transposed=True,
        num_experts_fields=_experts("num_experts"),
        intermediate_size_fields=_MOE_I,
        notes="vision-language; fields read from text_config; fused experts stored transposed",
    ),
    ArchSpec(
        model_type="deepseek_v2",
        experts_class="DeepseekV2Experts",
        moe_layers=after_first_k_dense,
        shared_experts_attr="shared_experts",
        num_experts_fields=_experts("n_routed_experts"),
        intermediate_size_fields=_MOE_I,
        notes="first_k_dense_replace dense layers; greedy or group-limited softmax top-k",
    ),
    ArchSpec(
        model_type="deepseek_v3",
        experts_class="DeepseekV3Experts",
        moe_layers=after_first_k_dense,
        shared_experts_attr="shared_experts",
        router_kind="sigmoid_group_topk",
        num_experts_fields=_experts("n_routed_experts"),
        intermediate_size_fields=_MOE_I,
        notes="first_k_dense_replace dense layers; FP8 block-scaled checkpoints",
    ),
    ArchSpec(
        model_type="mixtral",
        experts_class="MixtralExperts",
        moe_layers=every_layer,
        num_experts_fields=_experts("num_local_experts"),
        intermediate_size_fields=_DENSE_I,
        checkpoint_moe_attr="block_sparse_moe",
        checkpoint_proj_names=("w1", "w3", "w2"),
        notes="on disk: block_sparse_moe.experts.{e}.w1/w3/w2",
    ),
    ArchSpec(
        model_type="glm4_moe",
        experts_class="Glm4MoeExperts",
        moe_layers=after_first_k_dense,
        shared_experts_attr="shared_experts",
        router_kind="sigmoid_group_topk",
        num_experts_fields=_experts("n_routed_experts"),
        intermediate_size_fields=_MOE_I,
        notes="first_k_dense_replace dense layers; sigmoid router with correction bias",
    ),
    ArchSpec(
        model_type="olmoe",
        experts_class="OlmoeExperts",
        moe_layers=every_layer,
        num_experts_fields=_experts("num_experts"),
        intermediate_size_fields=_DENSE_I,
        notes="no shared expert; every layer MoE",
    ),
)


def register_builtin_archs() -> None:
    """Register :data:`BUILTIN_ARCHS` (replacing entries of the same model type)."""
    for spec in BUILTIN_ARCHS:
        register_arch(spec, overwrite=True)
