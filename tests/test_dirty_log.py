"""The dirty log of a live migration: every guest page the backend writes while VHOST_F_LOG_ALL is on
has its bit set, checked against what really changed in guest memory.

``DirtyLog`` alone first (pages of ranges, the log's end), then the whole path: the Python frontend
negotiates LOG_SHMFD, shares a log as QEMU does (SET_LOG_BASE, then SET_FEATURES with LOG_ALL while
the rings run) and sends and receives frames; every page of guest memory that changed and that the
driver did not write itself (its descriptor table, avail ring and TX buffers) must be in the log.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from nicsim.frontend import FrontendError, VhostUserFrontend
from nicsim.ports import GeneratorConfig, GeneratorPort, Port, SinkPort
from nicsim.ports.frames import ip_bytes, mac_bytes, udp_frame
from nicsim.server import Server
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_EVENT_IDX
from rings.dirty_log import PAGE_SHIFT, DirtyLog
from rings.layout import split_ring_sizes
from rings.pool import PacketPool

# -- the bitmap -----------------------------------------------------------------------------------------


def test_a_range_sets_the_bit_of_every_page_it_touches() -> None:
    log = DirtyLog(np.zeros(4, np.uint8))  # 32 pages
    log.mark(4095, 2)  # the last byte of page 0 and the first of page 1
    log.mark(5 * 4096, 3 * 4096 + 1)  # pages 5..8
    log.mark(31 * 4096, 0)  # no write, no page
    assert log.dirty_pages().tolist() == [0, 1, 5, 6, 7, 8]
    assert log.bitmap.tolist() == [0b11100011, 0b1, 0, 0]  # bit n is bit n % 8 of byte n // 8


def test_many_ranges_at_once_match_one_at_a_time() -> None:
    rng = np.random.default_rng(7)
    gpas = rng.integers(0, 60 * 4096, 200).astype(np.uint64)
    lens = rng.integers(0, 3 * 4096, 200).astype(np.uint32)
    batch, single = DirtyLog(np.zeros(8, np.uint8)), DirtyLog(np.zeros(8, np.uint8))
    batch.mark_ranges(gpas, lens)
    for g, n in zip(gpas.tolist(), lens.tolist(), strict=True):
        single.mark(g, n)
    assert batch.bitmap.tolist() == single.bitmap.tolist()
    expected = {
        p
        for g, n in zip(gpas.tolist(), lens.tolist(), strict=True)
        if n
        for p in range(g >> PAGE_SHIFT, ((g + n - 1) >> PAGE_SHIFT) + 1)
    }
    assert set(batch.dirty_pages().tolist()) == expected


def test_a_write_past_the_end_of_the_log_is_counted_not_lost_silently() -> None:
    log = DirtyLog(np.zeros(1, np.uint8))  # 8 pages
    log.mark(7 * 4096, 2 * 4096)
    log.mark_ranges(np.array([9 * 4096], np.uint64), np.array([10], np.uint32))
    assert log.dirty_pages().tolist() == [7] and log.beyond == 2


# -- through the backend ----------------------------------------------------------------------------


def frame(n: int) -> bytes:
    return udp_frame(
        dst_mac=mac_bytes("52:54:00:00:00:02"),
        src_mac=mac_bytes("52:54:00:12:34:56"),
        src_ip=ip_bytes("10.0.2.15"),
        dst_ip=ip_bytes("10.0.2.2"),
        sport=1000 + n,
        dport=9,
        size=60 + 7 * n,
    )


def pages_changed(fe: VhostUserFrontend, before: npt.NDArray[np.uint8]) -> set[int]:
    """Guest pages (by GPA) whose bytes differ from ``before`` (a copy of the RAM backing)."""
    now = fe.ram.backing
    out: set[int] = set()
    for r, off in zip(fe.ram.regions, fe.ram.offsets, strict=True):
        changed = np.flatnonzero(now[off : off + r.size] != before[off : off + r.size])
        out |= set(((changed + r.guest_phys_addr) >> PAGE_SHIFT).tolist())
    return out


def driver_pages(fe: VhostUserFrontend) -> set[int]:
    """Pages the driver itself writes: descriptor tables and avail rings (TX buffers: see the caller)."""
    out: set[int] = set()
    for q in fe.queues.values():
        dsize, asize, _ = split_ring_sizes(q.size)
        for addr, size in ((q.desc_addr, dsize), (q.avail_addr, asize)):
            out |= set(range(addr >> PAGE_SHIFT, ((addr + size - 1) >> PAGE_SHIFT) + 1))
    return out


async def serve(tmp_path: Path, port: Port) -> Server:
    server = Server([tmp_path / "s.sock"], lambda: VirtioNetDevice(port=port, pool=PacketPool(512)))
    await server.start()
    return server


@pytest.mark.parametrize("logging", [True, False], ids=["log-all", "log-shared-but-off"])
async def test_every_page_the_backend_writes_is_logged(tmp_path: Path, logging: bool) -> None:
    before_fds = set(os.listdir("/proc/self/fd"))
    server = await serve(tmp_path, GeneratorPort(GeneratorConfig(size=200, count=300)))
    try:
        fe = await VhostUserFrontend.connect(server.endpoints[0].path)
        await fe.handshake(log=True)
        await fe.start()
        bitmap = await fe.start_dirty_log()
        if not logging:
            await fe.stop_dirty_log()  # a cancelled migration: the log stays, nothing goes in it
        snapshot = fe.ram.backing.copy()
        got = 0
        for _ in range(6):  # the generator fills RX buffers as they are posted
            fe.post_rx(50)
            got += len(await fe.wait_used(0, 50))
        # What changed in guest memory, less what the driver wrote itself: the backend's writes.
        changed = pages_changed(fe, snapshot) - driver_pages(fe)
        # TX: the guest writes the buffers, the backend only the used ring.
        fe.transmit([frame(n) for n in range(40)])
        await fe.wait_used(1, 40)
        log = set(DirtyLog(bitmap).dirty_pages().tolist())
        assert got == 300 and len(changed) > 10, "the backend wrote RX buffers and the used ring"
        if logging:
            missed = changed - log
            assert not missed, f"pages the backend wrote and did not log: {sorted(missed)[:10]}"
            used_pages = {q.used_addr >> PAGE_SHIFT for q in fe.queues.values()}
            assert used_pages <= log  # both used rings, the TX one included
        else:
            assert not log
        del bitmap
        await fe.close()
    finally:
        await server.close()
    await asyncio.sleep(0)
    assert set(os.listdir("/proc/self/fd")) == before_fds


async def test_log_all_may_change_while_rings_run_and_nothing_else_may(tmp_path: Path) -> None:
    server = await serve(tmp_path, SinkPort())
    try:
        fe = await VhostUserFrontend.connect(server.endpoints[0].path)
        await fe.handshake(log=True)
        await fe.start()
        bitmap = await fe.start_dirty_log()
        await fe.stop_dirty_log()
        device = server.endpoints[0].session.device
        assert not device.logging and device.snapshot()["pool"]["usage"] == 0
        await fe.start_dirty_log()
        assert device.logging
        with pytest.raises(FrontendError):  # any other bit still may not change under running rings
            await fe.call(fe.conn.set_features(fe.features ^ (1 << VIRTIO_F_EVENT_IDX), need_reply=True))
        del bitmap
        await fe.close()
    finally:
        await server.close()
