"""One virtqueue's notifications on the event loop: the kick and call eventfds and the polling loop.

This module owns ``RingPump``: it watches the ring's kick eventfd with ``loop.add_reader``, writes the
call eventfd only when a device result says ``interrupt`` (the device has already asked the ring:
EVENT_IDX or the NO_INTERRUPT flag), and runs the device's rounds following :mod:`nicsim.policy`:
on a kick, suppress further kicks and run rounds with ``loop.call_soon`` while work flows; when the
policy says REARM, re-enable kicks with a re-check (``rearm_kicks``) and sleep only if nothing came in.
An RX ring sleeps once its port has nothing to offer, and wakes on the device's ``on_wakeup``; a
pull-style port (the generator) that is starved of guest buffers sleeps on the kick, not on a timer,
so a guest with no buffers posted costs no CPU. It owns the three eventfds it is given and closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections.abc import Callable

from nicsim.device import DeviceStateError, QueueResult, VirtioNetDevice
from nicsim.policy import PollAction, poll_action
from nicsim.ports.base import Port
from rings.errors import RingsError

log = logging.getLogger("nicsim.server")

_ONE = struct.pack("=Q", 1)
_RETRY_S = 0.001  # pool exhausted, or a rate-limited port: look again this much later


def _pull_style(port: Port) -> bool:
    return type(port).poll_rx is not Port.poll_rx


class RingPump:
    """Kick/call/err eventfds of ring ``index`` and the loop that runs the device on it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        device: VirtioNetDevice,
        index: int,
        *,
        after_tx: Callable[[int], None] | None = None,
    ) -> None:
        self.loop = loop
        self.device = device
        self.index = index
        self.after_tx = after_tx  # told the pair after a TX round did work (replies may be queued)
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.active = False  # the device queue runs and the ring is enabled
        self.broken = False
        self._watching = False
        self._busy = False
        self._handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._empty_rounds = 0
        self._last_work = 0.0

    # -- fds --------------------------------------------------------------------------------------

    def set_kick(self, fd: int | None) -> None:
        self._unwatch()
        _close(self.kick_fd)
        self.kick_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
        if self.active:
            self._watch()
            self.wake()  # the guest may have kicked the old fd in between

    def set_call(self, fd: int | None) -> None:
        _close(self.call_fd)
        self.call_fd = fd

    def set_err(self, fd: int | None) -> None:
        _close(self.err_fd)
        self.err_fd = fd

    # -- lifecycle --------------------------------------------------------------------------------

    def activate(self) -> None:
        """The device queue started and the ring is enabled: watch kicks and look at the ring once."""
        if self.active:
            return
        self.active, self.broken = True, False
        self._watch()
        self.wake()

    def deactivate(self) -> None:
        """Stop watching and polling (the device queue itself is stopped by the caller)."""
        self.active = False
        self._unwatch()
        self._cancel()

    def close(self) -> None:
        """Deactivate and close every eventfd; idempotent."""
        self.deactivate()
        for name in ("kick_fd", "call_fd", "err_fd"):
            _close(getattr(self, name))
            setattr(self, name, None)

    # -- running ----------------------------------------------------------------------------------

    def wake(self) -> None:
        """Run rounds from the next loop iteration on, unless already running."""
        if not self.active or self.broken or self._busy:
            return
        try:
            self.device.suppress_kicks(self.index)
        except (RingsError, DeviceStateError) as err:
            self._fail(err)
            return
        self._busy = True
        self._empty_rounds = 0
        self._last_work = time.monotonic()
        self._handle = self.loop.call_soon(self._round)

    def signal(self) -> None:
        """Interrupt the guest (write the call eventfd)."""
        if self.call_fd is None:
            return
        try:
            os.write(self.call_fd, _ONE)
        except BlockingIOError:
            pass  # the counter is saturated: the guest has an interrupt pending anyway
        except OSError as err:
            log.warning("ring %d: call eventfd write failed: %s", self.index, err)

    def _on_kick(self) -> None:
        assert self.kick_fd is not None
        try:
            os.read(self.kick_fd, 8)
        except BlockingIOError:
            return
        except OSError as err:
            log.warning("ring %d: kick eventfd read failed: %s", self.index, err)
            self._unwatch()
            return
        self.device.kicked(self.index)
        self.wake()

    def _round(self) -> None:
        self._handle = None
        if not self.active:
            self._busy = False
            return
        now = time.monotonic()
        tx = self.index % 2 == 1
        try:
            res = self.device.process_tx(self.index) if tx else self.device.poll_rx(self.index // 2, now)
        except (RingsError, DeviceStateError) as err:
            self._fail(err)
            return
        except Exception:
            # A port raised: the device returned the chains and counted them as port_error.
            log.exception("ring %d: the port raised; its batch was dropped", self.index)
            res = QueueResult(queue=self.index, more=True)
        if res.interrupt:
            self.signal()
        if res.error is not None:
            self._fail(res.error)
            return
        if res.processed:
            self._empty_rounds, self._last_work = 0, now
            if tx and self.after_tx is not None:
                self.after_tx(self.index // 2)
        else:
            self._empty_rounds += 1
        if res.blocked:
            self._later(_RETRY_S)
            return
        action = poll_action(self.device.policy, more=res.more, empty_rounds=self._empty_rounds,
                             idle_us=(now - self._last_work) * 1e6)  # fmt: skip
        if action is not PollAction.REARM:
            self._handle = self.loop.call_soon(self._round)
            return
        self._rearm(tx)

    def _rearm(self, tx: bool) -> None:
        if not tx and not self._rx_has_work():
            # Nothing to deliver: sleep until the port wakes us (on_wakeup) or the guest kicks.
            self._sleep_armed()
            return
        try:
            quiet = self.device.rearm_kicks(self.index)
        except (RingsError, DeviceStateError) as err:
            self._fail(err)
            return
        if quiet and self.kick_fd is None:
            self._later(_RETRY_S)  # SET_VRING_KICK said "no fd": the frontend wants us to poll
        elif quiet:
            self._busy = False  # kicks are on and the ring was re-checked: sleep until a kick
        elif tx:
            self._handle = self.loop.call_soon(self._round)
        else:
            # Buffers are posted but the port offered nothing (rate limit) or the pool is short.
            self._later(_RETRY_S)

    def _rx_has_work(self) -> bool:
        port = self.device.port
        if _pull_style(port) and not getattr(port, "finished", False):
            return True
        return self.device.rx_backlog(self.index // 2) > 0

    def _sleep_armed(self) -> None:
        try:
            self.device.rearm_kicks(self.index)
        except (RingsError, DeviceStateError) as err:
            self._fail(err)
            return
        if self.kick_fd is None:
            self._later(_RETRY_S)
            return
        self._busy = False

    def _later(self, delay: float) -> None:
        self._handle = self.loop.call_later(delay, self._round)

    def _fail(self, err: Exception) -> None:
        # The guest broke the ring (or we called out of order): stop it until the frontend resets it.
        log.error("ring %d stopped: %s", self.index, err)
        self.broken = True
        self._busy = False
        self._unwatch()
        self._cancel()

    def _watch(self) -> None:
        if self.kick_fd is not None and not self._watching:
            self.loop.add_reader(self.kick_fd, self._on_kick)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching and self.kick_fd is not None:
            self.loop.remove_reader(self.kick_fd)
        self._watching = False

    def _cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._busy = False


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
