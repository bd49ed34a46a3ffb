"""A one-shot timer on the event loop that fires within microseconds of its time: a Linux timerfd.

asyncio's ``call_later`` cannot time anything under a millisecond: its epoll selector rounds every
wait up to whole milliseconds, so a timer 0.3 ms away fires up to a millisecond late (measured here:
a TX pump's poll for a request due in 10.45 ms, set for 10.15 ms, fired before the request in 3 of
about 150 periods). A timerfd is an fd the loop already knows how to wait on, and the kernel wakes it at its
nanosecond expiry. Python has ``os.timerfd_create`` only from 3.13, so libc's is called through ctypes.
The fd is this object's: :meth:`close` closes it (and the loop stops watching it).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable

_CLOCK_MONOTONIC = 1  # the clock of time.monotonic() and of asyncio's default loop
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]


class PreciseTimer:
    """Call ``callback`` once at a ``time.monotonic()`` instant set by :meth:`set_at`, on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._spec = _Itimerspec()
        self._armed = False
        fd = _libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self._fd: int | None = fd
        loop.add_reader(fd, self._fire)

    @property
    def armed(self) -> bool:
        return self._armed

    def set_at(self, when: float) -> None:
        """Fire at ``when`` (seconds on the monotonic clock; at once if past), replacing any earlier time."""
        if self._fd is None:
            raise ValueError("the timer is closed")
        when = max(when, 1e-9)  # an all-zero it_value would disarm the timer
        sec = int(when)
        self._spec.it_value.tv_sec = sec
        self._spec.it_value.tv_nsec = int((when - sec) * 1e9)
        self._settime()
        self._armed = True

    def cancel(self) -> None:
        """Do not fire (a no-op if not set)."""
        if self._armed and self._fd is not None:
            self._spec.it_value.tv_sec = self._spec.it_value.tv_nsec = 0
            self._settime()
        self._armed = False

    def close(self) -> None:
        """Stop watching the fd and close it; idempotent."""
        self._armed = False
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def _settime(self) -> None:
        assert self._fd is not None
        if _libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def _fire(self) -> None:
        assert self._fd is not None
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return  # re-set or cancelled after the expiry woke the loop: not due
        if self._armed:
            self._armed = False
            self._callback()
