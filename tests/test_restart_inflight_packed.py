"""Backend crash and restart with inflight tracking on packed rings (VIRTIO_F_RING_PACKED with
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), no VM: ``tests/test_restart_inflight.py`` for the packed layout.

The server runs in a child process (a real crash: SIGKILL), either killed from outside while it holds
TX batches (a port that never completes every other batch, so chains are in flight out of order and
their ring slots hold other chains' used descriptors), or killing itself at a chosen point of a
completion on a TX or an RX ring: right after the inflight region recorded it (before ``push_used``),
in the middle of ``push_used`` (every used descriptor written but the first one's flags), or right
after it (before the region committed it). The Python frontend keeps guest RAM, the rings and the
inflight buffer, reconnects to a fresh server on the same socket path as QEMU does (the whole
handshake, SET_INFLIGHT_FD, SET_VRING_BASE from the ring), and then: every TX chain comes back
exactly once (the driver model refuses a completion for an id not in flight), every frame the ports
transmitted is on their record, twice only for a completion that was rolled back; every RX buffer
comes back once, with a frame or (the ones a rolled-back completion had filled) with length 0; and
traffic goes on both ways from where the rings are.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from nicsim.frontend import VhostUserFrontend
from nicsim.ports import Port, TxFrames
from nicsim.server import Server
from nicsim.virtio.device import VirtioNetDevice
from rings.driver import Completion, TxLayout
from rings.driver_packed import PackedDriverQueue
from rings.errors import DeviceError
from rings.packed_layout import PDESC_DTYPE, RING_EVENT_FLAGS_DESC, off_wrap
from tests.hardening import GUARD, describe_fds, frame, open_fds, until

T = TypeVar("T")
QSIZE = 128
BASE = 100  # both rings start near their end: they wrap within the first batches
SPORT = 14 + 20  # frame(n) is a UDP frame from port 1000 + n (Ethernet + IPv4 headers before it)
HDR = 12  # virtio_net_hdr_v1 ahead of every RX frame


def serial(data: bytes) -> int:
    return int.from_bytes(data[SPORT : SPORT + 2], "big") - 1000


class RecordingPort(Port):
    """Appends the serial of every frame it transmits to a file (it survives a SIGKILL), reflects the
    frames onto RX if asked, and with ``hold`` completes only every other batch (holding the rest)."""

    name = "recording"

    def __init__(self, log_path: str, *, hold: bool, reflect: bool) -> None:
        super().__init__()
        self.fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.hold, self.reflect = hold, reflect
        self.calls = 0
        self.held: list[TxFrames] = []

    def transmit(self, batch: TxFrames) -> bool:
        self.calls += 1
        if self.hold and self.calls % 2:
            self.held.append(batch)
            return False
        data, starts = batch.gather()
        serials = [serial(data[s : s + 40].tobytes()) for s in starts.tolist()]
        os.write(self.fd, "".join(f"{n}\n" for n in serials).encode())
        if self.reflect:
            self.sink.push_many(data, starts, batch.lengths, pair=batch.pair)
        return True

    def close(self) -> None:
        os.close(self.fd)

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls}


class CrashingHooks:
    """The inflight store's hooks, with a SIGKILL of this process at the ``nth`` completion on an RX
    (``where`` "rx") or TX ring at ``point``: "before" (the region recorded it, the ring not yet),
    "mid" (``push_used`` wrote every used descriptor but the first one's flags), "after" (the ring
    shows it, the region has not committed it)."""

    def __init__(self, inner: Any, dev: VirtioNetDevice, where: str, point: str, nth: int) -> None:
        self.inner, self.dev = inner, dev
        self.parity = 0 if where == "rx" else 1
        self.point, self.nth, self.seen = point, nth, 0

    def _due(self, index: int, point: str) -> bool:
        if index % 2 != self.parity or point != self.point:
            return False
        self.seen += 1
        return self.seen == self.nth

    def popped(self, *args: Any) -> None:
        self.inner.popped(*args)

    def filling(self, *args: Any) -> None:
        self.inner.filling(*args)

    def before_used(self, index: int, q: Any, heads: np.ndarray) -> None:  # type: ignore[type-arg]
        self.inner.before_used(index, q, heads)
        if self._due(index, "before"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._due(index, "mid"):
            mem = self.dev.mem
            assert mem is not None
            flags = mem.view_as(q.desc_addr, PDESC_DTYPE, q.size)["flags"]
            pos = q.used_pos
            first = int(flags[pos])
            q.push_used(mem, heads, np.zeros(heads.shape[0], np.uint32))
            flags[pos] = first  # the first flags store never happened
            os.kill(os.getpid(), signal.SIGKILL)

    def after_used(self, index: int, q: Any, heads: np.ndarray) -> None:  # type: ignore[type-arg]
        if self._due(index, "after"):
            os.kill(os.getpid(), signal.SIGKILL)
        self.inner.after_used(index, q, heads)


class CrashingDevice(VirtioNetDevice):
    crash: tuple[str, str, int] | None = None

    @property  # type: ignore[override]
    def inflight(self) -> Any:
        return VirtioNetDevice.inflight.fget(self)  # type: ignore[attr-defined]

    @inflight.setter
    def inflight(self, hooks: Any) -> None:
        if hooks is not None and self.crash is not None:
            hooks = CrashingHooks(hooks, self, *self.crash)
        VirtioNetDevice.inflight.fset(self, hooks)  # type: ignore[attr-defined]


def _serve(path: str, log_path: str, hold: bool, reflect: bool, crash: tuple[str, str, int] | None) -> None:
    async def main() -> None:
        def make() -> VirtioNetDevice:
            dev = CrashingDevice(port=RecordingPort(log_path, hold=hold, reflect=reflect))
            dev.crash = crash
            return dev

        async with Server([path], make):
            await asyncio.Event().wait()

    asyncio.run(main())


def _start(
    path: Path, log: Path, *, hold: bool = False, reflect: bool = False,
    crash: tuple[str, str, int] | None = None,
) -> multiprocessing.process.BaseProcess:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_serve, args=(str(path), str(log), hold, reflect, crash), daemon=True)
    proc.start()
    return proc


def _dead(proc: multiprocessing.process.BaseProcess) -> bool:
    return not proc.is_alive()


async def _retry(proc: multiprocessing.process.BaseProcess, attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt`` until the child's socket accepts (it is bound just before it listens)."""
    async with asyncio.timeout(30):
        while True:
            assert proc.is_alive()
            try:
                return await attempt()
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.05)


