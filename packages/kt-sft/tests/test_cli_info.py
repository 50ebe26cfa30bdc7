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
    out = subprocess.run([sys.executable, "-m", "kt_sft.cli", "info"], check=True,
                         capture_output=True, text=True).stdout
    assert "kt-kernels" in out and "cpu features" in out and "torch" in out
