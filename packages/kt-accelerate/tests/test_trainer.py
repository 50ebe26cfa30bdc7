"""KTTrainer: stock Trainer checkpoints, exact resume, two ranks, refused settings."""

from __future__ import annotations

import json
from pathlib import Path

import kta_common as kc
import pytest
import torch

import kt_accelerate
from kt_accelerate import KTransformersPlugin, KTResumeError, KTTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _train(
    output_dir: Path,
    *,
    per_device: int,
    resume: str | bool | None = None,
    plugin: KTransformersPlugin | None = None,
    **overrides,
) -> tuple[dict, KTTrainer]:
    args = kc.trainer_args(str(output_dir), per_device=per_device, **overrides)
    plugin = plugin or KTransformersPlugin(kt_config=dict(kc.KT_SETTINGS))
    model = kc.build_model(plugin, lora_seed=0)
    recorder = kc.LossRecorder()
    trainer = KTTrainer(
        model=model,
        args=args,
        train_dataset=kc.sequences(),
        data_collator=kc.collate,
        kt_plugin=plugin,
        callbacks=[recorder],
    )
    trainer.train(resume_from_checkpoint=resume)
    return recorder.losses, trainer


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> tuple[Path, dict]:
    """One process, 4 sequences per step, 4 steps, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("single")
    losses, trainer = _train(out, per_device=4)
    kt_accelerate_model = trainer.model
    del trainer, kt_accelerate_model
    return out, losses


def test_checkpoint_holds_standard_peft_adapter(single_run) -> None:
    out, _ = single_run
    ckpt = out / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "kt_layout.json",
        "optimizer.pt",
        "trainer_state.json",
    } <= names
    assert json.loads((ckpt / "kt_layout.json").read_text())["world_size"] == 1
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert set(config["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}

    # Stock transformers + PEFT (no kt) load it and compute what a kt model loading it does.
    from peft import PeftModel

    from kt_models import tiny

    batch = kc.collate(kc.sequences()[:3])
    stock = PeftModel.from_pretrained(tiny.build(kc.MODEL_TYPE), ckpt)
    kt_model = kt_accelerate.wrap_model(
        tiny.build(kc.MODEL_TYPE), KTransformersPlugin(kt_config=dict(kc.KT_SETTINGS))
    )
    kt_model = PeftModel.from_pretrained(kt_model, ckpt)
    with torch.no_grad():
        expected = stock(**batch).logits
        got = kt_model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_resume_gives_the_same_next_step_loss(single_run) -> None:
    out, losses = single_run
    resumed, _ = _train(out, per_device=4, resume=str(out / "checkpoint-2"))
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-6, abs=1e-7)


def test_two_ranks_match_single_process_and_resume_checks_world_size(
    launch_ranks, single_run, tmp_path
) -> None:
    """Two ranks with 2 sequences each see the global batches of one process with 4: same
    logged losses; their checkpoint then refuses a one-process resume. The ranks run with
    engine_placement=per_rank (an engine each, gradients all-reduced among all ranks; the
    per_node exchange is covered by test_distributed.py), with gradient checkpointing."""
    _, losses = single_run
    train_dir = tmp_path / "two-ranks"
    launch = launch_ranks(
        "trainer",
        2,
        timeout=150,
        env={"KTA_TRAIN_DIR": str(train_dir), "ACCELERATE_KT_ENGINE_PLACEMENT": "per_rank"},
    )
    launch.check()
    assert [r["placement"] for r in launch.results] == ["per_rank", "per_rank"]
    assert [r["engine_ranks"] for r in launch.results] == [["TorchMoEEngine"]] * 2
    for result in launch.results:
        assert sorted(result["losses"]) == [1, 2, 3, 4]
        for step in range(1, 5):
            assert result["losses"][step] == pytest.approx(losses[step], rel=2e-5)
    ranks = launch.results
    for name, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], value, rtol=0, atol=0)
    ckpt = train_dir / "checkpoint-2"
    assert json.loads((ckpt / "kt_layout.json").read_text())["world_size"] == 2

    with pytest.raises(KTResumeError, match=r"saved by 2 process\(es\).*this run has 1"):
        _train(tmp_path / "resume-1", per_device=4, resume=str(ckpt))
    allow = KTransformersPlugin(kt_config=dict(kc.KT_SETTINGS), allow_world_size_change=True)
    with pytest.warns(RuntimeWarning, match="saved by 2"):
        resumed, _ = _train(
            tmp_path / "resume-2", per_device=4, resume=str(ckpt), plugin=allow, max_steps=3
        )
    assert sorted(resumed) == [3]


def test_conflicting_training_arguments_are_refused(tmp_path) -> None:
    plugin = KTransformersPlugin(kt_config=dict(kc.KT_SETTINGS), dist_timeout=600)
    model = kc.build_model(plugin)
    args = kc.trainer_args(str(tmp_path), per_device=2, ddp_timeout=60)
    with pytest.raises(
        ValueError,
        match=r"dist_timeout=600s is longer than "
        r"TrainingArguments.ddp_timeout=60s",
    ):
        KTTrainer(
            model=model,
            args=args,
            train_dataset=kc.sequences(),
            data_collator=kc.collate,
            kt_plugin=plugin,
        )


def test_model_wrapped_with_other_settings_is_refused(tmp_path) -> None:
    model = kc.build_model(KTransformersPlugin(kt_config=dict(kc.KT_SETTINGS)))
    plugin = KTransformersPlugin(kt_config={**kc.KT_SETTINGS, "lora_rank": 8})
    args = kc.trainer_args(str(tmp_path), per_device=2)
    with pytest.raises(
        kt_accelerate.KTPluginConflictError,
        match=r"kt_config.lora_rank=8 but the model was wrapped with "
        r"lora_rank=4",
    ):
        KTTrainer(
            model=model,
            args=args,
            train_dataset=kc.sequences(),
            data_collator=kc.collate,
            kt_plugin=plugin,
        )
