"""Shared test setup: puts the helper modules of this folder on sys.path (pytest runs with
--import-mode=importlib in nox) and provides the per-ISA parametrization."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Sanitizer runs (nox -s sanitize) set this to keep the slow instrumented build within limits.
FAST = os.environ.get("KT_KERNELS_TEST_FAST", "") not in ("", "0")


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test() -> None:
    """Each test starts from the same global RNG state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
