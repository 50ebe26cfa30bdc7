"""Shared fixtures: tiny models and their checkpoints, built once per session."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.utils import logging as hf_logging

import kt_models
from kt_models import tiny

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

ARCHS = kt_models.supported_model_types()


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, torch.nn.Module]:
    """One tiny model per registered architecture (do not mutate; clone first)."""
    return {t: tiny.build(t, seed=1) for t in ARCHS}


@pytest.fixture(scope="session")
def saved_tiny(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """``save_pretrained`` directories of the tiny models (single file)."""
    root = tmp_path_factory.mktemp("saved")
    return {t: tiny.save(m, root / t) for t, m in tiny_models.items()}


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test() -> None:
    """Each test starts from the same global RNG state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
