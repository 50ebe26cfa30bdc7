"""Shared test setup: puts the helper modules of this folder on sys.path (pytest runs with
--import-mode=importlib in nox) and provides the per-ISA parametrization."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Sanitizer runs (nox -s sanitize) set this to keep the slow instrumented build within limits.
FAST = os.environ.get("KT_KERNELS_TEST_FAST", "") not in ("", "0")
