"""The error every refused export raises."""

from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(ValueError):
    """The adapter, the base checkpoint or the output directory cannot be used for an export;
    the message names the file, tensor or feature and says why."""
