"""kt-accelerate: kt with Hugging Face accelerate, Trainer and torch.distributed."""

from __future__ import annotations

from kt_accelerate._version import __version__

__all__ = ["__version__"]
