"""KTSFTTrainer: TRL's SFTTrainer with kt, from an unwrapped model and a peft_config."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3"
    )


def test_sft_trainer_wraps_then_applies_peft_and_saves_the_adapter(tmp_path) -> None:
    import kta_common as kc
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig

    import kt_accelerate
    from kt_models import tiny
    from kt_sft.distributed import expert_lora_parameters

    g = torch.Generator().manual_seed(0)
    rows = [
        {"text": " ".join(f"w{int(i)}" for i in torch.randint(4, 128, (8,), generator=g))}
        for _ in range(4)
    ]
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        save_steps=1,
        logging_steps=1,
        max_length=16,
        disable_tqdm=True,
    )
    trainer = kt_accelerate.KTSFTTrainer(
        model=tiny.build(kc.MODEL_TYPE),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=_tokenizer(),
        kt_plugin=kt_accelerate.KTransformersPlugin(kt_config=dict(kc.KT_SETTINGS)),
        peft_config=LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    )
    assert kt_accelerate.integration.is_kt_model(trainer.model)
    before = [p.detach().clone() for p in expert_lora_parameters(trainer.model)]
    assert len(before) == 8
    trainer.train()
    after = expert_lora_parameters(trainer.model)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the experts trained
    names = {p.name for p in (tmp_path / "checkpoint-1").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "kt_layout.json"} <= names
