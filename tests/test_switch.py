"""The switch port: three Python frontends, each on its own socket of one in-process ``Server``, joined
by one :class:`Switch`; what each frontend's RX ring receives is what the switch decided.

Frames carry their sender's number in the UDP source port, so a test reads back exactly which frames
arrived where. Every test ends with every device's pool back to 0.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nicsim.frontend import CompletionTimeout, VhostUserFrontend
from nicsim.ports.base import Port
from nicsim.ports.frames import ip_bytes, mac_bytes, udp_frame
from nicsim.ports.impair import Impairment
from nicsim.ports.switch import Switch
from nicsim.server import Server
from nicsim.virtio.device import VirtioNetDevice
from rings.pool import PacketPool
from tests.hardening import until

MACS = ["52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"]
BROADCAST = "ff:ff:ff:ff:ff:ff"
HDR = 12  # virtio_net_hdr_v1 in front of every received frame


def frame(src: int, dst: str, n: int = 0, size: int = 60) -> bytes:
    return udp_frame(dst_mac=mac_bytes(dst), src_mac=mac_bytes(MACS[src]),
                     src_ip=ip_bytes(f"10.0.0.{src + 1}"), dst_ip=ip_bytes("10.0.0.255"), sport=n, dport=9,
                     size=size)  # fmt: skip


def sport(data: bytes | None) -> int:
    assert data is not None
    return int.from_bytes(data[HDR + 34 : HDR + 36], "big")


class Lab:
    """A switch, a server with one socket per guest, and the devices each connection got; ``wrap``
    (a capture's) is applied to each guest's switch port, as ``nicsim serve --pcap`` does."""

    def __init__(self, tmp_path: Path, switch: Switch, guests: int = 3, *,
                 wrap: Callable[[Port, Path], Port] | None = None) -> None:  # fmt: skip
        self.switch = switch
        self.paths = [tmp_path / f"{chr(ord('a') + i)}.sock" for i in range(guests)]
        self.devices: dict[Path, list[VirtioNetDevice]] = {p: [] for p in self.paths}

        def make_device(path: Path) -> VirtioNetDevice:
            port: Port = switch.port(str(path))
            dev = VirtioNetDevice(port=port if wrap is None else wrap(port, path), pool=PacketPool(256))
            self.devices[path].append(dev)
            return dev

        self.server = Server(self.paths, make_device)
        for ep in self.server.endpoints:
            ep.make_device = functools.partial(make_device, ep.path)

    async def guest(self, i: int, *, rx: int = 64) -> VhostUserFrontend:
        fe = await VhostUserFrontend.connect(self.paths[i])
        await fe.handshake()
        await fe.start()
        if rx:
            fe.post_rx(rx)
        await until(lambda: len(self.devices[self.paths[i]]) > 0, "the device exists")
        return fe

    def device(self, i: int) -> VirtioNetDevice:
        return self.devices[self.paths[i]][-1]

    def port(self, i: int) -> dict[str, object]:
        return self.switch.port_stats(self.switch.slot(str(self.paths[i])))

    async def pools_empty(self) -> None:
        # A pool closes only once every descriptor came back (it refuses otherwise).
        await until(lambda: all(d.pool.closed or int(d.pool.usage) == 0 for ds in self.devices.values()
                                for d in ds), "every device's pool is back to 0")  # fmt: skip


async def received(fe: VhostUserFrontend, count: int) -> list[int]:
    return [sport(c.data) for c in await fe.wait_used(0, count, timeout=5)]


async def nothing_more(fe: VhostUserFrontend) -> None:
    with pytest.raises(CompletionTimeout):
        await fe.wait_used(0, 1, timeout=0.3)


@pytest.fixture
async def lab(tmp_path: Path) -> Lab:
    lab = Lab(tmp_path, Switch())
    await lab.server.start()
    yield lab  # type: ignore[misc]
    await lab.server.close()
    lab.switch.close()


async def test_broadcast_floods_then_learned_unicast_goes_only_to_its_port(lab: Lab) -> None:
    a, b, c = [await lab.guest(i) for i in range(3)]
    a.transmit([frame(0, BROADCAST, 1)])
    assert await received(b, 1) == [1]
    assert await received(c, 1) == [1]
    # B is not known yet: a frame for it floods to both B and C.
    a.transmit([frame(0, MACS[1], 2)])
    assert await received(b, 1) == [2]
    assert await received(c, 1) == [2]
    # A was learned from its broadcast: B's answer goes to A alone.
    b.transmit([frame(1, MACS[0], 3)])
    assert await received(a, 1) == [3]
    # And now B is known: A's next frames for it reach B only.
    a.transmit([frame(0, MACS[1], 10 + k) for k in range(5)])
    assert await received(b, 5) == list(range(10, 15))
    await nothing_more(c)
    assert lab.switch.fdb.counters["learned"] == 2
    pa, pb, pc = lab.port(0), lab.port(1), lab.port(2)
    assert (pa["rx_packets"], pa["tx_packets"]) == (7, 1)
    assert (pb["rx_packets"], pb["tx_packets"]) == (1, 7)
    assert (pc["rx_packets"], pc["tx_packets"]) == (0, 2)
    assert pb["tx_bytes"] == 7 * 60
    for fe in (a, b, c):
        await fe.close()
    await lab.pools_empty()


async def test_a_guest_without_rx_buffers_loses_frames_with_a_reason_and_holds_up_no_one(lab: Lab) -> None:
    a, b = await lab.guest(0), await lab.guest(1, rx=0)
    c = await lab.guest(2, rx=0)  # the stopped guest: it never posts a receive buffer
    sent = 0
    for _ in range(20):  # 2000 broadcasts, far beyond C's backlog
        b.post_rx(100)
        a.transmit([frame(0, BROADCAST, sent + k) for k in range(100)])
        await a.wait_used(1, 100)  # A's TX buffers come back: C's lack of room did not hold them
        assert await received(b, 100) == list(range(sent, sent + 100))
        sent += 100
    # Flooded frames never wait in a backlog: every broadcast C had no buffer for is dropped at once.
    assert lab.port(2)["drops"] == {"flood_no_rx_buffer": sent}
    assert len(lab.device(2)._rx.backlog[0]) == 0
    assert lab.port(1)["drops"] == {}
    # Frames addressed to C do wait, in its bounded backlog (256 frames), and past it are dropped.
    c.transmit([frame(2, MACS[0], 0)])
    assert await received(a, 1) == [0]  # and now the switch knows where C is
    for start in range(0, 400, 100):
        a.transmit([frame(0, MACS[2], start + k) for k in range(100)])
        await a.wait_used(1, 100)
    assert lab.port(2)["drops"] == {"flood_no_rx_buffer": sent, "no_rx_buffer": 400 - 256}
    c.post_rx(256)
    assert await received(c, 256) == list(range(256))  # the first 256, in order
    await nothing_more(c)
    for fe in (a, b, c):
        await fe.close()
    await lab.pools_empty()


async def test_a_flood_leaves_room_for_frames_addressed_to_a_guest(lab: Lab) -> None:
    a, b, c = await lab.guest(0, rx=0), await lab.guest(1, rx=0), await lab.guest(2, rx=0)
    c.transmit([frame(2, MACS[1], 1)])  # C is learned (its frame, flooded, finds no buffer anywhere)
    await c.wait_used(1, 1)
    b.transmit([frame(1, MACS[2], 0)])  # C, with no buffer, keeps B's frame waiting in its backlog
    await b.wait_used(1, 1)
    flood = frame(0, BROADCAST, 10)
    for _ in range(25):  # A floods: 5000 broadcasts, while C still has no buffer
        a.transmit([flood] * 200)
        await a.wait_used(1, 200)
    b.transmit([frame(1, MACS[2], 2)])  # a unicast right in the flood
    await b.wait_used(1, 1)
    c.post_rx(8)
    assert await received(c, 2) == [0, 2]  # both of B's frames, none of the flood's, were kept
    assert lab.port(2)["drops"] == {"flood_no_rx_buffer": 5000}
    for fe in (a, b, c):
        await fe.close()
    await lab.pools_empty()


async def test_a_guest_that_leaves_is_forgotten_and_the_next_one_on_its_socket_joins(lab: Lab) -> None:
    a, b = await lab.guest(0), await lab.guest(1)
    a.transmit([frame(0, MACS[1], 1)])
    assert await received(b, 1) == [1]
    await a.close()
    await until(lambda: "a.sock" not in " ".join(lab.switch.stats()["joined"]), "A left the switch")
    assert lab.switch.fdb.counters["forgotten"] == 1
    # B's frame for A's old address now floods, and nobody is there to take it.
    b.transmit([frame(1, MACS[0], 2)])
    await until(lambda: lab.port(1)["rx_packets"] == 1, "the switch saw B's frame")
    assert lab.port(1)["drops"] == {"no_peer": 1}  # counted, not lost silently
    a2 = await lab.guest(0)
    b.transmit([frame(1, MACS[0], 3)])
    assert await received(a2, 1) == [3]
    assert lab.port(0)["tx_packets"] == 1 and lab.port(0)["rx_packets"] == 1  # same port, same counters
    for fe in (a2, b):
        await fe.close()
    await lab.pools_empty()


async def _lossy_run(tmp_path: Path, seed: int) -> list[int]:
    tmp_path.mkdir()
    switch = Switch()
    lab = Lab(tmp_path, switch, guests=2)
    switch.impair(str(lab.paths[0]), "tx", f"loss=10% seed={seed}")
    await lab.server.start()
    try:
        a, b = await lab.guest(0), await lab.guest(1, rx=0)
        got: list[int] = []
        for start in range(0, 1000, 100):
            b.post_rx(100)
            a.transmit([frame(0, MACS[1], start + k) for k in range(100)])
            await a.wait_used(1, 100)
            # Without a delay the switch forwards inside A's TX round: once it saw the batch,
            # what B gets of it is known.
            await until(lambda s=start: lab.port(0)["rx_packets"] == s + 100, "the switch saw the batch")
            pending = int(lab.port(1)["tx_packets"]) - len(got)  # type: ignore[call-overload]
            got += await received(b, pending)
        await a.close()
        await b.close()
        await lab.pools_empty()
        return got
    finally:
        await lab.server.close()
        switch.close()


async def test_loss_is_reproducible_from_the_seed(tmp_path: Path) -> None:
    first = await _lossy_run(tmp_path / "1", seed=5)
    again = await _lossy_run(tmp_path / "2", seed=5)
    other = await _lossy_run(tmp_path / "3", seed=6)
    assert first == again
    assert first != other
    assert 40 <= 1000 - len(first) <= 160
    # The very frames an Impairment with the same seed and stream keeps alone.
    imp = Impairment("loss=10% seed=5", stream=(0, 0))
    data = np.zeros(1000, np.uint8)
    _, offsets, _ = imp.offer(0.0, data, np.arange(1000, dtype=np.int64), np.ones(1000, np.uint32))
    assert first == offsets.tolist()


async def test_delay_releases_frames_from_one_timer_after_the_delay(tmp_path: Path) -> None:
    switch = Switch()
    lab = Lab(tmp_path, switch, guests=2)
    switch.impair(str(lab.paths[1]), "rx", "delay=80ms")
    await lab.server.start()
    try:
        a, b = await lab.guest(0), await lab.guest(1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        a.transmit([frame(0, MACS[1], k) for k in range(10)])
        assert await received(b, 10) == list(range(10))
        assert loop.time() - t0 >= 0.08
        assert lab.port(1)["impair"]["rx"]["delayed"] == 10  # type: ignore[index]
        await a.close()
        await b.close()
        await lab.pools_empty()
    finally:
        await lab.server.close()
        switch.close()


def test_serve_builds_one_switch_with_ports_in_socket_order_and_named_impairments() -> None:
    from nicsim.cli.serve import parse_port, parse_switch

    socks = [Path("/run/x/a.sock"), Path("/run/x/b.sock")]
    sw = parse_switch("switch,ageing=5", ["a.sock:both:loss=1% seed=2", "/run/x/b.sock:rx:delay=5ms"], socks)
    assert sw.fdb.ageing == 5.0
    assert [sw.slot(str(p)) for p in socks] == [0, 1]
    assert set(sw.port_stats(0)["impair"]) == {"tx", "rx"}  # type: ignore[arg-type]
    assert set(sw.port_stats(1)["impair"]) == {"rx"}  # type: ignore[arg-type]
    for bad, says in [("switch,agein=1", "known keys"), ("switch,ageing=x", "not a number")]:
        with pytest.raises(ValueError, match=says):
            parse_switch(bad)
    for impair, says in [("c.sock:tx:loss=1%", "names no"), ("a.sock:up:loss=1%", "direction"),
                         ("a.sock:tx:lose=1%", "unknown impairment")]:  # fmt: skip
        with pytest.raises(ValueError, match=says):
            parse_switch("switch", [impair], socks)
    assert parse_port("switch").name == "switch"


async def test_frames_a_tx_delay_holds_for_a_guest_that_left_are_dropped_as_port_down(tmp_path: Path) -> None:
    switch = Switch()
    lab = Lab(tmp_path, switch, guests=2)
    switch.impair(str(lab.paths[0]), "tx", "delay=200ms")
    await lab.server.start()
    try:
        a, b = await lab.guest(0), await lab.guest(1)
        a.transmit([frame(0, MACS[1], k) for k in range(4)])
        await a.wait_used(1, 4)  # copied into the delay line: A's buffers are back at once
        await a.close()
        await until(lambda: lab.port(0)["drops"] == {"port_down": 4}, "the held frames were dropped")
        await nothing_more(b)
        assert switch.fdb.port_of(MACS[0], 0.0) is None  # A's address was not learned on its empty port
        await b.close()
        await lab.pools_empty()
    finally:
        await lab.server.close()
        switch.close()


async def test_frames_reach_posted_buffers_byte_for_byte_one_buffer_or_several(lab: Lab) -> None:
    a, b = await lab.guest(0), await lab.guest(1, rx=0)
    sizes = [60, 61, 200, 777, 1514]
    sent = [frame(0, MACS[1], k, size=n) for k, n in enumerate(sizes)]
    b.post_rx(len(sizes))  # room for each: straight into B's buffers
    a.transmit(sent)
    got = await b.wait_used(0, len(sizes), timeout=5)
    for c, f in zip(got, sent, strict=True):
        assert c.data is not None
        assert c.data[HDR:] == f and c.len == HDR + len(f)
        assert c.data[:10] == bytes(10) and int.from_bytes(c.data[10:12], "little") == 1  # num_buffers
    # Buffers of 12 + 256 bytes: a 1000-byte frame spans four of them (MRG_RXBUF), in one copy too.
    big = frame(0, MACS[1], 9, size=1000)
    b.post_rx(8, buf_size=HDR + 256)
    a.transmit([big])
    parts = await b.wait_used(0, 4, timeout=5)
    assert parts[0].data is not None and int.from_bytes(parts[0].data[10:12], "little") == 4
    assert b"".join(p.data or b"" for p in parts)[HDR:] == big
    assert [p.len for p in parts] == [HDR + 256] * 3 + [HDR + 1000 - 3 * (HDR + 256)]
    # No buffer posted: the frames wait in B's backlog and arrive, the same bytes, once B posts.
    late = [frame(0, MACS[1], 20 + k, size=100 + k) for k in range(3)]
    a.transmit(late)
    await a.wait_used(1, len(sizes) + 1 + 3)
    b.post_rx(4)
    assert [c.data[HDR:] for c in await b.wait_used(0, 3, timeout=5) if c.data] == late
    assert lab.port(1)["tx_packets"] == len(sizes) + 1 + 3
    for fe in (a, b):
        await fe.close()
    await lab.pools_empty()


def test_a_capture_on_switch_ports_sees_each_frame_leave_one_guest_and_reach_the_other(
    tmp_path: Path,
) -> None:
    from nicsim.ports.capture import CaptureConfig, CaptureWriter, Direction, capturing
    from nicsim.virtio.features import VIRTIO_F_VERSION_1
    from rings.driver import GuestDriver
    from tests.pcap_read import read_capture

    switch = Switch()
    path = tmp_path / "cap.pcapng"
    sent = [frame(0, BROADCAST, k, size=60 + 100 * k) for k in range(5)]
    with CaptureWriter(CaptureConfig(path=path)) as w:
        rings = []
        for name in ("a", "b"):
            drv = GuestDriver()
            rx, tx = drv.add_queue(0, 64), drv.add_queue(1, 64)
            dev = VirtioNetDevice(port=capturing(switch.port(name), w, w.add_interface(name)))
            dev.set_features(1 << VIRTIO_F_VERSION_1)
            dev.set_memory(drv.memory)
            dev.start_queue(0, rx.device_queue())
            dev.start_queue(1, tx.device_queue())
            rx.post_rx(count=8)
            rings.append((rx, tx, dev))
        (_, tx_a, dev_a), (rx_b, _, _) = rings
        for f in sent:
            tx_a.post_tx(f)
        dev_a.process_tx(1)  # B has buffers posted: each frame is written straight into them
        got = [(c.data or b"")[HDR:] for c in rx_b.reap()]
    assert got == sent
    captured = [(c.interface, c.direction, c.data) for c in read_capture(path)]
    out, into = Direction.OUTBOUND, Direction.INBOUND
    assert captured == [("a", out, f) for f in sent] + [("b", into, f) for f in sent]
