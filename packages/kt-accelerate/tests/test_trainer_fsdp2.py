"""KTTrainer (and TRL's KTSFTTrainer) with FSDP2 from ``TrainingArguments(fsdp=...,
fsdp_config={"fsdp_version": 2, ...})`` on 2 CPU processes (gloo).

The two ranks (2 sequences each) must train like one process with 4 per step, checkpoints must
hold the standard PEFT adapter, and resuming from a checkpoint must repeat the uninterrupted run.

Tolerances (measured on kt's fp32 reference engine, 4 steps at lr 1e-2 with the Trainer's
default clipping and fused AdamW): logged losses 1.0e-7 relative to one process, final LoRA
weights 3.8e-6 absolute (AdamW turns ~1e-8 gradient differences on near-zero components into
~1e-6 weight differences), resumed losses and weights bit-identical to the uninterrupted run.
Checked with rel 1e-5 (losses), atol 2e-5 (weights, saved adapter), atol 1e-5 (logits of the
adapters in stock transformers + PEFT), rel 1e-6 / atol 1e-6 (resume).
"""

from __future__ import annotations

from pathlib import Path

import kta_common as kc
import pytest
import torch

from kt_accelerate import KTransformersPlugin, KTTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _single_process(output_dir: Path) -> tuple[dict, dict, dict]:
    """One process, 4 sequences per step, same initial LoRA as the ranks' rank 0."""
    plugin = KTransformersPlugin(kt_config=dict(kc.KT_SETTINGS))
    model = kc.build_model(plugin, lora_seed=1)
    initial = kc.trainable_state(model)
    recorder = kc.LossRecorder()
    trainer = KTTrainer(
        model=model,
        args=kc.trainer_args(str(output_dir), per_device=4),
        train_dataset=kc.sequences(),
        data_collator=kc.collate,
        kt_plugin=plugin,
        callbacks=[recorder],
    )
    trainer.train()
    return recorder.losses, initial, kc.trainable_state(trainer.model)


def _stock_logits(folder: Path) -> torch.Tensor:
    from peft import PeftModel

    from kt_models import tiny

    model = PeftModel.from_pretrained(tiny.build(kc.MODEL_TYPE), str(folder))
    model.eval()
    with torch.no_grad():
        return model(input_ids=kc.PROBE).logits


def test_trainer_fsdp2_matches_one_process_saves_adapters_and_resumes(
    launch_ranks, tmp_path
) -> None:
    from safetensors.torch import load_file

    train_dir = tmp_path / "fsdp2"
    launch = launch_ranks("trainer_fsdp2", 2, timeout=180, env={"KTA_TRAIN_DIR": str(train_dir)})
    launch.check()
    ref_losses, initial, ref_state = _single_process(tmp_path / "single")
    assert [r["full"]["engine_ranks"] for r in launch.results] == [
        ["LeaderBackend"],
        ["MemberBackend"],
    ]
    for res in launch.results:
        full, resumed = res["full"], res["resumed"]
        assert full["distributed_type"] == "DistributedType.FSDP"
        assert full["model_class"].startswith("FSDP")
        assert full["sharded"] == [True]  # attention LoRA: DTensors
        assert full["experts_sharded"] == [False]  # kt's parameters stay whole
        assert sorted(full["losses"]) == [1, 2, 3, 4]
        for step, loss in ref_losses.items():
            assert full["losses"][step] == pytest.approx(loss, rel=1e-5)
        assert full["state"].keys() == ref_state.keys()
        for name, value in ref_state.items():
            torch.testing.assert_close(full["state"][name], value, rtol=0, atol=2e-5, msg=name)
        # resume_from_checkpoint="…/checkpoint-2" repeats steps 3 and 4.
        assert sorted(resumed["losses"]) == [3, 4]
        for step in (3, 4):
            assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=1e-6)
        for name, value in full["state"].items():
            torch.testing.assert_close(resumed["state"][name], value, rtol=0, atol=1e-6)
    # Training moved both the expert and the attention LoRA.
    moved = {name: not torch.equal(value, initial[name]) for name, value in ref_state.items()}
    assert all(moved.values())
    assert any("experts" in n for n in moved) and any("q_proj" in n for n in moved)

    # The checkpoint's adapter is the standard, whole one: same tensors as the single-process
    # checkpoint, and stock transformers + PEFT compute the same logits from both.
    ckpt, ref_ckpt = train_dir / "full" / "checkpoint-2", tmp_path / "single" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors", "kt_layout.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    expected = load_file(str(ref_ckpt / "adapter_model.safetensors"))
    assert tensors.keys() == expected.keys()
    assert any("experts" in k for k in tensors)
    for key, value in expected.items():
        assert tensors[key].shape == value.shape, key
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=2e-5, msg=key)
    torch.testing.assert_close(_stock_logits(ckpt), _stock_logits(ref_ckpt), rtol=0, atol=1e-5)


def test_sft_trainer_runs_under_fsdp2(launch_ranks, tmp_path) -> None:
    pytest.importorskip("trl")
    launch = launch_ranks("trl_fsdp2", 2, timeout=150, env={"KTA_TRAIN_DIR": str(tmp_path / "trl")})
    launch.check()
    for res in launch.results:
        assert res["distributed_type"] == "DistributedType.FSDP"
        assert res["sharded"] == [True] and res["experts_trained"] is True
        assert sorted(res["losses"]) == [1] and res["losses"][1] > 0
    assert (tmp_path / "trl" / "checkpoint-1" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("fsdp_config", "match"),
    [
        ({"fsdp_version": 1}, r"FSDP version 1 .* use FSDP2"),
        (
            {"fsdp_version": 2, "cpu_ram_efficient_loading": True},
            r"FSDP2 `cpu_ram_efficient_loading` is not supported with kt",
        ),
        (
            {"fsdp_version": 2, "activation_checkpointing": True},
            r"FSDP2 `activation_checkpointing` .* is not supported with kt",
        ),
    ],
)
def test_unsupported_fsdp_training_arguments_are_refused(tmp_path, fsdp_config, match) -> None:
    plugin = KTransformersPlugin(kt_config=dict(kc.KT_SETTINGS))
    args = kc.trainer_args(
        str(tmp_path),
        per_device=2,
        fsdp=True,
        fsdp_config=fsdp_config,
        gradient_checkpointing=False,
    )
    with pytest.raises(ValueError, match=match):
        plugin.check_training_args(args)


@pytest.mark.parametrize("fsdp", ["full_shard offload", True])
def test_fsdp_cpu_offload_in_training_arguments_is_refused(tmp_path, fsdp) -> None:
    plugin = KTransformersPlugin(kt_config=dict(kc.KT_SETTINGS))
    config = {"fsdp_version": 2} if fsdp is not True else {"fsdp_version": 2, "cpu_offload": True}
    args = kc.trainer_args(str(tmp_path), per_device=2, fsdp=fsdp, fsdp_config=config)
    with pytest.raises(ValueError, match=r"FSDP2 CPU offload .* is not supported with kt"):
        plugin.check_training_args(args)
