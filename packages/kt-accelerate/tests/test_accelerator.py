"""KTAccelerator in one process: prepare wraps and places, the optimizer gets the expert LoRA,
the loop equals plain kt-sft, save_state/load_state record and check the process layout."""

from __future__ import annotations

import json
from types import SimpleNamespace

import kta_common as kc
import pytest
import torch
from accelerate.utils import patch_environment

import kt_accelerate
from kt_accelerate import KTAccelerator, KTransformersPlugin, KTResumeError
from kt_sft.distributed import expert_lora_parameters

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _accelerator(**plugin_kwargs) -> KTAccelerator:
    plugin = KTransformersPlugin(kt_config=dict(kc.KT_SETTINGS), **plugin_kwargs)
    return KTAccelerator(cpu=True, kt_plugin=plugin)


def test_prepare_wraps_an_unwrapped_moe_model_and_leaves_others() -> None:
    from kt_models import tiny

    accelerator = _accelerator()
    moe = tiny.build(kc.MODEL_TYPE)
    dense = torch.nn.Linear(4, 4)
    moe, dense = accelerator.prepare(moe, dense)
    assert kt_accelerate.integration.is_kt_model(moe)
    assert not kt_accelerate.integration.is_kt_model(dense)
    experts = moe.model.layers[1].mlp.experts
    assert experts.gate_up_proj.numel() == 0  # the weights live in the engine now
    assert next(moe.parameters()).device == accelerator.device
    ids = torch.randint(3, kc.VOCAB, (1, 6))
    assert torch.isfinite(moe(input_ids=ids).logits).all()


def test_loop_matches_plain_kt_sft_and_optimizer_gets_expert_lora(caplog) -> None:
    """The optimizer is built without the expert LoRA and is fused (it writes parameters
    without bumping their version counters): prepare adds the parameters and the engines still
    see every update."""
    ref = kc.reference(1)
    accelerator = _accelerator()
    model = kc.build_model(accelerator.kt_plugin, lora_seed=0)
    experts = {id(p) for p in expert_lora_parameters(model)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in experts]
    optimizer = torch.optim.AdamW(others, lr=kc.LR, fused=True)
    with caplog.at_level("WARNING"):
        model, optimizer = accelerator.prepare(model, optimizer)
    assert "did not update 8 expert LoRA parameter(s)" in caplog.text
    prepared = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert experts <= prepared
    ids = kc.rank_batches(1)[0]
    n = kc.num_targets([ids])
    for step in range(kc.STEPS):
        loss = kc.token_sum_loss(model, ids) / n
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        assert loss.item() == pytest.approx(ref["losses"][step][0], rel=1e-5)
    state = kc.trainable_state(model)
    for name, value in ref["state"].items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-5, msg=name)


def test_save_state_records_layout_and_load_state_checks_it(tmp_path) -> None:
    accelerator = _accelerator()
    model = kc.build_model(accelerator.kt_plugin)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=kc.LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    folder = tmp_path / "state"
    accelerator.save_state(str(folder))
    layout = json.loads((folder / "kt_layout.json").read_text())
    assert layout["world_size"] == 1
    accelerator.load_state(str(folder))  # same layout: fine

    layout.update(world_size=4, num_nodes=2, ranks_per_node=[2, 2])
    (folder / "kt_layout.json").write_text(json.dumps(layout))
    with pytest.raises(
        KTResumeError,
        match=r"saved by 4 process\(es\) \(2 node\(s\)\) but this "
        r"run has 1.*allow_world_size_change=True",
    ):
        accelerator.load_state(str(folder))
    accelerator.kt_plugin.allow_world_size_change = True
    with pytest.warns(RuntimeWarning, match="saved by 4"):
        accelerator.load_state(str(folder))


def test_deepspeed_zero3_fsdp1_and_fsdp2_offload_are_refused_before_setup() -> None:
    plugin = KTransformersPlugin()
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3 is not supported"):
        KTAccelerator(kt_plugin=plugin, deepspeed_plugin=SimpleNamespace(zero_stage=3))
    with pytest.raises(ValueError, match=r"FSDP version 1 .* is not supported"):
        KTAccelerator(kt_plugin=plugin, fsdp_plugin=SimpleNamespace())
    from accelerate.utils import FullyShardedDataParallelPlugin

    with pytest.raises(ValueError, match="FSDP2 CPU offload"):
        KTAccelerator(
            cpu=True,
            kt_plugin=plugin,
            fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, cpu_offload=True),
        )
    with pytest.raises(TypeError, match="kt_plugin must be a KTransformersPlugin"):
        KTAccelerator(kt_plugin={"lora_rank": 4})


def test_launched_ranks_without_a_device_must_ask_for_cpu() -> None:
    """torchrun started 2 processes but accelerate found no GPU and cpu=False: each rank would
    train alone; KTAccelerator says how to fix it."""
    with (
        patch_environment(world_size="2", rank="0", master_addr="127.0.0.1", master_port="1"),
        pytest.raises(ValueError, match=r"started 2 processes .* pass KTAccelerator\(cpu=True\)"),
    ):
        KTAccelerator(kt_plugin=KTransformersPlugin())


def test_model_wrapped_with_other_settings_is_refused() -> None:
    model = kc.build_model(KTransformersPlugin(kt_config=dict(kc.KT_SETTINGS)))
    accelerator = KTAccelerator(
        cpu=True, kt_plugin=KTransformersPlugin(kt_config={**kc.KT_SETTINGS, "max_cache_depth": 5})
    )
    with pytest.raises(kt_accelerate.KTPluginConflictError, match="max_cache_depth=5"):
        accelerator.prepare(model)
