"""Plain TRL trainers (SFT, DPO with its default gradient checkpointing, GRPO) on a tiny
kt-wrapped model: each runs a few steps on the CPU, the expert LoRA trains, nothing errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import kt_sft  # noqa: E402
from kt_sft.train.modeling import resolve_model_path  # noqa: E402

STEPS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    import os

    os.environ.setdefault("KT_CACHE_DIR", str(tmp_path_factory.mktemp("kt-cache")))
    return resolve_model_path("embedded", quiet=True)


def _model_and_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = kt_sft.load_model(
        model_dir, kt_sft.KTConfig(lora_rank=4, lora_alpha=8.0, num_threads=1, max_tokens=256)
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _lora(model: torch.nn.Module):
    from peft import LoraConfig

    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        **kt_sft.default_expert_lora_targets(model),
    )


def _common(tmp_path: Path) -> dict:
    return {
        "output_dir": str(tmp_path / "out"),
        "max_steps": STEPS,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "disable_tqdm": True,
    }


def _expert_lora(trainer) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in trainer.model.named_parameters()
        if p.requires_grad and "experts" in n
    }


def _check_trained(trainer, before: dict[str, torch.Tensor]) -> None:
    after = _expert_lora(trainer)
    assert before and after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "expert LoRA did not train"
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


def test_sft_trainer(model_dir: str, tmp_path: Path) -> None:
    model, tok = _model_and_tokenizer(model_dir)
    ds = datasets.Dataset.from_list(
        [{"text": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}."} for i in range(8)]
    )
    args = trl.SFTConfig(**_common(tmp_path), max_length=32)
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_lora(model)
    )
    before = _expert_lora(trainer)  # as PEFT initialised it
    trainer.train()
    _check_trained(trainer, before)
    kt_sft.close(trainer.model)


def test_dpo_trainer_default_gradient_checkpointing(model_dir: str, tmp_path: Path) -> None:
    """ref_model=None with PEFT: TRL computes the reference log-probs with the adapter disabled,
    between the policy forward and its backward, under non-reentrant checkpointing."""
    model, tok = _model_and_tokenizer(model_dir)
    ds = datasets.Dataset.from_list(
        [
            {
                "prompt": f"Is {i} even?",
                "chosen": " yes" if i % 2 == 0 else " no",
                "rejected": " no" if i % 2 == 0 else " yes",
            }
            for i in range(8)
        ]
    )
    args = trl.DPOConfig(**_common(tmp_path), max_length=32)
    assert args.gradient_checkpointing  # TRL's default, kept
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=_lora(model),
    )
    before = _expert_lora(trainer)  # as PEFT initialised it
    trainer.train()
    _check_trained(trainer, before)
    kt_sft.close(trainer.model)


def test_grpo_trainer(model_dir: str, tmp_path: Path) -> None:
    model, tok = _model_and_tokenizer(model_dir)
    ds = datasets.Dataset.from_list([{"prompt": f"Count to {i}:"} for i in range(8)])

    def reward_len(completions: list[str], **kwargs: object) -> list[float]:
        return [-abs(len(c) - 12) / 12.0 for c in completions]

    args = trl.GRPOConfig(
        **_common(tmp_path), max_completion_length=8, num_generations=2, generation_batch_size=2
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward_len,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=_lora(model),
    )
    before = _expert_lora(trainer)  # as PEFT initialised it
    trainer.train()
    after = _expert_lora(trainer)
    assert after.keys() == before.keys()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    kt_sft.close(trainer.model)
