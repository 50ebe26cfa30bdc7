"""Fixtures of kt-accelerate's tests: a launcher for multi-process runs on localhost (gloo)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SCENARIOS = HERE / "kta_scenarios.py"

from kta_scenarios import free_port  # noqa: E402 - needs the path above


def worker_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "KT_", "FSDP_"))
        and k
        not in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        )
    }
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "KT_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra)
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str
    result: dict[str, Any] | None


@dataclass
class Launch:
    ranks: list[RankResult]
    seconds: float

    @property
    def results(self) -> list[dict[str, Any]]:
        return [r.result for r in self.ranks]  # type: ignore[misc]

    def check(self) -> None:
        bad = [r for r in self.ranks if r.returncode != 0 or r.result is None]
        if bad:
            raise AssertionError(
                "\n\n".join(
                    f"rank {r.rank} exited {r.returncode}:\n{r.output[-4000:]}" for r in bad
                )
            )


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group (so a launcher and its workers can be killed
    together), output to ``log``."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=str(HERE),
            start_new_session=True,
        )
    proc.kt_log = log  # type: ignore[attr-defined]
    return proc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _collect(
    procs: list[subprocess.Popen[bytes]], outdir: Path, timeout: float, grace: float = 3.0
) -> Launch:
    """Wait for every process; kill them all at ``timeout``, and the stragglers ``grace``
    seconds after a first process failed (as torchrun does)."""
    start = time.monotonic()
    failed_at: float | None = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now
        if now - start > timeout or (failed_at is not None and now - failed_at > grace):
            for p in procs:
                _kill(p)
            break
        time.sleep(0.1)
    for p in procs:
        p.wait()
    outputs = [p.kt_log.read_text(errors="replace") for p in procs]  # type: ignore[attr-defined]
    ranks = []
    for r, (p, out) in enumerate(zip(procs, outputs)):
        path = outdir / f"rank{r}.pt"
        result = torch.load(path, weights_only=False) if path.is_file() else None
        ranks.append(RankResult(r, p.returncode, out, result))
    return Launch(ranks, time.monotonic() - start)


@pytest.fixture
def launch_ranks(tmp_path: Path):
    """``launch_ranks(scenario, world, nodes=1, timeout=..., env=...)``: start one worker per
    rank with torchrun's environment variables (``nodes`` simulated nodes on localhost)."""

    def run(
        scenario: str,
        world: int,
        *,
        nodes: int = 1,
        timeout: float = 90.0,
        env: dict[str, str] | None = None,
    ) -> Launch:
        outdir = tmp_path / f"{scenario}-{world}x{nodes}"
        outdir.mkdir()
        port = str(free_port())
        per_node = world // nodes
        procs = []
        for r in range(world):
            e = worker_env(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                RANK=str(r),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(r % per_node),
                LOCAL_WORLD_SIZE=str(per_node),
                GROUP_RANK=str(r // per_node),
                **(env or {}),
            )
            procs.append(
                _start(
                    [sys.executable, str(SCENARIOS), scenario, str(outdir)],
                    e,
                    outdir / f"log{r}.txt",
                )
            )
        return _collect(procs, outdir, timeout)

    return run


@pytest.fixture
def launch_command(tmp_path: Path):
    """Run one launcher command (``accelerate launch ...``) whose workers write to outdir."""

    def run(
        argv: list[str],
        world: int,
        outdir: Path,
        *,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> Launch:
        proc = _start(argv, worker_env(**(env or {})), outdir / "launcher.txt")
        launch = _collect([proc], outdir, timeout)
        output = launch.ranks[0].output
        ranks = []
        for r in range(world):
            path = outdir / f"rank{r}.pt"
            result = torch.load(path, weights_only=False) if path.is_file() else None
            ranks.append(RankResult(r, proc.returncode, output, result))
        return Launch(ranks, launch.seconds)

    return run


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models gain nothing from intra-op threads, and a single one keeps these tests
    steady on a busy machine (the worker processes use one too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _clean_kt_environment(monkeypatch: pytest.MonkeyPatch):
    """Tests start without kt/accelerate settings from the shell and leave accelerate's
    process-wide state as they found it."""
    for key in list(os.environ):
        if key.startswith(
            (
                "ACCELERATE_KT_",
                "KT_ENGINE_PLACEMENT",
                "KT_DIST_TIMEOUT",
                "KT_LORA",
                "KT_BACKEND",
                "KT_NUM_",
                "KT_MAX_",
                "KT_WEIGHT_",
                "KT_ALLOW_",
                "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_USE_FSDP",
                "FSDP_",
            )
        ):
            monkeypatch.delenv(key)
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test() -> None:
    """Each test starts from the same global RNG state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
