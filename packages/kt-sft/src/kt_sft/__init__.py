"""kt-sft: LoRA fine-tuning of giant MoE models whose routed experts run on the CPU engine."""

from __future__ import annotations

from kt_sft._version import __version__

__all__ = ["__version__"]
