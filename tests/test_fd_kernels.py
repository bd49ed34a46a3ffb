"""The tap's compiled rounds (``nicsim.ports.fd_kernels``): the device writes a TX round to the TAP and
reads an RX round from it in one call each. Each test runs the same traffic through a real TAP in a
throwaway namespace twice, once through the compiled rounds and once through the port's own Python
path (``kernels.disable()``: the reference), and compares what the kernel, the guest and every
counter saw; each also checks that the compiled round really ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from nicsim.ports import fd_kernels
from nicsim.ports.tap import TapPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.rx import RxPath
from nicsim.virtio.tx import TxPath
from qemu.testvm import Netns
from rings import kernels
from rings.driver import TxLayout
from tests.test_tap_port import (
    CSUM,
    EVT,
    GCSUM,
    GUEST_IP,
    HDR,
    HOST_MAC,
    IND,
    MRG,
    V1,
    ns_udp,
    rx_stat,
    start,
    tap,
    tapns,  # noqa: F401  (the fixture)
    udp_frame_needing_csum,
)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many TX and RX rounds the compiled kernels took (their callers returned a result)."""
    seen = {"tx": 0, "rx": 0}
    send, pull = TxPath._process_sent, RxPath._pull

    def process_sent(self: TxPath, *args: Any) -> Any:
        done = send(self, *args)
        seen["tx"] += done is not None
        return done

    def pull_(self: RxPath, pair: int, *args: Any) -> Any:
        if self._port.recv_target(pair) is not None:
            seen["rx"] += 1
        return pull(self, pair, *args)

    monkeypatch.setattr(TxPath, "_process_sent", process_sent)
    monkeypatch.setattr(RxPath, "_pull", pull_)
    return seen