def _kill(proc: multiprocessing.process.BaseProcess | None) -> None:
    """SIGKILL our child by pid (if it still runs), reap it, release its sentinel fd. Idempotent."""
    if proc is None:
        return
    try:
        alive = proc.is_alive()
    except ValueError:  # already closed
        return
    if alive and proc.pid is not None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    proc.close()


def _backend_asleep(q: PackedDriverQueue) -> bool:
    """The backend took every chain posted on ``q`` and sleeps until the next kick, with no timer: it
    asked for a kick at the very next descriptor (§2.8.10, RING_EVENT_FLAGS_DESC at the driver's next
    avail position; while it waits for a batch it names a later one). The event starts zeroed and the
    ring at BASE, so this holds only once the backend has run."""
    return q.device_event == (off_wrap(q.next_avail, q.avail_wrap), RING_EVENT_FLAGS_DESC)


def _sent(log: Path) -> collections.Counter[int]:
    return collections.Counter(int(x) for x in log.read_text().split())


async def _connect(
    path: Path, proc: multiprocessing.process.BaseProcess, *, inflight: bool
) -> VhostUserFrontend:
    fe = await _retry(proc, lambda: VhostUserFrontend.connect(path, queue_size=QSIZE))
    fe.ram.fill_guards(GUARD)
    await fe.handshake(packed=True, inflight=inflight)
    if inflight:
        await fe.setup_inflight()
    await fe.start(base=BASE)
    assert fe.packed
    return fe


# -- killed from outside while TX batches are held -----------------------------------------------------


