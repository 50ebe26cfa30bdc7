"""Peak resident memory of a streamed load, measured in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

LAYERS, E, INTER, H = 6, 8, 512, 1024
LAYER_BYTES = 3 * E * INTER * H * 2  # bf16 on disk and in the output

_MEASURE = r"""
import sys, torch
import kt_models

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

reader = kt_models.CheckpointReader(sys.argv[1])
mode = sys.argv[2]
# warm torch up (first-use kernel and thread-pool set-up) before measuring
warm = torch.zeros(256, 256, dtype=torch.bfloat16)
torch.empty_like(warm).copy_(warm.float())
del warm
checks = []
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
base = status("VmRSS")
if mode == "stream":
    for layer, weights in reader.iter_layer_experts(torch.bfloat16):
        checks.append(float(weights.gate_up[E_LAST, 0, 0]) == layer * 8 + E_LAST + 1)
        del weights
else:  # the whole checkpoint at once, as a plain safetensors load would hold it
    from safetensors.torch import load_file
    tensors = {}
    for f in reader.files:
        tensors.update(load_file(str(f)))
    checks.append(all(bool(t.abs().sum() > 0) for t in tensors.values()))
print(status("VmHWM") - base, all(checks))
"""


def _write(directory: Path) -> int:
    directory.mkdir()
    config = {
        "model_type": "qwen3_moe",
        "hidden_size": H,
        "moe_intermediate_size": INTER,
        "num_experts": E,
        "num_experts_per_tok": 2,
        "num_hidden_layers": LAYERS,
        "intermediate_size": 64,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "vocab_size": 64,
    }
    (directory / "config.json").write_text(json.dumps(config))
    weight_map, total = {}, 0
    for layer in range(LAYERS):  # one shard per layer, so this process holds one layer at most
        tensors = {}
        for e in range(E):
            for proj, shape in (
                ("gate_proj", (INTER, H)),
                ("up_proj", (INTER, H)),
                ("down_proj", (H, INTER)),
            ):
                tensors[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = torch.full(
                    shape, float(layer * 8 + e + 1), dtype=torch.bfloat16
                )
        name = f"model-{layer + 1:05d}-of-{LAYERS:05d}.safetensors"
        save_file(tensors, str(directory / name))
        weight_map.update(dict.fromkeys(tensors, name))
        total += (directory / name).stat().st_size
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return total


def _peak(directory: Path, mode: str) -> int:
    code = _MEASURE.replace("E_LAST", str(E - 1))
    out = subprocess.run(
        [sys.executable, "-c", code, str(directory), mode],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out[1] == "True", "streamed values were wrong"
    return int(out[0])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streamed_load_peak_rss_stays_near_one_layer(tmp_path) -> None:
    total = _write(tmp_path / "ckpt")
    streamed = _peak(tmp_path / "ckpt", "stream")
    whole = _peak(tmp_path / "ckpt", "whole")
    mib = 2**20
    print(
        f"\ncheckpoint {total / mib:.1f} MiB ({LAYERS} layers of {LAYER_BYTES / mib:.1f} MiB); "
        f"peak RSS above baseline: streamed {streamed / mib:.1f} MiB, "
        f"whole-checkpoint load {whole / mib:.1f} MiB"
    )
    assert total > 2 * LAYER_BYTES
    assert streamed < total / 2
    # one layer's output + at most 8 MiB of file pages mapped at a time + allocator slack
    assert streamed < 2 * LAYER_BYTES + 16 * mib
    assert whole > 0.9 * total  # the measurement does see a full load
