"""The tap's compiled send round decides the TX ring's interrupt and writes its call eventfd itself,
between returning the chains and writing the frames (``process_tx(irq_fd=...)``): a lone request's
guest waits for that interrupt, and the TAP's kernel answers inside the ``writev``. Each test sends a
guest's ping through a real TAP in a throwaway namespace, once with the round signalling and once
without (the pump's own decision after the round: the reference), and compares what the guest, the
call eventfd and every counter saw.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nicsim.ports import fd_kernels
from nicsim.ports.frames import ip_bytes, mac_bytes
from nicsim.ports.tap import TapConfig, TapPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.policy import NotifyPolicy
from qemu.testvm import Netns
from rings import kernels
from tests.test_reply_poll import arp_request, is_arp_reply
from tests.test_tap_port import EVT, GUEST_IP, GUEST_MAC, HOST_IP, HOST_MAC, IND, MRG, V1, start
from tests.test_tx_irq_hold import rig

RX, TX = 0, 1
HDR_LEN = 12


@pytest.fixture
def quiet_tapns(netns: Callable[[], Netns]) -> Iterator[Netns]:
    """tap0 (10.0.2.2/24, HOST_MAC) in a namespace that sends nothing of its own (no IPv6), with the
    guest as a permanent neighbour: the only frames on the TAP are the guest's and their answers."""
    ns = netns()
    ns.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    ns.add_tap("tap0", f"{HOST_IP}/24")
    ns.run("ip", "link", "set", "tap0", "address", HOST_MAC)
    ns.run("ip", "neigh", "replace", GUEST_IP, "lladdr", GUEST_MAC, "dev", "tap0", "nud", "permanent")
    yield ns


@pytest.fixture
def compiled() -> Iterator[None]:
    assert fd_kernels.enable(), kernels.engine()
    assert fd_kernels.kernel() is not None
    yield
    kernels.disable()


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(seq: int) -> bytes:
    """An ICMP echo request (56 bytes of payload) from the guest to HOST_IP, to the TAP's MAC."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, seq) + bytes(range(56))
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0, ip_bytes(GUEST_IP),
                     ip_bytes(HOST_IP))  # fmt: skip
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return mac_bytes(HOST_MAC) + mac_bytes(GUEST_MAC) + b"\x08\x00" + ip + icmp


def is_echo_reply(data: bytes, seq: int) -> bool:
    eth = data[HDR_LEN:]
    icmp = eth[34:]
    is_icmp = eth[12:14] == b"\x08\x00" and eth[23] == 1
    return is_icmp and icmp[0] == 0 and struct.unpack("!H", icmp[6:8])[0] == seq


def signalled(fd: int) -> int:
    """How many interrupts the call eventfd ``fd`` holds (0 if none), read and so cleared."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def ping_once(
    ns: Netns, features: int, *, own: bool, seq: int, policy: NotifyPolicy | None = None,
    interrupts: bool = True, pings: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """``pings`` echo requests in one TX round through a fresh device, the round signalling the TX
    ring itself (``own``) or not; then the RX round for the replies. What the guest got back, the TX
    interrupts the call eventfd saw or the round asked for, and the counters."""
    port = TapPort(TapConfig(netns=ns.name, ifname="tap0", offload=False))
    dev = VirtioNetDevice(port=port, policy=policy or NotifyPolicy())
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        rx, tx = start(dev, features)
        rx.post_rx(count=8)
        if not interrupts:
            tx.disable_interrupts()
        for i in range(pings):
            tx.post_tx(echo_request(seq + i), header=bytes(HDR_LEN))
        res = dev.process_tx(TX, irq_fd=fd if own else None)
        asked = int(res.interrupt)
        written = signalled(fd)
        # The namespace's kernel answers inside the writev, unless a loaded host defers its softirq:
        # read until every reply is in (or two seconds pass), so the port's counters compare.
        replies: list[bytes] = []
        deadline = time.monotonic() + 2.0
        while True:
            dev.poll_rx(0)
            replies += [c.data for c in rx.reap() if c.data is not None]
            if len(replies) >= pings or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        snap = dev.snapshot()
        return {"processed": res.processed, "asked": asked, "written": written,
                "replies": replies,
                "tx": [c.len for c in tx.reap()],
                "tx_queue": {k: snap["queues"][TX][k] for k in ("packets", "bytes", "interrupts", "drops")},
                "port": port.stats(), "pool": snap["pool"]["usage"]}  # fmt: skip
    finally:
        dev.shutdown()
        os.close(fd)