async def _held_tx_crash(tmp_path: Path, *, inflight: bool) -> tuple[int, int, int, collections.Counter[int]]:
    """Returns (completions before the crash, after it, extra completions, frames the ports sent)."""
    path, log = tmp_path / "nicsim.sock", tmp_path / "sent.log"
    first = _start(path, log, hold=True)
    second = None
    fe: VhostUserFrontend | None = None
    try:
        fe = await _connect(path, first, inflight=inflight)
        tx = fe.queues[1]
        assert isinstance(tx, PackedDriverQueue)
        # Eight batches of 8, each kicked on its own and taken whole: batches 1, 3, 5, 7 are held. One,
        # two and indirect descriptors per chain, so chains take different numbers of ring slots.
        layouts = [TxLayout.ONE, TxLayout.TWO, TxLayout.INDIRECT]
        for b in range(8):
            await until(lambda: _backend_asleep(tx), f"the backend asleep before batch {b}")
            fe.transmit([frame(b * 8 + i) for i in range(8)], layout=layouts[b % 3])
        await until(lambda: _backend_asleep(tx), "the backend asleep after batch 7")
        assert tx.used_pending() == 32  # four batches completed, four held
        before = await fe.wait_used(1, 32)
        assert tx.in_flight == 32
        _kill(first)  # SIGKILL: nothing returned, the inflight buffer and the rings survive
        second = _start(path, log)
        await _retry(second, lambda: fe.reconnect(path))  # type: ignore[union-attr]
        fe.kick(1, force=True)  # the guest's next post would kick; do not depend on its timing
        after = await fe.wait_used(1, 32)
        # No completion beyond those 32: a marker chain posted now must be the very next one used.
        marker = tx.post_tx(frame(99))
        fe.kick(1, force=True)
        (done,) = await fe.wait_used(1, 1)
        assert done.id == marker
        extra = tx.used_pending()
        assert fe.ram.guards_intact(GUARD), "a backend wrote outside guest memory"
        return len(before), len(after), extra, _sent(log)
    finally:
        if fe is not None:
            await fe.close()
        _kill(first)
        _kill(second)


async def test_packed_restart_after_sigkill_completes_every_chain_in_flight_exactly_once(
    tmp_path: Path,
) -> None:
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # spawn's process-wide helper (its pipe lives as long as we do)
    before = open_fds()
    got_before, got_after, extra, sent = await _held_tx_crash(tmp_path, inflight=True)
    assert (got_before, got_after, extra) == (32, 32, 0)
    # Every frame on the wire once: the held ones by the new backend only, none lost, none twice.
    assert sent == collections.Counter([*range(64), 99])
    leaked = open_fds() - before
    assert not leaked, describe_fds(leaked)


async def test_packed_without_inflight_the_same_crash_completes_chains_twice(tmp_path: Path) -> None:
    """The control: with no inflight buffer the new backend resumes at the used position the ring
    shows, so it takes chains again whose slots it had read before (and completed): the driver model
    sees a used id that is not in flight."""
    with pytest.raises(DeviceError, match="not in flight"):
        await _held_tx_crash(tmp_path, inflight=False)


# -- killing itself inside a completion ------------------------------------------------------------------


def _reap(q: PackedDriverQueue, into: list[Completion]) -> int:
    got = q.reap()
    into.extend(got)
    return len(got)


@pytest.mark.parametrize("nth", [3, 4])  # the 3rd round has 8 chains (a short round), the 4th 20
@pytest.mark.parametrize("point", ["before", "mid", "after"])
@pytest.mark.parametrize("where", ["tx", "rx"])
async def test_packed_crash_inside_a_completion_loses_and_repeats_nothing(
    tmp_path: Path, where: str, point: str, nth: int
) -> None:
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    fds_before = open_fds()
    await _self_crash(tmp_path, where, point, nth)
    leaked = open_fds() - fds_before
    assert not leaked, describe_fds(leaked)


