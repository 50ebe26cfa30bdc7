"""kt_sft.distributed outside a multi-process run: settings, validation, no-ops."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import patch_environment

from kt_sft import distributed as ktd


def test_single_process_has_no_context_and_the_helpers_are_no_ops() -> None:
    assert ktd.init_distributed() is None
    assert ktd.current_context() is None
    model = torch.nn.Linear(2, 2)
    ktd.reduce_expert_lora_grads(model)
    ktd.broadcast_expert_lora(model)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"placement": "everywhere"}, "placement must be one of per_node, per_rank"),
    ({"timeout": 0}, "timeout must be > 0"),
])
def test_invalid_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ktd.init_distributed(**kwargs)


def test_environment_settings_are_validated() -> None:
    with patch_environment(kt_engine_placement="somewhere"), \
            pytest.raises(ValueError, match="'somewhere'"):
        ktd.init_distributed()
    with patch_environment(kt_dist_timeout="later"), \
            pytest.raises(ValueError, match="KT_DIST_TIMEOUT must be a number of seconds"):
        ktd.init_distributed()


def test_topology() -> None:
    topo = ktd.Topology(rank=3, world_size=4, nodes=((0, 1), (2, 3)), placement="per_node")
    assert (topo.node_index, topo.leader, topo.is_leader, topo.local_rank) == (1, 2, False, 1)
    assert topo.leaders == (0, 2)
    assert topo.describe() == {"world_size": 4, "num_nodes": 2, "ranks_per_node": [2, 2],
                               "placement": "per_node"}
