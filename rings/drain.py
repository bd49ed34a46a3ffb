"""``DrainWaiter``: what ``PacketPool.drained()`` returns, an awaitable for graceful shutdown.

rings must not import asyncio (it is pure), yet ``await pool.drained()`` must work inside asyncio code.
This module owns that bridge: an object that speaks asyncio's duck-typed future protocol and is woken
by the pool's drained-callback registry, with no polling.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator
from typing import Any, Protocol

__all__ = ["DrainWaiter", "fire_callbacks", "noop"]


def fire_callbacks(callbacks: list[Callable[[], None]]) -> None:
    """Run drained callbacks after the pool is consistent; one raising does not starve the others."""
    first: BaseException | None = None
    for callback in callbacks:
        try:
            callback()
        except Exception as err:  # re-raised below, after every callback had its turn
            first = first or err
    if first is not None:
        raise first


def noop() -> None:
    return None


class _Drainable(Protocol):
    @property
    def usage(self) -> int: ...

    def on_drained(self, callback: Callable[[], None]) -> Callable[[], None]: ...


class _Loop(Protocol):
    def call_soon(self, callback: Callable[..., object], *args: Any, context: Any = None) -> object: ...

    def call_soon_threadsafe(
        self, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> object: ...


def _running_loop() -> _Loop:
    # An asyncio Task accepts a foreign awaitable only if ``get_loop()`` answers with the Task's own
    # loop, and nothing but asyncio knows the running loop. rings must stay importable and usable
    # without asyncio, so it never imports it: a Task that awaits us has necessarily loaded it, and
    # we ask that already-loaded module (a lookup, not an import).
    asyncio_module = sys.modules.get("asyncio")
    if asyncio_module is None:
        raise RuntimeError("pool.drained() must be awaited from asyncio; elsewhere use pool.on_drained()")
    loop: _Loop = asyncio_module.get_running_loop()
    return loop


class DrainWaiter:
    """What ``pool.drained()`` returns: await it inside asyncio code.

    It follows asyncio's duck-typed future protocol (``_asyncio_future_blocking``, ``get_loop``,
    ``add_done_callback``, ``cancel``, ``result``), the same protocol ``asyncio.Future`` implements, so
    the awaiting Task suspends until the pool's drained callback fires, with no polling. The callback
    may fire on any thread (``pool.locked``), so it only hands over to the loop with
    ``call_soon_threadsafe``; all state changes happen on the loop's thread.

    Cancellation: ``cancel()`` unregisters from the pool, completes the waiter and returns False, as a
    future that finished just before cancel would; asyncio's Task then throws its own CancelledError
    into the awaiting coroutine, so rings never has to name that exception.
    """

    def __init__(self, source: _Drainable) -> None:
        self._source = source
        self._loop: _Loop | None = None
        self._done = False
        self._unregister: Callable[[], None] | None = None
        self._callbacks: list[tuple[Callable[[DrainWaiter], object], Any]] = []
        # An instance attribute only: asyncio.isfuture() looks at the class, so asyncio wraps this
        # awaitable in a Task (ensure_future, gather, wait_for) rather than treating it as a Future.
        self._asyncio_future_blocking: bool | None = None

    def __await__(self) -> Generator[DrainWaiter, None, None]:
        if self._done or self._source.usage == 0:
            self._done = True
            return
        self._loop = _running_loop()
        self._unregister = self._source.on_drained(self._signal)
        self._asyncio_future_blocking = True
        yield self  # the Task calls get_loop() and add_done_callback(), then sleeps
        if not self._done:
            raise RuntimeError("pool.drained() was resumed before the pool drained: await it in a Task")

    def _signal(self) -> None:
        # Called by the pool, possibly on another thread: hop to the loop before touching state.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._complete)

    def _complete(self) -> None:
        if self._done:
            return
        assert self._loop is not None
        self._done = True
        self._unregister = None
        for callback, context in self._callbacks:
            self._loop.call_soon(callback, self, context=context)
        self._callbacks.clear()

    # -- the duck-typed future protocol (asyncio.Future's names and meanings) -------------------------

    def get_loop(self) -> _Loop:
        if self._loop is None:
            raise RuntimeError("this DrainWaiter is not bound to a loop yet")
        return self._loop

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def result(self) -> None:
        if not self._done:
            raise RuntimeError("the pool has not drained yet")

    def exception(self) -> None:
        self.result()

    def add_done_callback(self, fn: Callable[[DrainWaiter], object], *, context: Any = None) -> None:
        if self._done:
            self.get_loop().call_soon(fn, self, context=context)
        else:
            self._callbacks.append((fn, context))

    def remove_done_callback(self, fn: Callable[[DrainWaiter], object]) -> int:
        kept = [(f, c) for f, c in self._callbacks if f != fn]
        removed = len(self._callbacks) - len(kept)
        self._callbacks[:] = kept
        return removed

    def cancel(self, msg: Any = None) -> bool:
        if self._done:
            return False
        if self._unregister is not None:
            self._unregister()
        self._complete()
        return False
