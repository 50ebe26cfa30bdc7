"""The int4 example of docs/inference.md runs as written (NumPy + safetensors, no torch)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[3] / "docs" / "inference.md"


def test_inference_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    if not DOC.exists():
        pytest.skip(f"{DOC} is not part of this checkout (installed from an sdist?)")
    pytest.importorskip("safetensors")
    section = DOC.read_text().split("## Example (NumPy and safetensors only)", 1)
    assert len(section) == 2, "docs/inference.md lost its example section"
    blocks = re.findall(r"```python\n(.*?)```", section[1], flags=re.S)
    assert blocks and "torch" not in blocks[0]
    exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out.split()
    assert printed and printed[0] in __import__("kt_kernels").available_isas()
    assert float(printed[-1]) < 0.3  # int4 weight bytes vs bf16