@pytest.mark.parametrize("features", [V1 | MRG | IND | EVT, V1 | MRG], ids=["event-idx", "flags"])
def test_a_round_that_signals_itself_ends_as_one_the_pump_signals(
    quiet_tapns: Netns, compiled: None, features: int
) -> None:
    ref = ping_once(quiet_tapns, features, own=False, seq=1, pings=3)
    got = ping_once(quiet_tapns, features, own=True, seq=4, pings=3)
    assert ref["processed"] == got["processed"] == 3
    # The pump's round asks for the interrupt; the signalling round wrote it and asks for none.
    assert (ref["asked"], ref["written"]) == (1, 0)
    assert (got["asked"], got["written"]) == (0, 1)
    assert ref["tx_queue"] == got["tx_queue"] and got["tx_queue"]["interrupts"] == 1
    assert ref["tx"] == got["tx"] == [0, 0, 0]
    assert ref["port"] == got["port"] and got["port"]["tx_frames"] == 3
    assert ref["pool"] == got["pool"] == 0
    # The frames went out after the interrupt, copied before their chains were returned: intact.
    assert [is_echo_reply(r, 4 + i) for i, r in enumerate(got["replies"])] == [True] * 3


def test_a_driver_that_wants_no_interrupt_gets_none_from_the_round(
    quiet_tapns: Netns, compiled: None
) -> None:
    for features in (V1 | MRG | EVT, V1 | MRG):
        got = ping_once(quiet_tapns, features, own=True, seq=1, interrupts=False)
        assert (got["asked"], got["written"]) == (0, 0)
        assert got["tx_queue"]["interrupts"] == 0 and len(got["replies"]) == 1


def test_without_event_idx_the_round_keeps_the_policys_coalescing(quiet_tapns: Netns, compiled: None) -> None:
    policy = NotifyPolicy(irq_on_idle=False)  # a ring that runs dry waits for irq_coalesce entries
    ref = ping_once(quiet_tapns, V1 | MRG, own=False, seq=1, policy=policy)
    got = ping_once(quiet_tapns, V1 | MRG, own=True, seq=2, policy=policy)
    assert (ref["asked"], ref["written"]) == (got["asked"], got["written"]) == (0, 0)
    assert ref["tx_queue"] == got["tx_queue"]


async def test_the_pump_lets_the_round_signal_unless_an_interrupt_is_held(
    tmp_path: Path, quiet_tapns: Netns, compiled: None
) -> None:
    port = lambda: TapPort(TapConfig(netns=quiet_tapns.name, ifname="tap0", offload=False))  # noqa: E731
    async with rig(tmp_path, port) as (fe, sess):
        assert sess.pumps[TX]._own_irq_fd() == sess.pumps[TX].call_fd is not None
        fe.post_rx(8)
        fe.transmit([arp_request()])
        # The frontend sleeps on the TX ring's call eventfd: only the round's own write wakes it.
        assert len(await fe.wait_used(TX, 1, timeout=5)) == 1
        got = await fe.wait_used(RX, 1, timeout=5)
        assert got[0].data is not None and is_arp_reply(got[0].data)
        assert sess.device.stats.interrupts[TX] >= 1
    async with rig(tmp_path, port, tx_irq_wait_us=1000) as (fe, sess):
        assert sess.pumps[TX]._own_irq_fd() is None  # a held interrupt goes with the RX one
