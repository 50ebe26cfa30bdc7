"""Fork-started DataLoader workers that call a kt-wrapped model after the parent ran it with
several engine threads: they finish (the worker pool is rebuilt in the child) and compute what
the parent computes."""

from __future__ import annotations

import os

import pytest
import torch

import kt_sft

tiny = pytest.importorskip("kt_models.tiny")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


class _Forward(torch.utils.data.Dataset):
    def __init__(self, model: torch.nn.Module, ids: torch.Tensor) -> None:
        self.model, self.ids = model, ids

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=self.ids[i % 2 : i % 2 + 1]).logits[0]


def test_fork_started_dataloader_workers_call_the_model() -> None:
    from kt_sft.backend import engine_available

    if not engine_available():
        pytest.skip("kt-kernels engine not built")
    torch.manual_seed(0)
    model = kt_sft.wrap_model(
        tiny.build("qwen3_moe"), kt_sft.KTConfig(lora_rank=0, num_threads=2)
    ).eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits  # the parent's pool threads now exist
    loader = torch.utils.data.DataLoader(
        _Forward(model, ids),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=120,
    )
    got = list(loader)  # a hang is a timeout error here
    assert len(got) == 4
    for i, logits in enumerate(got):
        assert torch.equal(logits, want[i % 2])
    kt_sft.close(model)
