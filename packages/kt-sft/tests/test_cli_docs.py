"""Every code block in docs/*.md runs (and docs/configuration.md is up to date).

Per Markdown file, in one empty working folder and in order: `python` blocks run in one shared
namespace (later blocks see earlier names), `bash`/`sh` blocks run with `bash -euo pipefail`,
`yaml` blocks must parse (and validate as a `kt-sft train` config when they use its keys), `json`
blocks must parse. `text` and unlabelled blocks are output, not code. A block preceded by
`<!-- doc-test: skip (reason) -->` is not run, and one preceded by
`<!-- doc-test: instead `COMMAND` (reason) -->` runs COMMAND in its place (e.g. the README's
install-and-train line becomes a shorter training run); keep both rare.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCS = ROOT / "docs"
RUN = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
CHECK = {"yaml", "yml", "json"}
SKIP = re.compile(r"<!--\s*doc-test:\s*skip\b")
INSTEAD = re.compile(r"<!--\s*doc-test:\s*instead\s+`([^`]+)`")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int
    skip: bool
    instead: str | None = None


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2).lower(), i
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        instead = INSTEAD.search(prev)
        out.append(
            Block(
                lang,
                textwrap.dedent("\n".join(body)) + "\n",
                start + 1,
                bool(SKIP.search(prev)),
                instead.group(1) if instead else None,
            )
        )
        i += 1
    return out


def _doc_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) if DOCS.is_dir() else []


RUNNER = r"""
import json, subprocess, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for b in blocks:
    where = f"{b['file']}:{b['line']}"
    print(f"--- {where} ({b['lang']})", flush=True)
    if b["lang"] == "python":
        try:
            exec(compile(b["code"], where, "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: python block at {where}", flush=True)
            sys.exit(1)
    else:
        rc = subprocess.run(["bash", "-euo", "pipefail", "-c", b["code"]]).returncode
        if rc != 0:
            print(f"FAILED: bash block at {where} exited {rc}", flush=True)
            sys.exit(1)
"""


def _check_static(block: Block, where: str) -> None:
    if block.lang == "json":
        json.loads(block.code)
        return
    import yaml

    data = yaml.safe_load(block.code)
    from kt_sft.train.schema import TrainConfig

    keys = {"model_name_or_path", "dataset", "learning_rate", "lora_rank", "output_dir"}
    if isinstance(data, dict) and keys & set(data):
        TrainConfig.from_dict(data, source=where)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kt-cache")


@pytest.mark.skipif(not DOCS.is_dir(), reason="docs/ is not next to this checkout")
@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(DOCS)))
def test_code_blocks_run(doc: Path, tmp_path: Path, cache_dir: Path) -> None:
    rel = str(doc.relative_to(ROOT))
    runnable = []
    for b in blocks_of(doc):
        if b.skip:
            continue
        if b.instead is not None:
            runnable.append({"file": rel, "line": b.line, "lang": "bash", "code": b.instead})
        elif b.lang in CHECK:
            _check_static(b, f"{rel}:{b.line}")
        elif b.lang in RUN:
            runnable.append({"file": rel, "line": b.line, "lang": RUN[b.lang], "code": b.code})
    if not runnable:
        return
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "blocks.json").write_text(json.dumps(runnable))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(
        os.environ,
        KT_CACHE_DIR=str(cache_dir),
        PYTHONUNBUFFERED="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]


def test_skip_markers_are_rare() -> None:
    """Skips are for commands that need what this machine lacks (GPUs, several machines, a
    launcher around a script); each says why and where the same flow is tested."""
    blocks = [b for doc in _doc_files() for b in blocks_of(doc) if b.lang in RUN or b.lang in CHECK]
    skipped = [b for b in blocks if b.skip or b.instead]
    assert len(skipped) <= max(3, len(blocks) // 4), [b.line for b in skipped]


def test_block_parser() -> None:
    text = (
        "x\n<!-- doc-test: skip (slow) -->\n```bash\necho hi\n```\n\n```python\nx = 1\n```\n"
        "<!-- doc-test: instead `echo short` (quicker) -->\n```bash\necho long\n```\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "a.md"
        p.write_text(text)
        got = blocks_of(p)
    assert [(b.lang, b.code, b.skip, b.instead) for b in got] == [
        ("bash", "echo hi\n", True, None),
        ("python", "x = 1\n", False, None),
        ("bash", "echo long\n", False, "echo short"),
    ]


@pytest.mark.skipif(not DOCS.is_dir(), reason="docs/ is not next to this checkout")
def test_configuration_reference_is_generated_and_current() -> None:
    from kt_sft.train.docs import render_configuration

    current = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert current == render_configuration(), (
        "docs/configuration.md is out of date: run "
        "`python -m kt_sft.train.docs docs/configuration.md`"
    )
    from kt_sft.train.schema import describe_keys

    for _, f in describe_keys():  # every key is documented
        assert f"| `{f.name}` |" in current
