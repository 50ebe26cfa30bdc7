"""The Python blocks of docs/models.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[3] / "docs" / "models.md"


@pytest.mark.skipif(not DOC.is_file(), reason="docs/models.md is not beside this checkout")
def test_models_doc_code_blocks_run(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_models"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC}:block{i}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(
                f"docs/models.md python block {i} failed: {exc!r}\n{block}"
            ) from exc
