"""KTMoELayer: the fallback for ModuleList experts (remote-code style MoE blocks).

A tiny model whose MoE blocks loop over an ``nn.ModuleList`` of per-expert MLPs (as remote-code
DeepSeek/Qwen checkpoints do) is registered under a test model type; kt replaces each block by a
KTMoELayer and binds per-projection PEFT LoRA (``target_modules`` on ``experts.<e>.*_proj``) with
the split engine layout. Tolerances as in test_function.py: 1e-5 (torch backend), 2e-2 (engine).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

import kt_sft
from kt_sft.layer import KTMoELayer, parse_router_output
from kt_sft.testing import copy_lora, make_batch, named_trainable, rel_err

kt_models = pytest.importorskip("kt_models")
tiny = pytest.importorskip("kt_models.tiny")

MODEL_TYPE = "kt_test_list_moe"


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ListMoE(nn.Module):
    """Remote-code style block: linear router, softmax top-k, loop over expert modules."""

    def __init__(self, fused: nn.Module, top_k: int) -> None:
        super().__init__()
        E, inter2, hidden = fused.experts.gate_up_proj.shape
        inter = inter2 // 2
        self.top_k = top_k
        self.gate = nn.Linear(hidden, E, bias=False)
        self.experts = nn.ModuleList(MLP(hidden, inter) for _ in range(E))
        with torch.no_grad():
            self.gate.weight.copy_(fused.gate.weight)
            for e, expert in enumerate(self.experts):
                expert.gate_proj.weight.copy_(fused.experts.gate_up_proj[e, :inter])
                expert.up_proj.weight.copy_(fused.experts.gate_up_proj[e, inter:])
                expert.down_proj.weight.copy_(fused.experts.down_proj[e])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
        return out.reshape(shape)


@pytest.fixture(scope="module")
def list_model() -> Iterator[nn.Module]:
    spec = kt_models.ArchSpec(
        model_type=MODEL_TYPE,
        expert_storage="modulelist",
        moe_layers=kt_models.sparse_step,
        num_experts_fields=("num_experts",),
        intermediate_size_fields=("moe_intermediate_size",),
    )
    kt_models.register_arch(spec, overwrite=True)
    model = tiny.build("qwen3_moe")
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp = ListMoE(layer.mlp, model.config.num_experts_per_tok)
    model.config.model_type = MODEL_TYPE
    yield model
    kt_models.unregister_arch(MODEL_TYPE)


def tol(backend: str) -> float:
    return 1e-5 if backend == "torch" else 2e-2


def cfg(backend: str, **kwargs: object) -> kt_sft.KTConfig:
    return kt_sft.KTConfig(
        backend=backend,
        weight_dtype="fp32" if backend == "torch" else "bf16",
        lora_rank=4,
        lora_alpha=8.0,
        **kwargs,
    )


def stock_copy(model: nn.Module, backend: str) -> nn.Module:
    stock = copy.deepcopy(model)
    if backend == "engine":
        with torch.no_grad():
            for m in stock.modules():
                if isinstance(m, MLP):
                    for lin in (m.gate_proj, m.up_proj, m.down_proj):
                        lin.weight.copy_(lin.weight.bfloat16().float())
    return stock


def test_block_is_replaced_and_matches(list_model: nn.Module, backend: str) -> None:
    kt = kt_sft.wrap_model(copy.deepcopy(list_model), cfg(backend))
    block = kt.model.layers[1].mlp
    assert isinstance(block, KTMoELayer) and block.original_class == "ListMoE"
    assert block.experts[0].gate_proj.weight.numel() == 0
    assert set(dict(kt.named_parameters())) == set(dict(list_model.named_parameters()))
    ids = make_batch(128)["input_ids"]
    with torch.no_grad():
        got = kt(input_ids=ids).logits
        want = stock_copy(list_model, backend)(input_ids=ids).logits
    assert rel_err(got, want) < tol(backend)


def test_per_projection_lora_matches_stock(list_model: nn.Module, backend: str) -> None:
    targets = kt_sft.default_expert_lora_targets(list_model)
    assert "target_modules" in targets
    lora = {"r": 4, "lora_alpha": 8, "target_modules": targets["target_modules"][0] + "|.*q_proj"}
    stock = get_peft_model(stock_copy(list_model, backend), LoraConfig(**lora))
    kt = kt_sft.get_peft_model(
        kt_sft.wrap_model(copy.deepcopy(list_model), cfg(backend)), LoraConfig(**lora)
    )
    copy_lora(stock, kt, b_std=0.05)
    batch = make_batch(128, pad=3)
    losses = []
    for pm in (stock, kt):
        pm.train()
        loss = pm(**batch).loss
        loss.backward()
        losses.append(float(loss.detach()))
    assert abs(losses[0] - losses[1]) <= tol(backend) * losses[0]
    kt_params = dict(named_trainable(kt))
    n_expert = 0
    for name, p in named_trainable(stock):
        q = kt_params[name]
        n_expert += ".experts." in name
        if p.grad is None:  # an expert that got no token
            assert q.grad is None or float(q.grad.abs().max()) == 0.0, name
            continue
        assert rel_err(q.grad, p.grad) < tol(backend), name
    assert n_expert == 2 * 3 * 8 * 2  # layers x projections x experts x (A, B)
    bound = kt_sft.lora_parameters(kt)
    assert len(bound) == 2 * 3 * 8 * 2
    # PEFT's per-expert parameters are views into one tensor per projection and layer
    a0 = kt.base_model.model.model.layers[1].mlp.experts[0].gate_proj.lora_A["default"].weight
    a1 = kt.base_model.model.model.layers[1].mlp.experts[1].gate_proj.lora_A["default"].weight
    assert a0.untyped_storage().data_ptr() == a1.untyped_storage().data_ptr()
    # an optimizer step reaches the engine
    for pm in (stock, kt):
        torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1).step()
    with torch.no_grad():
        assert rel_err(kt(**batch).logits, stock(**batch).logits) < tol(backend)


def test_parse_router_output_conventions() -> None:
    ids = torch.tensor([[0, 1], [2, 3]])
    w = torch.rand(2, 2)
    logits = torch.rand(2, 6)
    for output in ((logits, w, ids), (ids, w, torch.tensor(0.1)), (w, ids)):
        got_ids, got_w = parse_router_output(output, 2, 2)
        assert got_ids is ids and got_w is w
    got_ids, got_w = parse_router_output(logits, 2, 2, norm_topk_prob=True)  # logits only
    assert torch.equal(got_ids, torch.topk(logits, 2).indices)
    assert torch.allclose(got_w.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="router_fn"):
        parse_router_output(logits, 2, 2, kind="sigmoid_group_topk")
    with pytest.raises(ValueError, match="router_fn"):
        parse_router_output((logits, logits), 2, 2)
