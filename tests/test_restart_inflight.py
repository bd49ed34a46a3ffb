"""Backend crash and restart with inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), no VM.

The server runs in a child process (a real crash: SIGKILL) with a port that never completes every
other TX batch, so chains are in flight out of order when it dies. The Python frontend keeps guest
RAM, the rings and the inflight buffer, reconnects to a fresh server on the same socket path as QEMU
does (the whole handshake, SET_INFLIGHT_FD, each ring's base = its used index), and every chain it
posted must come back exactly once: the driver model refuses a completion for a head not in flight.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from nicsim.frontend import VhostUserFrontend
from nicsim.ports import SinkPort, TxFrames
from nicsim.server import Server
from nicsim.virtio.device import VirtioNetDevice
from rings.driver import DriverQueue
from rings.errors import DeviceError
from tests.hardening import describe_fds, frame, open_fds, until

T = TypeVar("T")
BASE = 40000  # where the rings start: the backend's first re-arm of kicks is then visible (below)


class HalfHoldingPort(SinkPort):
    """Completes every other TX batch and holds the rest forever (a port stuck on a slow device)."""

    name = "half-holding"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.held: list[TxFrames] = []

    def transmit(self, batch: TxFrames) -> bool:
        self.calls += 1
        if self.calls % 2:
            self.held.append(batch)
            return False
        return super().transmit(batch)


def _serve(path: str, holding: bool) -> None:
    async def main() -> None:
        port = HalfHoldingPort if holding else SinkPort
        async with Server([path], lambda: VirtioNetDevice(port=port())):
            await asyncio.Event().wait()

    asyncio.run(main())


def _start(path: Path, holding: bool) -> multiprocessing.process.BaseProcess:
    proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(str(path), holding), daemon=True)
    proc.start()
    return proc


async def _retry(proc: multiprocessing.process.BaseProcess, attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt`` until the child's socket accepts (it is bound just before it listens)."""
    async with asyncio.timeout(30):
        while True:
            assert proc.is_alive()
            try:
                return await attempt()
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.05)


def _backend_asleep(q: DriverQueue) -> bool:
    """The backend took every chain posted on ``q`` and sleeps until the next kick, with no timer: it
    re-armed kicks for the very next entry, ``avail_event == avail.idx`` (§2.7.10; while it works it
    writes ``last_avail_idx - 1`` there, and while it waits for a batch ``last_avail_idx + batch``).
    A batch posted now is then taken whole, in one port call. ``avail_event`` starts at 0 and the
    rings at BASE, so this holds only once the backend has run."""
    return q.avail_event == q.avail_idx


def _kill(proc: multiprocessing.process.BaseProcess) -> None:
    """SIGKILL our child by pid, reap it, release its sentinel fd. Idempotent."""
    try:
        alive = proc.is_alive()
    except ValueError:  # already closed
        return
    if alive and proc.pid is not None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    proc.close()


async def _crash_and_recover(tmp_path: Path, *, inflight: bool) -> tuple[int, int, int]:
    """Returns (completions before the crash, after it, resubmitted-or-repopped count)."""
    path = tmp_path / "nicsim.sock"
    first = _start(path, holding=True)
    second = None
    fe: VhostUserFrontend | None = None
    try:
        fe = await _retry(first, lambda: VhostUserFrontend.connect(path))
        await fe.handshake(inflight=inflight)
        if inflight:
            await fe.setup_inflight()
        await fe.start(base=BASE)
        tx = fe.queues[1]
        # Eight batches of 8, each kicked on its own and taken whole: batches 1, 3, 5, 7 are held.
        for b in range(8):
            await until(lambda: _backend_asleep(tx), f"the backend asleep before batch {b}")
            fe.transmit([frame(b * 8 + i) for i in range(8)])
        await until(lambda: _backend_asleep(tx), "the backend asleep after batch 7")
        assert tx.used_pending() == 32  # four batches completed, four held (a merged batch changes it)
        before = await fe.wait_used(1, 32)
        assert fe.queues[1].in_flight == 32
        _kill(first)  # SIGKILL: nothing returned, the inflight buffer and the rings survive
        second = _start(path, holding=False)
        await _retry(second, lambda: fe.reconnect(path))
        fe.kick(1, force=True)  # the guest's next post would kick; do not depend on its timing
        after = await fe.wait_used(1, 32)
        # No completion beyond those 32: a marker chain posted now must be the very next one used
        # (the driver model refuses a head that is not in flight, so a repeat cannot hide behind it).
        marker = tx.post_tx(frame(99))
        fe.kick(1, force=True)
        (done,) = await fe.wait_used(1, 1)
        assert done.id == marker
        extra = tx.used_pending()
        return len(before), len(after), extra
    finally:
        if fe is not None:
            await fe.close()
        _kill(first)
        if second is not None:
            _kill(second)


async def test_restart_after_sigkill_completes_every_chain_in_flight_exactly_once(tmp_path: Path) -> None:
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # spawn's process-wide helper (its pipe lives as long as we do)
    before = open_fds()
    got_before, got_after, extra = await _crash_and_recover(tmp_path, inflight=True)
    assert (got_before, got_after, extra) == (32, 32, 0)
    leaked = open_fds() - before
    assert not leaked, describe_fds(leaked)


async def test_without_inflight_the_same_crash_completes_chains_twice(tmp_path: Path) -> None:
    """The control: with no inflight buffer the new backend can only resume at the used index, so it
    takes heads that were already returned again: the driver model sees a completion for a head that
    is not in flight."""
    with pytest.raises(DeviceError, match="not in flight"):
        await _crash_and_recover(tmp_path, inflight=False)