@pytest.fixture(params=["compiled", "python"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "compiled":
        assert fd_kernels.enable(), kernels.engine()
        assert fd_kernels.kernel() is not None and fd_kernels.recv_kernel() is not None
    else:
        kernels.disable()
    yield request.param
    kernels.disable()


def test_a_tx_round_written_by_the_device_sends_counts_and_drops_what_the_ports_path_does(
    tapns: Netns, mode: str, counted: dict[str, int]  # noqa: F811
) -> None:
    sock = ns_udp(tapns)
    port = tap(tapns)
    dev = VirtioNetDevice(port=port)
    try:
        tapns.run("ip", "link", "set", "tap0", "address", HOST_MAC)
        _, tx = start(dev, V1 | MRG | IND | EVT | CSUM)
        dport = sock.getsockname()[1]
        before = rx_stat(tapns, "rx_packets")
        posted: list[tuple[bytes, bytes, TxLayout]] = []
        for i, layout in enumerate((TxLayout.ONE, TxLayout.TWO, TxLayout.INDIRECT)):
            hdr, f = udp_frame_needing_csum(f"frame {i}".encode(), dport)
            posted.append((hdr, f, layout))
        _, f = udp_frame_needing_csum(b"bad offset", dport)
        posted.append((HDR.pack(1, 0, 0, 0, 34, len(f), 0), f, TxLayout.ONE))  # BAD_CSUM
        _, f = udp_frame_needing_csum(b"no tso", dport)
        posted.append((HDR.pack(0, 1, 54, 1448, 0, 0, 0), f, TxLayout.TWO))  # TCPV4 without HOST_TSO4
        hdr, f = udp_frame_needing_csum(b"last", dport)
        posted.append((hdr, f, TxLayout.ONE))
        for hdr, f, layout in posted:
            tx.post_tx(f, header=hdr, layout=layout)
        res = dev.process_tx(1)
        got = sorted(sock.recvfrom(100)[0] for _ in range(4))
        assert got == [b"frame 0", b"frame 1", b"frame 2", b"last"]  # checksums completed by the kernel
        assert rx_stat(tapns, "rx_packets") == before + 4
        assert res.processed == 6 and res.interrupt
        assert [c.len for c in tx.reap()] == [0] * 6  # every chain returned, the dropped ones too
        stats = port.stats()
        assert stats["tx_frames"] == 4 and stats["tx_bytes"] == sum(len(f) for _, f, _ in posted) - len(
            posted[3][1]) - len(posted[4][1])  # fmt: skip
        assert stats["drops"] == {"bad_csum_offset": 1, "tx_offload_not_negotiated": 1}
        snap = dev.snapshot()
        assert snap["queues"][1]["packets"] == 6 and snap["pool"]["usage"] == 0
        assert counted["tx"] == (1 if mode == "compiled" else 0)
    finally:
        dev.shutdown()
        sock.close()


def test_a_tx_write_the_kernel_refuses_is_a_drop_with_its_errno(tapns: Netns, mode: str) -> None:  # noqa: F811
    port = tap(tapns)
    dev = VirtioNetDevice(port=port)
    try:
        _, tx = start(dev, V1 | MRG | EVT | CSUM)
        tapns.run("ip", "link", "set", "tap0", "down")  # tun then refuses writes with EIO
        hdr, f = udp_frame_needing_csum(b"nobody hears", 9)
        tx.post_tx(f, header=hdr)
        dev.process_tx(1)
        assert port.stats()["drops"] == {"tx_eio": 1} and port.stats()["tx_frames"] == 0
        assert [c.len for c in tx.reap()] == [0] and dev.snapshot()["pool"]["usage"] == 0
    finally:
        dev.shutdown()


@contextlib.asynccontextmanager
async def receiving(ns: Netns) -> AsyncIterator[tuple[TapPort, VirtioNetDevice, socket.socket]]:
    """A tap port into ``ns`` watched by this loop, its device, and a UDP socket in ``ns`` to send
    the guest frames from; all closed afterwards."""
    port = tap(ns)
    dev = VirtioNetDevice(port=port)
    port.start_io(asyncio.get_running_loop())
    sock = ns_udp(ns)
    try:
        yield port, dev, sock
    finally:
        sock.close()
        dev.shutdown()


async def _receive(dev: VirtioNetDevice, rx: Any, want: int) -> list[tuple[int, int, bytes]]:
    """The guest's next ``want`` IPv4 frames as (flags, num_buffers, frame), a frame's mergeable
    buffers joined (the namespace's own IPv6 frames skipped)."""
    used: list[Any] = []
    frames: list[tuple[int, int, bytes]] = []
    async with asyncio.timeout(10):
        while len(frames) < want:
            await asyncio.sleep(0.01)
            dev.poll_rx(0)
            used += rx.reap()
            while used:
                flags, _, _, _, _, _, n = HDR.unpack_from(used[0].data)
                if len(used) < n:
                    break
                data = used[0].data[12:] + b"".join(c.data for c in used[1:n])
                del used[:n]
                if data[12:14] == b"\x08\x00":
                    frames.append((flags, n, data))
    return frames


@pytest.mark.parametrize("features", [V1 | MRG | EVT, V1 | MRG | EVT | GCSUM], ids=["plain", "guest-csum"])
async def test_an_rx_round_read_by_the_device_gives_the_guest_what_the_ports_poll_does(
    tapns: Netns, mode: str, counted: dict[str, int], features: int  # noqa: F811
) -> None:
    async with receiving(tapns) as (port, dev, sock):
        rx, _ = start(dev, features)
        # Small buffers first: a frame that needs three of them is read by the compiled round but
        # placed by the general path (mergeable buffers), in order with the frames around it.
        rx.post_rx(12 + 512, count=3)
        for size in (1400, 10, 20):
            sock.sendto(bytes(range(256)) * (size // 256) + bytes(size % 256), (GUEST_IP, 9))
        rx.post_rx(count=16)
        got = await _receive(dev, rx, 3)
        flags = [f for f, _, _ in got]
        assert [len(d) - 42 for _, _, d in got] == [1400, 10, 20] and [n for _, n, _ in got] == [3, 1, 1]
        assert got[0][2][42:] == bytes(range(256)) * 5 + bytes(120)
        # The kernel leaves the UDP checksum to a guest that takes it (NEEDS_CSUM); else flags are 0.
        assert flags == [1 if features & GCSUM else 0] * 3
        stats = port.stats()
        assert stats["rx_frames"] >= 3 and stats["drops"] == {}
        assert dev.snapshot()["pool"]["usage"] == 0
        assert (counted["rx"] > 0) == (mode == "compiled")


async def test_an_rx_round_gives_back_the_buffers_it_took_and_did_not_fill(
    tapns: Netns, mode: str, counted: dict[str, int]  # noqa: F811
) -> None:
    # The compiled round takes posted buffers several at a time (1, 2, 4, ...) as frames come: five
    # frames take seven, and the two it did not fill go back untouched. So every avail entry the
    # device consumed is a used entry the guest got, and no pool descriptor stays marked in use.
    async with receiving(tapns) as (_, dev, sock):
        rx, _ = start(dev, V1 | MRG | EVT)
        rx.post_rx(count=16)
        for k in range(5):
            sock.sendto(bytes([k]) * 100, (GUEST_IP, 9))
        got = await _receive(dev, rx, 5)
        assert [d[42] for _, _, d in got] == [0, 1, 2, 3, 4]
        q = dev.queue(0)
        assert q is not None
        assert q.last_avail_idx == q.used_idx  # (the namespace's own frames, if any, count in both)
        assert dev.pool.outstanding().tolist() == [] and dev.snapshot()["pool"]["usage"] == 0
        assert (counted["rx"] > 0) == (mode == "compiled")


def test_the_kernels_follow_rings_kernels_on_and_off() -> None:
    assert fd_kernels.enable()
    assert fd_kernels.kernel() is not None and fd_kernels.recv_kernel() is not None
    kernels.disable()
    assert fd_kernels.kernel() is None and fd_kernels.recv_kernel() is None
    assert fd_kernels.enable()
    assert fd_kernels.kernel() is not None
    kernels.disable()


def test_allowed_bits_name_the_tx_offloads() -> None:
    from nicsim.ports.vnet_hdr import Offloads

    assert fd_kernels.allowed(Offloads()) == 0
    assert fd_kernels.allowed(Offloads(csum=True, tso4=True)) == fd_kernels.ALLOW_CSUM | fd_kernels.ALLOW_TSO4
    assert fd_kernels.allowed(Offloads(True, True, True)) == 7

