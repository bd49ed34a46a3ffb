"""One regression test per known vhost-user CVE class, against the real server over a real socket.

Each test drives nicsim with the Python frontend (and the driver model for descriptor-level cases),
sends what the CVE's exploit sent, and checks the three things a backend must keep true whatever the
frontend or the guest does (the guest and the frontend are untrusted): it keeps serving (frames still flow
both ways afterwards, through the reflect port), it touches nothing outside guest memory (the memfd's
guard bytes, which belong to no region, keep their pattern), and it leaks nothing (the process's fds are
exactly those it had before, and the pool's usage is 0 after the stop). See ``tests/hardening.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nicsim.frontend import FrontendError, VhostUserFrontend
from nicsim.vhost import Outgoing, Request
from nicsim.vhost import features as vf
from nicsim.vhost import payloads as p
from nicsim.vhost.protocol import FLAG_NEED_REPLY, HEADER, VERSION
from nicsim.virtio.features import VIRTIO_NET_F_MRG_RXBUF
from rings.driver import VIRTIO_NET_HDR_SIZE, Malformed
from tests.hardening import finish, frame, open_fds, start_rig


def _pipe() -> tuple[int, int]:
    return os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)


def backend_closed(read_end: int, write_end: int) -> bool:
    """Close our read end; True if no copy of it is left anywhere (a write then gets EPIPE). Closes both."""
    os.close(read_end)
    try:
        os.write(write_end, b"x")
    except BrokenPipeError:
        return True
    finally:
        os.close(write_end)
    return False


async def refused(fe: VhostUserFrontend, out: Outgoing) -> None:
    """Send ``out`` and check the backend refused it (a failure ack or an error reply)."""
    reply = await fe.call(out, check=False)
    assert reply is not None and not reply.ok, f"{reply} was accepted"


def region0(fe: VhostUserFrontend) -> p.MemoryRegionDesc:
    return fe.ram.region_descs()[0]


# -- CVE-2018-1059: an address range only partly inside a region ------------------------------------


async def test_cve_2018_1059_range_partly_inside_region(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    sess = await rig.session()
    r0_end, r0_uva, r0_size = fe.ram.regions[0].end, fe.ram.regions[0].user_addr, fe.ram.regions[0].size
    # A writable RX buffer that starts 32 bytes before region 0's end: its last 32 bytes would land in
    # the memfd's guard bytes if the device translated only the start (DPDK's gpa_to_vva before the fix).
    bad_rx = fe.queues[0].post_chain([(r0_end - 32, 64, True)])
    fe.post_rx(1)
    # TX chains partly outside memory, and across the boundary of two regions.
    fe.queues[1].post_malformed(Malformed.OUTSIDE_MEMORY)
    fe.queues[1].post_malformed(Malformed.SPANS_REGIONS)
    fe.transmit([frame(1)])
    tx = await fe.wait_used(1, 3)
    assert [c.len for c in tx] == [0, 0, 0]  # §2.7.8: broken chains are still returned
    rx = await fe.wait_used(0, 2)
    assert rx[0].id == bad_rx and rx[0].len == 0
    assert rx[1].data is not None and rx[1].data[12:][12:] == frame(1)[12:]
    assert fe.ram.guards_intact(), "the device wrote past the region's end"
    snap = sess.device.snapshot()
    assert sum(snap["queues"][1]["drops"].values()) == 2 and sum(snap["queues"][0]["drops"].values()) == 1
    # A ring whose used ring runs past region 0's end: the ring must not start (the ack says so).
    await fe.stop_ring(1)
    a = fe.queues[1].addresses
    tail = r0_uva + r0_size - 16
    await fe.call(fe.conn.set_vring_num(1, fe.queue_size, need_reply=True))
    await fe.call(fe.conn.set_vring_base(1, fe.used_idx(1), need_reply=True))
    await fe.call(fe.conn.set_vring_addr(1, desc=a.desc_uva, used=tail, avail=a.avail_uva, need_reply=True))
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        await refused(fe, fe.conn.set_vring_kick(1, kick, need_reply=True))
    finally:
        os.close(kick)
    assert "outside" in " ".join(sess.errors[-2:]) or "region" in " ".join(sess.errors[-2:])
    await fe.stop_ring(1)
    await fe.start_ring(1, base=fe.used_idx(1))
    assert fe.ram.guards_intact()
    await finish(rig, fe, before)


# -- CVE-2019-14818: extra or duplicate fds, repeated messages --------------------------------------


async def test_cve_2019_14818_extra_and_duplicate_fds_and_repeated_messages(
    tmp_path: Path
) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    # SET_MEM_TABLE with one region and three fds (two extra), then SET_VRING_CALL with the same fd twice.
    r, w = _pipe()
    await refused(fe, fe.conn.set_mem_table([region0(fe)], [fe.ram.fd, r, r], need_reply=True))
    assert backend_closed(r, w)
    r, w = _pipe()
    await refused(fe, fe.conn.request(Request.SET_VRING_CALL, p.U64(value=0), fds=(r, r), need_reply=True))
    assert backend_closed(r, w)
    # Repeated messages that each bring a new fd or change a ring: the old fd is closed every time,
    # nothing accumulates (the DPDK leak grew one fd per repeat).
    await fe.stop_ring(1)
    steady = len(os.listdir("/proc/self/fd"))
    for _ in range(100):
        await fe.call(fe.conn.set_vring_num(1, fe.queue_size, need_reply=True))
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            await fe.call(fe.conn.set_vring_err(1, efd, need_reply=True))
        finally:
            os.close(efd)
    assert len(os.listdir("/proc/self/fd")) == steady + 1  # only the latest err fd is held
    for _ in range(50):
        await fe.set_memory_table()  # each replacement unmaps and closes the previous table
    assert len(os.listdir("/proc/self/fd")) == steady + 1
    await fe.start_ring(1, base=fe.used_idx(1))
    await finish(rig, fe, before)


# -- CVE-2020-10722: size + offset overflow -----------------------------------------------------------


async def test_cve_2020_10722_size_plus_offset_overflow_in_log_base_and_regions(
    tmp_path: Path
) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    sess = await rig.session()
    top = (1 << 64) - 0x1000
    # SET_LOG_BASE whose offset + size wraps 64 bits (DPDK mapped size + offset as a wrapped u64).
    r, w = _pipe()
    log = p.LogDesc.__new__(p.LogDesc)
    object.__setattr__(log, "mmap_size", 0x2000)
    object.__setattr__(log, "mmap_offset", top)
    await refused(fe, fe.conn.request(Request.SET_LOG_BASE, log, fds=(r,)))
    assert backend_closed(r, w)
    base = region0(fe)
    bad_regions = [
        p.MemoryRegionDesc(guest_phys_addr=base.guest_phys_addr, size=0x2000, user_addr=base.user_addr,
                           mmap_offset=top),  # offset + size wraps
        p.MemoryRegionDesc(guest_phys_addr=top, size=0x2000, user_addr=base.user_addr,
                           mmap_offset=0),  # guest address + size wraps
        p.MemoryRegionDesc(guest_phys_addr=base.guest_phys_addr, size=0x2000, user_addr=top,
                           mmap_offset=0),  # user address + size wraps
        p.MemoryRegionDesc(guest_phys_addr=base.guest_phys_addr, size=base.size,
                           user_addr=base.user_addr, mmap_offset=fe.ram.backing.shape[0]),  # past the file
    ]  # fmt: skip
    for desc in bad_regions:
        body = (1).to_bytes(4, "little") + bytes(4) + _raw_region(desc)
        head = HEADER.pack(int(Request.SET_MEM_TABLE), VERSION | FLAG_NEED_REPLY, len(body))
        out = Outgoing(data=head + body,
                       fds=(fe.ram.fd,))  # fmt: skip
        fe.conn._expected.append(Request.SET_MEM_TABLE)
        await refused(fe, out)
    assert len(sess.errors) >= 5
    await finish(rig, fe, before)


def _raw_region(d: p.MemoryRegionDesc) -> bytes:
    return (d.guest_phys_addr.to_bytes(8, "little") + d.size.to_bytes(8, "little")
            + d.user_addr.to_bytes(8, "little") + d.mmap_offset.to_bytes(8, "little"))  # fmt: skip


# -- CVE-2020-10723: vring index out of range, or truncated before the check ----------------------------


async def test_cve_2020_10723_vring_index_out_of_range_or_truncated(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    n = 2  # one queue pair
    for index in (n, 200, 0xFF, 0x101, 0x1_0001, 0xFFFF_FFFF):  # 0x101 and 0x1_0001 truncate to ring 1
        await refused(fe, fe.conn.request(Request.SET_VRING_NUM, p.VringState(index=index, num=256),
                                          need_reply=True))  # fmt: skip
        await refused(fe, fe.conn.request(Request.SET_VRING_ENABLE, p.VringState(index=index, num=0),
                                          need_reply=True))  # fmt: skip
    reply = await fe.call(fe.conn.request(Request.GET_VRING_BASE, p.VringState(index=n, num=0)), check=False)
    assert reply is not None and not reply.ok
    # SET_VRING_KICK/CALL carry the index in bits 0-7 of a u64: bits above 8 must not be masked away.
    for value in (n, 0x1_0000_0001, 0x201):
        r, w = _pipe()
        out = fe.conn.request(Request.SET_VRING_CALL, p.U64(value=value), fds=(r,), need_reply=True)
        await refused(fe, out)
        assert backend_closed(r, w)
    await finish(rig, fe, before)  # rings 0 and 1 were never disturbed


# -- CVE-2020-10725: a zero-length descriptor with a wild address ---------------------------------------


async def test_cve_2020_10725_zero_length_descriptor_with_wild_address(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    sess = await rig.session()
    fe.post_rx(4)
    for _ in range(4):
        fe.queues[1].post_malformed(Malformed.ZERO_LENGTH_WILD)  # legal: len 0 is never translated
    fe.kick(1, force=True)
    tx = await fe.wait_used(1, 4)
    assert len(tx) == 4
    snap = sess.device.snapshot()
    assert snap["queues"][1]["drops"] == {}, "a legal chain was dropped"
    assert snap["port"]["reflected"] == 4 if "reflected" in snap["port"] else True
    # RX chain with a zero-length writable descriptor at a wild address between two real buffers.
    a, b = fe.ram.alloc(64), fe.ram.alloc(1600)
    fe.queues[0].post_chain([(a, 64, True), (0xDEAD_BEEF_0000_0000, 0, True), (b, 1600, True)])
    fe.transmit([frame(7, size=200)])
    got = await fe.wait_used(0, 5)
    assert all(c.len > 0 for c in got)
    assert fe.ram.guards_intact()
    await finish(rig, fe, before)


# -- CVE-2020-10726: repeated GET_INFLIGHT_FD ------------------------------------------------------------


def _inflight_memfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "nicsim-inflight" in os.readlink(f"/proc/self/fd/{fd}"):
                n += 1
        except OSError:
            pass
    return n


def _inflight_maps() -> int:
    with open("/proc/self/maps") as fh:
        return sum("nicsim-inflight" in line for line in fh)


async def test_cve_2020_10726_repeated_get_inflight_fd(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await VhostUserFrontend.connect(rig.path)
    fe.ram.fill_guards()
    await fe.handshake(inflight=True)
    assert vf.has(fe.protocol_features, vf.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), "INFLIGHT_SHMFD offered"
    await fe.call(fe.conn.set_features(fe.features))
    fd, desc = await fe.get_inflight_fd(2, fe.queue_size)
    os.close(fd)
    held, mapped = _inflight_memfds(), _inflight_maps()
    assert held <= 2 and mapped == 1  # the memfd and the mmap's own duplicate of it
    sizes = set()
    for i in range(60):
        fd, desc = await fe.get_inflight_fd(2, fe.queue_size if i % 2 else 64)
        sizes.add(desc.mmap_size)
        assert os.fstat(fd).st_size == desc.mmap_size
        os.close(fd)
    # DPDK mapped a new buffer on every request and kept the old: here only the latest one lives.
    assert _inflight_memfds() == held and _inflight_maps() == 1
    assert sizes == {2 * (16 * 256 + 64), 2 * (16 * 64 + 64)}
    # Absurd sizes are refused, not allocated.
    for nq, qs in ((0, 256), (2, 0), (2, 65535), (300, 256)):
        with pytest.raises(FrontendError):
            await fe.get_inflight_fd(nq, qs)
    assert _inflight_memfds() == held
    await fe.setup_inflight()
    await fe.start()
    await finish(rig, fe, before)
    assert _inflight_memfds() == 0 and _inflight_maps() == 0


# -- CVE-2022-0669: fds of rejected messages are closed -------------------------------------------------


async def test_cve_2022_0669_fds_of_rejected_messages_are_closed(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    sess = await rig.session()
    region = region0(fe)
    cases = {
        "unknown request": lambda fd: Outgoing(data=HEADER.pack(99, VERSION, 0), fds=(fd,)),
        "GET_QUEUE_NUM with an fd": lambda fd: fe.conn.request(Request.GET_QUEUE_NUM, fds=(fd,)),
        "SET_LOG_FD, not offered": lambda fd: fe.conn.request(Request.SET_LOG_FD, fds=(fd,), need_reply=True),
        "SET_MEM_TABLE, fd not shareable": lambda fd: fe.conn.set_mem_table([region], [fd], need_reply=True),
        "ADD_MEM_REG, not negotiated": lambda fd: fe.conn.add_mem_reg(region, fd, need_reply=True),
        "SET_VRING_KICK, bad ring": lambda fd: fe.conn.set_vring_kick(9, fd, need_reply=True),
        "SET_VRING_KICK with nofd bit and an fd": lambda fd: fe.conn.request(
            Request.SET_VRING_KICK, p.U64(value=0x100 | 1), fds=(fd,), need_reply=True),
        "SET_INFLIGHT_FD, not negotiated": lambda fd: fe.conn.set_inflight_fd(
            p.InflightDesc(mmap_size=4096, mmap_offset=0, num_queues=2, queue_size=256), fd),
        "SET_BACKEND_REQ_FD, not negotiated": lambda fd: fe.conn.set_backend_req_fd(fd, need_reply=True),
    }  # fmt: skip
    for name, build in cases.items():
        r, w = _pipe()
        out = build(r)
        if name == "unknown request":
            await fe.send(out)
        else:
            await fe.call(out, check=False)
        await fe.get_features()  # in order: by now the backend handled the message
        assert backend_closed(r, w), f"{name}: the backend kept the fd"
    assert len(sess.errors) >= len(cases) - 1
    await finish(rig, fe, before)


# -- CVE-2022-2132: chains shorter than the virtio-net header, headers split across descriptors ---------


async def test_cve_2022_2132_short_chains_and_split_headers(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    sess = await rig.session()
    ram = fe.ram
    hdr = bytes(VIRTIO_NET_HDR_SIZE)
    # TX chains shorter than the header: one descriptor, and the header's bytes spread over three.
    short = ram.alloc(16)
    fe.queues[1].post_chain([(short, 5, False)])
    fe.queues[1].post_chain([(short, 2, False), (short + 4, 3, False), (short + 8, 1, False)])
    fe.queues[1].post_chain([(short, 0, False)])
    # A good frame whose header is split 2 + 3 + 7 and whose frame follows in a fourth descriptor.
    f = frame(3, size=300)
    parts = [hdr[:2], hdr[2:5], hdr[5:], f]
    segs = []
    for part in parts:
        g = ram.alloc(len(part))
        ram.write(g, part)
        segs.append((g, len(part), False))
    fe.queues[1].post_chain(segs)
    # The RX buffer for the reflected frame has its header split over three descriptors too.
    bufs = [ram.alloc(n) for n in (2, 3, 7, 1600)]
    fe.queues[0].post_chain([(b, n, True) for b, n in zip(bufs, (2, 3, 7, 1600), strict=True)])
    fe.kick(0, force=True)
    fe.kick(1, force=True)
    tx = await fe.wait_used(1, 4)
    assert [c.len for c in tx] == [0, 0, 0, 0]
    (rx,) = await fe.wait_used(0, 1)
    assert rx.len == VIRTIO_NET_HDR_SIZE + len(f)
    got = ram.read(bufs[0], 2) + ram.read(bufs[1], 3) + ram.read(bufs[2], 7) + ram.read(bufs[3], len(f))
    assert got[VIRTIO_NET_HDR_SIZE:][12:] == f[12:]
    if vf.has(fe.features, VIRTIO_NET_F_MRG_RXBUF):
        assert int.from_bytes(got[10:12], "little") == 1  # num_buffers, written across descriptors
    drops = sess.device.snapshot()["queues"][1]["drops"]
    assert drops.get("short_header") == 3, drops
    assert fe.ram.guards_intact()
    await finish(rig, fe, before)
