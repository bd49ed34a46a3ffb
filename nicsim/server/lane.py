"""A queue pair's request lane: its requests served by a compiled call in a thread of its own.

This module owns ``RequestLane``: when the pair's TX pump has just served a request
(:meth:`offer`), and the pair can be served so (:func:`nicsim.virtio.lane.prepare`), it parks both
rings' pumps (no kick watched, no timer, no watchdog) and the port's descriptor watch, and runs the
lane (:mod:`nicsim.ports.lane_kernel`) in its thread. The lane waits on the kick and the TAP itself
and answers each request without the event loop. When it returns (no request for
``lane_idle_ms``, traffic that is not requests, anything the general path must see) the loop
books what it did (:func:`nicsim.virtio.lane.settle`), and the pumps take the rings back and look
at them at once. Anything that changes the rings from the loop's side (a vhost-user message, a
stats read, closing) first takes them back with :meth:`stop`, which asks the lane to return
(its stop eventfd) and waits for it: the rings have one owner at any time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import time

from nicsim.server.pump import RingPump
from nicsim.virtio import lane_layout
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.lane import LaneCall, LaneSettings

log = logging.getLogger("nicsim.server")

_PR_SET_TIMERSLACK = 29  # <linux/prctl.h>
_STOP_WAIT_S = 5.0  # a lane returns within a round of its stop flag; longer is a bug
_BURST_CHAINS = 8  # a round of more chains than this is traffic: the pumps' batches serve it
# After the lane gave the pair back for traffic (a burst, a GSO frame, a frame for several buffers),
# it is not offered the pair again for this long. Without it a TCP sender's odd small round handed
# the pair over and its next GSO frame took it back: 400-700 hand-overs in a 3 s tcp-tx run.
_BACKOFF_S = 0.1
_TRAFFIC = frozenset({lane_layout.WHY_BURST, lane_layout.WHY_DECLINED, lane_layout.WHY_RX_PENDING,
                      lane_layout.WHY_NO_BUFFER})  # fmt: skip

LANE_COUNTERS = ("lane_runs", *(f"lane_{name}" for name in lane_layout.COUNT_NAMES if name != "most"),
                 *(f"lane_end_{name}" for name in lane_layout.WHY_NAMES))  # fmt: skip


def _exact_timers() -> None:
    """The lane's thread: its ppoll timeouts end when asked (timer slack 1 us, not Linux's 50 us
    default), so a window opened ahead of a request opens on time."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)


class RequestLane:
    """The request lane of queue pair ``pair`` (its pumps ``rx`` and ``tx``)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, device: VirtioNetDevice, rx: RingPump, tx: RingPump,
        pair: int = 0,
    ) -> None:  # fmt: skip
        self.loop = loop
        self.device = device
        self.rx, self.tx = rx, tx
        self.pair = pair
        self.counters = dict.fromkeys(LANE_COUNTERS, 0)
        self._stop_fd: int | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._running: concurrent.futures.Future[None] | None = None
        self._call: LaneCall | None = None
        self._not_before = 0.0  # no offer taken before this (monotonic): see _BACKOFF_S

    @property
    def running(self) -> bool:
        return self._running is not None

    def offer(self) -> bool:
        """The TX pump just served a request: run the lane if the pair can be served so. True: it
        runs, and both pumps are parked."""
        policy = self.device.policy
        if (self._running is not None or policy.lane_idle_ms <= 0 or policy.tx_irq_wait_us > 0
                or self.tx.kick_fd is None or not (self.rx.active and self.tx.active)
                or self.rx.broken or self.tx.broken):  # fmt: skip
            return False
        if time.monotonic() < self._not_before:
            return False
        if self._stop_fd is None:
            self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        settings = LaneSettings(
            kick_fd=self.tx.kick_fd, stop_fd=self._stop_fd,
            tx_call=-1 if self.tx.call_fd is None else self.tx.call_fd,
            rx_call=-1 if self.rx.call_fd is None else self.rx.call_fd,
            spin_ns=int(policy.rr_poll_us * 1e3), idle_ns=int(policy.lane_idle_ms * 1e6),
            warm_ns=int(policy.warm_tick_us * 1e3), burst_chains=_BURST_CHAINS,
            last_request_ns=time.monotonic_ns(), ahead_ns=int(policy.poll_ahead_us * 1e3),
            paced_max_ns=int(policy.warm_for_ms * 1e6),
        )  # fmt: skip
        call = self.device.lane_call(self.pair, settings)
        if call is None:
            return False
        self.tx.park()
        self.rx.park()
        self.device.port.hold_reads(self.pair)
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nicsim-lane",
                                                                 initializer=_exact_timers)  # fmt: skip
        self._call = call
        self.counters["lane_runs"] += 1
        running = self._running = self._thread.submit(call.run)
        running.add_done_callback(lambda f: self.loop.call_soon_threadsafe(self._returned, f))
        return True

    def stop(self) -> None:
        """Take the rings back now: ask the lane to return, wait for it, book what it did."""
        running = self._running
        if running is None:
            return
        assert self._stop_fd is not None and self._call is not None
        self._call.state[lane_layout.ST_STOP] = 1  # seen between rounds, also while the lane polls
        os.eventfd_write(self._stop_fd, 1)  # ...and wakes it from ppoll
        try:
            running.result(timeout=_STOP_WAIT_S)
        except concurrent.futures.TimeoutError:
            # A bug: the rings cannot be taken back while the lane may still write them. They stay
            # the lane's (its done callback books them when it returns); said loudly.
            log.error("pair %d: the request lane did not return within %.0f s of its stop; its rings "
                      "stay with it", self.pair, _STOP_WAIT_S)  # fmt: skip
            return
        except Exception:
            pass  # (the call raised: _returned says so)
        self._returned(running)

    def _returned(self, running: concurrent.futures.Future[None]) -> None:
        if running is not self._running:
            return  # already taken back by stop()
        call = self._call
        self._running = self._call = None
        assert call is not None
        if self._stop_fd is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._stop_fd)
        failed = running.exception()
        if failed is not None:
            log.error("pair %d: the request lane raised: %r", self.pair, failed)
        else:
            self.device.lane_settle(call)
            counters = self.counters
            for name, n in zip(lane_layout.COUNT_NAMES, call.counts.tolist(), strict=True):
                if name != "most":
                    counters[f"lane_{name}"] += n
            counters[f"lane_end_{lane_layout.WHY_NAMES[call.why]}"] += 1
            if call.why in _TRAFFIC:
                self._not_before = time.monotonic() + _BACKOFF_S
        self.device.port.release_reads(self.pair)
        self.rx.unpark()
        self.tx.unpark()

    def snapshot(self) -> dict[str, int]:
        return dict(self.counters)

    def close(self) -> None:
        """Take the rings back, end the thread, close the stop eventfd; idempotent."""
        self.stop()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._stop_fd is not None:
            os.close(self._stop_fd)
            self._stop_fd = None
