"""tune_malloc: after it, freed multi-MiB tensors go back to the system (glibc); it honours
KT_MALLOC_TUNING=0 and the user's own MALLOC_MMAP_THRESHOLD_. Each case runs in a fresh
process: malloc settings are process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux only"
)

PROBE = r"""
import json, torch
from kt_sft.host_memory import malloc_tuned, maybe_tune_malloc, tune_malloc

def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

tuned = maybe_tune_malloc()
assert malloc_tuned() is tuned
assert tune_malloc() is tuned or not tuned
# Free 8 MiB and 2 MiB blocks in an order that leaves holes, as a step's activations do
# (growing the default dynamic threshold past them), then allocate and free again.
keep = []
for round in range(3):
    blocks = [torch.ones(2**21 if i % 2 else 2**19) for i in range(64)]  # 8 / 2 MiB fp32
    keep.append(blocks[::7])
    del blocks
before = anon()
big = [torch.ones(2**19) for _ in range(128)]  # 256 MiB of 2 MiB blocks
peak = anon()
del big
print(json.dumps({"tuned": tuned, "before": before, "peak": peak, "after": anon()}))
"""


def _probe(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full.pop("KT_MALLOC_TUNING", None)
    full.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_blocks_of_a_mib_and_more_go_back_to_the_system() -> None:
    got = _probe(KT_MALLOC_TUNING="1")
    assert got["tuned"] is True
    mib = 2**20
    assert got["peak"] - got["before"] >= 200 * mib  # the 256 MiB were really touched
    # every 2 MiB block was its own mapping: all of it is returned on free (16 MiB of slack
    # for the interpreter's own small allocations)
    assert got["after"] - got["before"] <= 16 * mib, got


def test_opt_out_auto_and_the_users_own_threshold_are_honoured() -> None:
    assert _probe(KT_MALLOC_TUNING="0")["tuned"] is False
    assert _probe(KT_MALLOC_TUNING="1", MALLOC_MMAP_THRESHOLD_="65536")["tuned"] is False
    # unset: a small process (far below half of the RAM) keeps glibc's default, fast heap
    assert _probe()["tuned"] is False


def test_bad_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from kt_sft import host_memory

    monkeypatch.setenv("KT_MALLOC_TUNING", "yes")
    with pytest.raises(ValueError, match="KT_MALLOC_TUNING='yes'"):
        host_memory.maybe_tune_malloc()
