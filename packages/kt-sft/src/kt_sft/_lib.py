"""The only importer of kt_kernels in kt-sft: checks the compiled engine's version once."""

from __future__ import annotations

import kt_kernels

__all__ = ["MIN_KT_KERNELS_VERSION", "kt_kernels", "kt_kernels_version"]

MIN_KT_KERNELS_VERSION = (0, 1, 0)


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def kt_kernels_version() -> tuple[int, ...]:
    """Return the installed kt-kernels version as a tuple of ints."""
    return _parse(kt_kernels.__version__)


if kt_kernels_version() < MIN_KT_KERNELS_VERSION:
    raise ImportError(
        f"kt-sft needs kt-kernels >= {'.'.join(map(str, MIN_KT_KERNELS_VERSION))}, "
        f"found {kt_kernels.__version__}: run `pip install -U kt-kernels`."
    )
