"""ExpertWeights: validation and the fused/split views."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kt_models import ExpertWeights


@settings(max_examples=25, deadline=None)
@given(e=st.integers(1, 4), h=st.integers(1, 6), i=st.integers(1, 6))
def test_fused_and_split_are_inverse(e: int, h: int, i: int) -> None:
    gen = torch.Generator().manual_seed(e * 100 + h * 10 + i)
    gate, up = torch.randn(e, i, h, generator=gen), torch.randn(e, i, h, generator=gen)
    down = torch.randn(e, h, i, generator=gen)
    split = ExpertWeights(gate=gate, up=up, down=down)
    gate_up, down2 = split.fused()
    assert torch.equal(gate_up, torch.cat([gate, up], 1)) and down2 is down
    fused = ExpertWeights(gate_up=gate_up, down=down)
    g, u, d = fused.split()
    assert torch.equal(g, gate) and torch.equal(u, up) and d is down
    assert (fused.num_experts, fused.hidden_size, fused.intermediate_size) == (e, h, i)
    assert fused.nbytes() == split.nbytes() == 4 * (3 * e * h * i)


def test_shapes_and_dtypes_are_validated() -> None:
    down = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="either gate_up or both"):
        ExpertWeights(down=down)
    with pytest.raises(ValueError, match="E x 2I x H"):
        ExpertWeights(gate_up=torch.zeros(2, 5, 4), down=down)
    with pytest.raises(ValueError, match="both gate and up"):
        ExpertWeights(gate=torch.zeros(2, 3, 4), down=down)
    with pytest.raises(ValueError, match="one dtype"):
        ExpertWeights(gate_up=torch.zeros(2, 6, 4, dtype=torch.bfloat16), down=down)


def test_to_converts_every_tensor() -> None:
    w = ExpertWeights(gate_up=torch.randn(2, 6, 4), down=torch.randn(2, 4, 3))
    assert w.to(torch.float32) is w
    b = w.to(torch.bfloat16)
    assert b.dtype == torch.bfloat16 and torch.equal(b.gate_up, w.gate_up.to(torch.bfloat16))
