"""The PEFT API on a kt-wrapped model behaves as on a stock one: save / load, disable_adapter
(bit-exact base outputs), several adapters (add / set / delete), unload, generate and
inputs_embeds. The kt engine computes every output here, so equal means bit-equal."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel

import kt_sft

tiny = pytest.importorskip("kt_models.tiny")


def _cfg() -> kt_sft.KTConfig:
    return kt_sft.KTConfig(lora_rank=8, lora_alpha=16.0, num_threads=1)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny.build("qwen3_moe")


def _wrapped(base: torch.nn.Module) -> torch.nn.Module:
    return kt_sft.wrap_model(copy.deepcopy(base), _cfg()).eval()


def _lora(model: torch.nn.Module, r: int = 4, seed: int = 1) -> LoraConfig:
    torch.manual_seed(seed)
    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        init_lora_weights=False,
        target_modules=["q_proj", "v_proj"],
        **kt_sft.default_expert_lora_targets(model),
    )


def _ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(7))


def _logits(model: torch.nn.Module, **kw: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw).logits


def test_peft_api(base: torch.nn.Module, tmp_path: Path) -> None:
    ids = _ids()
    plain = _wrapped(base)
    want_base = _logits(plain, input_ids=ids)

    pm = kt_sft.get_peft_model(_wrapped(base), _lora(base, seed=1)).eval()
    first = _logits(pm, input_ids=ids)
    assert not torch.equal(first, want_base)  # the adapter changes the outputs

    # disable_adapter: exactly the base model's outputs
    with pm.disable_adapter():
        assert torch.equal(_logits(pm, input_ids=ids), want_base)
    assert torch.equal(_logits(pm, input_ids=ids), first)

    # inputs_embeds gives what input_ids gives
    embeds = pm.get_input_embeddings()(ids)
    assert torch.equal(_logits(pm, inputs_embeds=embeds), first)

    # save / load into a fresh kt model
    pm.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(_wrapped(base), str(tmp_path / "a")).eval()
    assert torch.equal(_logits(loaded, input_ids=ids), first)

    # a second adapter: add, set, switch back, delete
    pm.add_adapter("second", _lora(base, r=2, seed=2))
    pm.set_adapter("second")
    pm.eval()
    second = _logits(pm, input_ids=ids)
    alone = kt_sft.get_peft_model(_wrapped(base), _lora(base, r=2, seed=2)).eval()
    assert torch.equal(second, _logits(alone, input_ids=ids))
    assert not torch.equal(second, first)
    pm.set_adapter("default")
    assert torch.equal(_logits(pm, input_ids=ids), first)
    pm.delete_adapter("second")
    assert list(pm.peft_config) == ["default"]
    assert torch.equal(_logits(pm, input_ids=ids), first)

    # generate: greedy, deterministic, the adapter's tokens (not the base model's logits)
    gen = pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (2, 13) and torch.equal(gen[:, :9], ids)
    assert torch.equal(pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False), gen)
    step = _logits(pm, input_ids=gen[:, :9])[:, -1].argmax(-1)
    assert torch.equal(gen[:, 9], step)

    # unload: the base model again, its outputs exactly the base outputs
    unloaded = pm.unload()
    assert not isinstance(unloaded, PeftModel)
    assert torch.equal(_logits(unloaded, input_ids=ids), want_base)
    for model in (unloaded, loaded, alone, plain):
        kt_sft.close(model)
