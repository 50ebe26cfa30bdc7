"""Checks that run before the compiled module loads, so an unsupported machine gets a Python
error instead of a crash."""

from __future__ import annotations

import platform

__all__ = ["check_platform"]


def check_platform() -> None:
    """Raise ImportError if this machine cannot run kt-kernels' compiled engine."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        raise ImportError(
            f"kt-kernels runs on x86-64 CPUs only; this machine is {platform.machine()!r}."
        )
