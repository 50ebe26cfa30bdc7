"""`kt-sft info` reports the real environment."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import kt_kernels
from kt_sft.cli import main


def test_info_json_matches_environment(capsys) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["kt-sft"] == "0.1.0"
    assert info["versions"]["kt-kernels"] == kt_kernels.__version__
    assert info["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cpu_features"] == kt_kernels.cpu_features()


def test_info_console_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kt_sft.cli", "info"], check=True, capture_output=True, text=True
    ).stdout
    assert "kt-kernels" in out and "cpu features" in out and "torch" in out


def test_info_reports_isa_self_test_threads_and_numa(capsys) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["active_isa"] in info["available_isas"] == kt_kernels.available_isas()
    assert info["self_test"].startswith("passed")
    assert info["engine_threads"] == kt_kernels.default_thread_count() >= 1
    assert len(info["numa_nodes"]) >= 1 and info["numa_nodes"][0]["node"] == 0
    assert info["torch_threads"] == torch.get_num_threads()


def test_info_shows_a_forced_isa() -> None:
    import os

    env = dict(os.environ, KT_KERNELS_ISA="scalar", KT_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "kt_sft.cli", "info"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert "engine isa      scalar (KT_KERNELS_ISA=scalar)" in out
    assert "engine threads  1 (KT_NUM_THREADS=1)" in out
    assert "self-test       passed" in out and "numa nodes      " in out
