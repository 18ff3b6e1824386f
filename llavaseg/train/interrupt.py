"""Ctrl-C between optimiser steps, never inside one.

An interrupt that lands inside ``optimizer.step()`` leaves some parameters updated and others not, so a
checkpoint taken then does not resume exactly. :class:`DeferredInterrupt` turns the first SIGINT into a flag
the training loop reads after each complete step (it then checkpoints and raises ``KeyboardInterrupt``); a
second Ctrl-C interrupts at once, for a loop that is stuck.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["DeferredInterrupt"]


class DeferredInterrupt:
    """Context manager: ``requested`` becomes true on the first SIGINT (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
