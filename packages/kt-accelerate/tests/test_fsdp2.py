"""FSDP2 with kt on 2 CPU processes (gloo): the non-expert parameters are sharded by
``fully_shard``, the expert LoRA stays whole and is kept in sync by kt; the run equals one
process on the same global batch, and the saved adapter is the standard, unsharded one.

Tolerances. Only fp32 summation orders differ from one process (the leader's single engine call
for both ranks' tokens, FSDP2's reduce-scatter, kt's gradient all-reduce). Measured on 2 ranks,
2 AdamW steps at lr 1e-2 on kt's fp32 reference engine: losses 1.0e-7 relative, gradient norms
8.5e-8 relative, LoRA weights (sharded ones gathered, and the saved adapter) 1.2e-6, logits of
the adapter in stock transformers + PEFT 1.6e-7. Checked with rel 1e-5 (losses, norms), atol 2e-5
(weights: AdamW can turn ~1e-8 gradient differences on near-zero components into ~1e-5 weight
differences, see test_distributed.py) and atol 1e-5 (logits).
"""

from __future__ import annotations

import kta_common as kc
import kta_scenarios as sc
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _check_adapter(folder, ref: dict) -> None:
    """The adapter in ``folder`` is a standard one: stock transformers + PEFT load it on the
    stock model (no kt), and it gives the single-process run's logits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from kt_models import tiny

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    expected = {k.replace(".default", ""): v for k, v in ref["state"].items()}
    assert set(tensors) == set(expected)
    for key, value in tensors.items():
        assert value.shape == expected[key].shape, key  # whole, not a shard
        torch.testing.assert_close(value, expected[key], rtol=0, atol=2e-5, msg=key)
    stock = PeftModel.from_pretrained(tiny.build(kc.MODEL_TYPE), str(folder))
    stock.eval()
    with torch.no_grad():
        logits = stock(input_ids=kc.PROBE).logits
    torch.testing.assert_close(logits, ref["probe_logits"], rtol=0, atol=1e-5)


def _check_parity(results: list[dict], ref: dict) -> None:
    for res in results:
        for step, losses in enumerate(res["losses"]):
            assert losses == pytest.approx(ref["losses"][step], rel=1e-5)
        assert res["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
        assert res["state"].keys() == ref["state"].keys()
        for name, value in ref["state"].items():
            torch.testing.assert_close(res["state"][name], value, rtol=0, atol=2e-5, msg=name)


def test_fsdp2_two_ranks_match_single_process_save_a_full_adapter_and_resume(
    launch_ranks, tmp_path
) -> None:
    launch = launch_ranks("fsdp2", 2, timeout=150)
    launch.check()
    results = launch.results
    for res in results:
        assert res["distributed_type"] == "DistributedType.FSDP"
        assert res["fsdp_version"] == 2 and res["gradient_checkpointing"] is True
        assert res["model_class"].startswith("FSDP")
        assert res["expert_lora_sharded"] and not any(res["expert_lora_sharded"])
        assert res["trainable_sharded"] == [True]  # every other trainable parameter
        # q_proj's LoRA A (4 x 64) is split across the two ranks.
        assert set(res["local_numel"].values()) == {128}
    assert results[0]["engine_ranks"] == ["LeaderBackend"]
    assert results[1]["engine_ranks"] == ["MemberBackend"]
    ref = kc.reference(2)
    _check_parity(results, ref)
    folder = tmp_path / "fsdp2-2x1" / "adapter"
    _check_adapter(folder, ref)
    # save_state / load_state: everything (sharded weights, kt's expert LoRA, optimizer state)
    # comes back exactly, so the step after restoring repeats the step after saving.
    assert results[0]["layout_written"] is True  # by the main process
    for res in results:
        assert res["restored_diff"] == 0.0
        first, again = res["resumed_losses"]
        assert again == first
        assert res["resumed_diff"] == 0.0


ACCELERATE_FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
machine_rank: 0
num_processes: 2
main_process_ip: 127.0.0.1
main_process_port: {port}
mixed_precision: 'no'
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
  fsdp_state_dict_type: SHARDED_STATE_DICT
"""


def test_accelerate_launch_with_an_fsdp2_config(launch_command, tmp_path) -> None:
    """`accelerate launch --config_file fsdp2.yaml` (docs/distributed.md): the script asks for
    the CPU (`KTAccelerator(cpu=True)`) and gets accelerate's FSDP2 path over gloo."""
    accel = tmp_path / "fsdp2.yaml"
    accel.write_text(ACCELERATE_FSDP2_CONFIG.format(port=sc.free_port()))
    kt = tmp_path / "kt.yaml"
    kt.write_text("kt_lora_rank: 4\nbackend: torch\nweight_dtype: fp32\ndist_timeout: 60\n")
    outdir = tmp_path / "out"
    outdir.mkdir()
    argv = [
        *sc.ACCELERATE_CLI,
        "launch",
        "--config_file",
        str(accel),
        str(sc.__file__),
        "fsdp2",
        str(outdir),
    ]
    launch = launch_command(
        argv, 2, outdir, env={"ACCELERATE_KT_CONFIG_FILE": str(kt)}, timeout=150
    )
    launch.check()
    results = launch.results
    for res in results:
        assert res["distributed_type"] == "DistributedType.FSDP" and res["fsdp_version"] == 2
        assert res["gradient_checkpointing"] is False
        assert not any(res["expert_lora_sharded"]) and res["trainable_sharded"] == [True]
    ref = kc.reference(2)
    _check_parity(results, ref)
    _check_adapter(outdir / "adapter", ref)
