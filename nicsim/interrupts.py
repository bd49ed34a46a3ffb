"""Ctrl-C and SIGTERM as exceptions, for every command to unwind the same way.

This module owns :class:`Terminated` (what SIGTERM raises, where Ctrl-C raises ``KeyboardInterrupt``),
:func:`terminated` (the SIGTERM handler that raises it) and :func:`interrupts_kept` (both signals kept
through work that swallows exceptions).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "interrupts_kept", "terminated"]


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised where Ctrl-C's KeyboardInterrupt would be, so the same cleanup runs."""


def terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler: raise :class:`Terminated` where the program is."""
    raise Terminated


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Ctrl-C and SIGTERM during work that may swallow the exception they raise: numba compiles with
    Python callbacks called through ctypes, which print an exception raised in them and drop it (seen:
    a SIGTERM mid-compile left ``nicsim serve`` running on its numpy path). Each signal still raises
    where it lands, and raises again when the work returns if it was lost there."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (only the main thread receives signals and may set handlers)
        return
    seen: list[type[KeyboardInterrupt]] = []

    def on_signal(signum: int, frame: object) -> None:
        seen.append(Terminated if signum == signal.SIGTERM else KeyboardInterrupt)
        raise seen[-1]

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if seen:
        raise seen[0]
