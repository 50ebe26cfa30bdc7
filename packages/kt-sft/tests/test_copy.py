"""copy.deepcopy / pickle of a kt-wrapped model (or its PeftModel) is refused with a kt error
that says what to do, instead of a bare TypeError about the compiled engine."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from peft import LoraConfig

import kt_sft

tiny = pytest.importorskip("kt_models.tiny")


@pytest.fixture(scope="module")
def wrapped() -> torch.nn.Module:
    model = kt_sft.wrap_model(tiny.build("qwen3_moe"), kt_sft.KTConfig(lora_rank=4, num_threads=1))
    return kt_sft.get_peft_model(
        model,
        LoraConfig(r=4, target_modules=["q_proj"], **kt_sft.default_expert_lora_targets(model)),
    )


@pytest.mark.parametrize("what", ["peft", "base"])
def test_deepcopy_is_a_kt_error_saying_what_to_do(wrapped: torch.nn.Module, what: str) -> None:
    target = wrapped if what == "peft" else wrapped.get_base_model()
    with pytest.raises(kt_sft.KTCopyError, match=r"copy\.deepcopy.*disable_adapter") as info:
        copy.deepcopy(target)
    assert isinstance(info.value, TypeError)  # what deepcopy callers already catch
    assert "kt_sft.load_model" in str(info.value)


def test_pickle_is_a_kt_error(wrapped: torch.nn.Module) -> None:
    with pytest.raises(kt_sft.KTCopyError, match="pickling"):
        pickle.dumps(wrapped)
    with pytest.raises(kt_sft.KTCopyError):
        torch.save(wrapped, io.BytesIO())


def test_the_suggested_alternatives_work(wrapped: torch.nn.Module) -> None:
    snapshot = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    assert snapshot
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), wrapped.disable_adapter():
        wrapped(input_ids=ids)