async def _self_crash(tmp_path: Path, where: str, point: str, nth: int) -> None:
    path, log = tmp_path / "nicsim.sock", tmp_path / "sent.log"
    first = _start(path, log, reflect=True, crash=(where, point, nth))
    second = None
    fe: VhostUserFrontend | None = None
    try:
        fe = await _connect(path, first, inflight=True)
        rx, tx = fe.queues[0], fe.queues[1]
        assert isinstance(rx, PackedDriverQueue) and isinstance(tx, PackedDriverQueue)
        tx_done: list[Completion] = []
        rx_done: list[Completion] = []
        fe.post_rx(QSIZE)
        posted = 0
        sizes = [3, 12, 8, 20, 1, 16, 5, 9]  # short rounds (<= 8 chains) and numpy rounds
        # Traffic both ways (every frame reflected onto RX) until the backend kills itself. A batch is
        # posted only once the previous one is done: its TX chains used, the backend asleep, and a
        # request answered (the backend's loop runs the RX round the reflected frames woke before it
        # reads the request), so nothing is posted while the backend is dying: a ring started again
        # but not enabled yet discards what it finds (vhost-user "Ring states").
        for b in range(60):
            k = sizes[b % len(sizes)]
            fe.transmit([frame(posted + i) for i in range(k)], layout=TxLayout.TWO if b % 3 else TxLayout.ONE)
            posted += k
            await until(lambda: _dead(first) or (tx.used_pending() == tx.in_flight and _backend_asleep(tx)),
                        f"batch {b} completed")  # fmt: skip
            if not _dead(first):
                try:
                    await fe.get_features()
                except (ConnectionError, OSError, TimeoutError):
                    await until(lambda: _dead(first), "the backend died answering")
            if _dead(first):
                break
            _reap(tx, tx_done)
            _reap(rx, rx_done)
            fe.post_rx(QSIZE - rx.in_flight)
        assert _dead(first), "the backend never reached its crash point"
        _kill(first)
        first = None  # type: ignore[assignment]
        _reap(tx, tx_done)
        _reap(rx, rx_done)
        second = _start(path, log, reflect=True)
        await _retry(second, lambda: fe.reconnect(path))  # type: ignore[union-attr]
        fe.kick(0, force=True)
        fe.kick(1, force=True)
        # Every TX chain in flight at the crash comes back (once: the driver model checks).
        await until(lambda: _reap(tx, tx_done) >= 0 and tx.in_flight == 0, "every TX chain completed")
        assert len(tx_done) == posted
        # Then frames until every RX buffer posted before the crash has come back.
        while rx.in_flight:
            want = len(rx_done) + min(8, rx.in_flight)
            fe.transmit([frame(posted + i) for i in range(8)])
            posted += 8
            await until(lambda: _reap(tx, tx_done) >= 0 and tx.in_flight == 0, "TX after the restart")
            await until(lambda w=want: _reap(rx, rx_done) >= 0 and len(rx_done) >= w,  # type: ignore[misc]
                        "RX after the restart")  # fmt: skip
        assert len(tx_done) == posted
        sent = _sent(log)
        assert set(sent) == set(range(posted)), "a TX frame never reached the port"
        twice = sorted(n for n, c in sent.items() if c > 1)
        rolled_back = where == "tx" and point != "after"
        if rolled_back:
            # The port had sent the round the crash interrupted; its completion never reached the
            # ring, so the chains were resubmitted and sent again (the wire sees them twice, the
            # guest completes them once). Nothing else repeats.
            assert twice and len(twice) <= 20 and max(sent.values()) == 2
        else:
            assert not twice, twice
        got = [c for c in rx_done if c.len > 0]
        empty = [c for c in rx_done if c.len == 0]
        for c in got:
            assert c.data is not None and len(c.data) == c.len
        received = collections.Counter(serial(c.data[HDR:]) for c in got if c.data is not None)
        assert set(received) <= set(range(posted))
        assert all(v == 1 or n in twice for n, v in received.items()), "an RX frame delivered twice"
        if where == "rx" and point != "after":
            # The buffers the interrupted round had filled were not published: given back, empty.
            assert empty
        else:
            assert not empty
        assert fe.ram.guards_intact(GUARD), "a backend wrote outside guest memory"
    finally:
        if fe is not None:
            await fe.close()
        _kill(first)
        _kill(second)
