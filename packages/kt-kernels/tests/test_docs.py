"""The NumPy-only example of docs/api/kernels.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[3] / "docs" / "api" / "kernels.md"


def _example() -> str:
    if not DOC.exists():
        pytest.skip(f"{DOC} is not part of this checkout (installed from an sdist?)")
    text = DOC.read_text()
    section = text.split("## Example (NumPy only)", 1)
    assert len(section) == 2, "docs/api/kernels.md lost its '## Example (NumPy only)' section"
    blocks = re.findall(r"```python\n(.*?)```", section[1], flags=re.S)
    assert blocks, "no python block in the example section"
    return blocks[0]


def test_docs_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code = _example()
    assert "torch" not in code
    exec(compile(code, str(DOC), "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out.split()
    assert printed and printed[0] in __import__("kt_kernels").available_isas()
