"""What a training run carries from step to step and hands back: its state and its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NonFiniteLossError", "TrainResult", "TrainState"]


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN / Inf loss or gradient norm (``on_nonfinite_loss: error``).

    Raised before that step's optimizer update, so the parameters, the last checkpoint and any
    adapter written so far stay finite.
    """


@dataclass
class TrainState:
    """What a checkpoint needs to continue a run exactly where it stopped."""

    global_step: int = 0
    micro_index: int = 0  # micro-batches consumed (data position)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    log: list[dict[str, float]] = field(default_factory=list)  # per optimizer step
    skipped_steps: int = 0  # steps dropped by on_nonfinite_loss: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "micro_index": self.micro_index,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "log": self.log,
            "skipped_steps": self.skipped_steps,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        return cls(
            int(data["global_step"]),
            int(data["micro_index"]),
            int(data.get("tokens_seen", 0)),
            float(data.get("train_seconds", 0.0)),
            list(data.get("log", [])),
            int(data.get("skipped_steps", 0)),
        )


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None
    checkpoint_dir: Path | None
    interrupted: bool
    state: TrainState
    total_steps: int
    summary: dict[str, Any]
