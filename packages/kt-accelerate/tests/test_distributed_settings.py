"""kt_sft.distributed outside a multi-process run: settings, validation, backend and device
choice (NCCL / gloo, without needing a GPU), no-ops."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import patch_environment

from kt_sft import distributed as ktd

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_single_process_has_no_context_and_the_helpers_are_no_ops() -> None:
    assert ktd.init_distributed() is None
    assert ktd.current_context() is None
    model = torch.nn.Linear(2, 2)
    ktd.reduce_expert_lora_grads(model)
    ktd.broadcast_expert_lora(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"placement": "everywhere"}, "placement must be one of per_node, per_rank"),
        ({"timeout": 0}, "timeout must be > 0"),
    ],
)
def test_invalid_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ktd.init_distributed(**kwargs)


def test_environment_settings_are_validated() -> None:
    with (
        patch_environment(kt_engine_placement="somewhere"),
        pytest.raises(ValueError, match="'somewhere'"),
    ):
        ktd.init_distributed()
    with (
        patch_environment(kt_dist_timeout="later"),
        pytest.raises(ValueError, match="KT_DIST_TIMEOUT must be a number of seconds"),
    ):
        ktd.init_distributed()


def test_topology() -> None:
    topo = ktd.Topology(rank=3, world_size=4, nodes=((0, 1), (2, 3)), placement="per_node")
    assert (topo.node_index, topo.leader, topo.is_leader, topo.local_rank) == (1, 2, False, 1)
    assert topo.leaders == (0, 2)
    assert topo.describe() == {
        "world_size": 4,
        "num_nodes": 2,
        "ranks_per_node": [2, 2],
        "placement": "per_node",
    }


def test_backend_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL for CUDA devices (when torch has NCCL), gloo otherwise; ``None`` asks torch."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert ktd.default_backend("cuda:1") == "nccl"
    assert ktd.default_backend(torch.device("cuda", 0)) == "nccl"
    assert ktd.default_backend("cpu") == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ktd.default_backend() == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ktd.default_backend() == "gloo"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    assert ktd.default_backend("cuda") == "gloo"


def test_collectives_run_where_the_backend_needs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradient reductions run on the CPU under gloo, on the current GPU under NCCL (also in
    accelerate's mixed "cuda:nccl,cpu:gloo" group); NCCL without a GPU is an error."""
    assert ktd.reduction_device("gloo") == torch.device("cpu")
    assert ktd.reduction_device("mpi") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert ktd.reduction_device("nccl") == torch.device("cuda", 3)
    assert ktd.reduction_device("cuda:nccl,cpu:gloo") == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ktd.KTDistributedError, match="uses 'nccl' but torch sees no CUDA"):
        ktd.reduction_device("nccl")


def test_kt_managed_parameters_are_the_expert_lora_and_the_placeholders() -> None:
    import kta_common as kc

    model = kc.build_model()
    managed = ktd.kt_managed_parameters(model)
    experts = ktd.expert_lora_parameters(model)
    placeholders = [p for p in model.parameters() if getattr(p, "kt_released", False)]
    assert len(experts) == 8 and len(placeholders) == 4
    assert [id(p) for p in managed] == [id(p) for p in experts + placeholders]
    names = {n for n, p in model.named_parameters() if any(p is m for m in managed)}
    assert all(".mlp.experts." in n for n in names)
    assert not any("q_proj" in n for n in names)
    # one process: the collective helpers change nothing
    before = [p.detach().clone() for p in experts]
    ktd.broadcast_parameters(experts)
    ktd.all_reduce_gradients(experts)
    assert all(torch.equal(a, b) for a, b in zip(before, experts))
    assert all(p.grad is None for p in experts)
