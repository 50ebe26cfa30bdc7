"""kt-accelerate's installed metadata states the dependency graph the project promises."""

from __future__ import annotations

import importlib.metadata

import kt_accelerate


def _requires(dist: str) -> list[str]:
    return importlib.metadata.requires(dist) or []


def test_version_matches_metadata() -> None:
    assert importlib.metadata.version("kt-accelerate") == kt_accelerate.__version__


def test_dependency_direction() -> None:
    names = {
        r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip()
        for r in _requires("kt-accelerate")
    }
    assert {"kt-sft", "accelerate", "transformers"} <= names
    # kt-sft reaches kt-accelerate only through its optional extra.
    sft = _requires("kt-sft")
    assert all("extra ==" in r for r in sft if r.startswith("kt-accelerate"))
    assert any(r.startswith("kt-accelerate") for r in sft)
