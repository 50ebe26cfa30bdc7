"""``kt-accelerate launch``: the kt section of an accelerate config file goes to its own file."""

from __future__ import annotations

import pytest
import yaml

from kt_accelerate import KTransformersPlugin
from kt_accelerate.launch import build_command, main, split_config

CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_processes: 2
kt:
  kt_backend: AVX2
  lora_rank: 8
  engine_placement: per_node
  dist_timeout: 120
"""


def test_split_config(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG)
    accel, kt = split_config(path)
    assert accel == {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_processes": 2,
    }
    assert kt == {
        "kt_backend": "AVX2",
        "lora_rank": 8,
        "engine_placement": "per_node",
        "dist_timeout": 120,
    }
    path.write_text("distributed_type: 'NO'\n")
    assert split_config(path) == ({"distributed_type": "NO"}, None)
    path.write_text("distributed_type: 'NO'\nkt: [1, 2]\n")
    with pytest.raises(ValueError, match="the 'kt' section must be a mapping"):
        split_config(path)


def test_build_command_writes_both_files_and_the_plugin_reads_them(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG)
    work = tmp_path / "work"
    work.mkdir()
    command, env = build_command(str(path), ["--num_processes", "2", "train.py", "--x", "1"], work)
    assert command[-7:] == [
        "--config_file",
        str(work / "accelerate_config.yaml"),
        "--num_processes",
        "2",
        "train.py",
        "--x",
        "1",
    ]
    assert "kt" not in yaml.safe_load((work / "accelerate_config.yaml").read_text())
    plugin = KTransformersPlugin(config_file=env["ACCELERATE_KT_CONFIG_FILE"])
    assert plugin.kt_config.isa == "avx2" and plugin.kt_config.lora_rank == 8
    assert plugin.dist_timeout == 120


def test_dry_run_prints_the_command(tmp_path, capsys) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG)
    assert main(["launch", "--config_file", str(path), "--dry_run", "train.py"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ACCELERATE_KT_CONFIG_FILE=")
    assert out[1].endswith("train.py") and "launch --config_file" in out[1]
    path.write_text("distributed_type: 'NO'\n")
    assert main(["launch", "--config_file", str(path), "--dry_run", "train.py"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"--config_file {path} train.py")
