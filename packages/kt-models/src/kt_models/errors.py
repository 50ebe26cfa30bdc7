"""Exceptions raised by kt-models.

Every error derives from :class:`KtModelsError`. Checkpoint errors carry the file and the tensor key
they are about (``path`` and ``key``, either may be ``None``) and name both in their message.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CheckpointError",
    "ConfigFieldError",
    "CorruptCheckpointError",
    "ExpertsReleasedError",
    "KtModelsError",
    "MissingScaleError",
    "MissingShardError",
    "MissingTensorError",
    "ModulePathError",
    "TensorShapeError",
    "UnsupportedArchitectureError",
    "UnsupportedTensorDtypeError",
]


class KtModelsError(Exception):
    """Base class of every error raised by kt-models."""


class UnsupportedArchitectureError(KtModelsError, ValueError):
    """The model type has no registry entry, or is known and refused (``reason`` says why)."""

    def __init__(
        self, message: str, *, model_type: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.model_type = model_type
        self.reason = reason


class ConfigFieldError(KtModelsError, ValueError):
    """A config lacks a field the registry needs (none of the accepted aliases is set)."""

    def __init__(self, message: str, *, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


class ModulePathError(KtModelsError, AttributeError):
    """A registry path does not resolve on the model's module tree."""


class ExpertsReleasedError(KtModelsError, RuntimeError):
    """The experts' weights were already released to the ``meta`` device."""


class CheckpointError(KtModelsError):
    """Base class of errors about checkpoint files; names the file and key when known."""

    def __init__(
        self, message: str, *, path: str | Path | None = None, key: str | None = None
    ) -> None:
        parts = [message]
        if key is not None:
            parts.append(f"key: {key!r}")
        if path is not None:
            parts.append(f"file: {str(path)!r}")
        super().__init__("; ".join(parts))
        self.path = Path(path) if path is not None else None
        self.key = key


class MissingShardError(CheckpointError, FileNotFoundError):
    """A shard named by the index (or the checkpoint itself) does not exist."""


class MissingTensorError(CheckpointError, LookupError):
    """A tensor the layout needs is absent from the index or from the shard the index names."""


class TensorShapeError(CheckpointError, ValueError):
    """A tensor's shape differs from what the config implies."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A safetensors file or index cannot be parsed (truncated, corrupt, not JSON...)."""


class MissingScaleError(CheckpointError, LookupError):
    """An FP8 weight has no ``weight_scale_inv`` block scales next to it."""


class UnsupportedTensorDtypeError(CheckpointError, TypeError):
    """A weight is stored in a dtype the reader does not decode."""
