"""Ctrl-C during training: the first one asks for a graceful stop, a second one aborts."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

__all__ = ["StopFlag"]


class StopFlag:
    """SIGINT -> request a graceful stop; a second SIGINT raises KeyboardInterrupt at once.

    The handler is installed only on the main thread (Python delivers signals there) and the
    previous one is restored on exit.
    """

    def __init__(self, *, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print(
                "\nCtrl-C: stopping after the current micro-batch and saving a resumable "
                "checkpoint (press Ctrl-C again to abort without saving)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
