"""Shared fixtures of kt-sft's tests."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kt_sft.backend import engine_available

BACKENDS = [
    "torch",
    pytest.param(
        "engine",
        marks=pytest.mark.skipif(not engine_available(), reason="kt-kernels engine not built"),
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each test runs on the torch reference and on the compiled engine."""
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> object:
    # Tiny matrices: torch's intra-op threads only add overhead (and thrash on a busy machine).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test() -> None:
    """Each test starts from the same global RNG state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A KT_CACHE_DIR per test module: the embedded demo model is built there once."""
    return tmp_path_factory.mktemp("kt-cache")


@pytest.fixture
def kt_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point KT_CACHE_DIR at the module's cache (opt in with
    ``pytestmark = pytest.mark.usefixtures("kt_cache")``)."""
    monkeypatch.setenv("KT_CACHE_DIR", str(cache_dir))
    return cache_dir
