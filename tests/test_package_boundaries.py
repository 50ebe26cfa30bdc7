"""The dependency direction of the monorepo, checked on the installed packages."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_kt_kernels_imports_no_torch_and_no_training_code() -> None:
    loaded = _modules_after_import("kt_kernels")
    assert "torch" not in loaded
    assert not any(
        m.split(".")[0]
        in {"kt_sft", "kt_models", "kt_accelerate", "transformers", "peft", "accelerate"}
        for m in loaded
    )


def test_kt_sft_does_not_import_accelerate() -> None:
    loaded = _modules_after_import("kt_sft")
    assert "accelerate" not in loaded and "kt_accelerate" not in loaded


@pytest.mark.parametrize("dist", ["kt-kernels", "kt-models", "kt-sft", "kt-accelerate"])
def test_each_package_has_version_0_1(dist: str) -> None:
    import importlib.metadata

    assert importlib.metadata.version(dist).startswith("0.1.")
