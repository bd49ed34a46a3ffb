"""A request's reply in the request's own loop turn (``reply_poll``): after a sparse TX round the pump
runs the pair's RX round at once, so a reply the port already holds (a TAP whose kernel answered
inside the write, a port that queued it during the round) reaches the guest without waiting for the
port's wakeup in a later loop turn, and the reply's interrupt carries the held TX one.

The backend is the real server in the test's loop, the frontend the driver-side model sleeping on the
call eventfds; what the pump did is read from its counters: ``wakeups_reply`` (an RX round run right
after a request), ``wakeups_other`` (the port woke the RX ring later, through the loop).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nicsim.ports import ReflectPort
from nicsim.ports.frames import ip_bytes, mac_bytes
from nicsim.ports.tap import TapConfig, TapPort
from nicsim.server import Session
from nicsim.virtio.policy import FLOW_BYTES, NotifyPolicy, poll_for_reply
from qemu.testvm import Netns
from tests.hardening import frame
from tests.test_tx_irq_hold import rig

RX, TX = 0, 1
GUEST_MAC, GUEST_IP, HOST_IP = "52:54:00:12:34:56", "10.0.2.15", "10.0.2.2"
LONG_WAIT_US = 30e6  # no held TX interrupt goes out by its deadline here


async def settled(sess: Session) -> dict[str, int]:
    """The RX pump's counters once it sleeps (the start and the posted buffers woke it)."""
    async with asyncio.timeout(5):
        while sess.pumps[RX].busy:
            await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)  # a wakeup already in the loop's queue runs first
    return sess.pumps[RX].snapshot()


def since(sess: Session, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in sess.pumps[RX].snapshot().items()}


def test_only_a_sparse_round_looks_for_its_reply_at_once() -> None:
    policy = NotifyPolicy(flow_batch=8)
    assert poll_for_reply(policy, processed=1, nbytes=98)
    assert poll_for_reply(policy, processed=7)
    assert not poll_for_reply(policy, processed=8)  # a batch: traffic flows, RX keeps its own wakeups
    assert not poll_for_reply(policy, processed=1, nbytes=FLOW_BYTES)  # a GSO frame: a stream's round
    assert not poll_for_reply(NotifyPolicy(reply_poll=0), processed=1)


@pytest.mark.parametrize("reply_poll", [1, 0])
async def test_a_queued_reply_goes_out_with_the_requests_round(tmp_path: Path, reply_poll: int) -> None:
    async with rig(tmp_path, ReflectPort, reply_poll=reply_poll, tx_irq_wait_us=LONG_WAIT_US) as (fe, sess):
        fe.post_rx(4)
        before = await settled(sess)
        fe.transmit([frame(0)])
        assert len(await fe.wait_used(RX, 1, timeout=5)) == 1
        assert len(await fe.wait_used(TX, 1, timeout=5)) == 1
        rx = since(sess, before)
        if reply_poll:
            # The RX round ran inside the TX one: nothing had to wake the RX ring afterwards.
            assert rx["wakeups_reply"] == 1 and rx["wakeups_other"] == 0
        else:
            assert rx["wakeups_reply"] == 0 and rx["wakeups_other"] >= 1
        assert sess.pumps[TX].counters["irqs_merged"] == 1  # either way one interrupt for both


async def test_a_stream_round_does_not_poll_for_a_reply(tmp_path: Path) -> None:
    async with rig(tmp_path, ReflectPort, flow_batch=8) as (fe, sess):
        fe.post_rx(32)
        fe.transmit([frame(i) for i in range(16)])
        assert len(await fe.wait_used(RX, 16, timeout=5)) == 16
        assert sess.pumps[RX].counters["wakeups_reply"] == 0


# -- a real TAP: the kernel answers inside the write --------------------------------------------------


@pytest.fixture
def tapns(netns: Callable[[], Netns]) -> Iterator[Netns]:
    """A namespace with a persistent tap0 (10.0.2.2/24, up) that sends nothing of its own (no IPv6)."""
    ns = netns()
    ns.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    ns.add_tap("tap0", f"{HOST_IP}/24")
    yield ns


def arp_request() -> bytes:
    """A broadcast who-has HOST_IP from the guest (the kernel replies while handling the write)."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac_bytes(GUEST_MAC), ip_bytes(GUEST_IP),
                      bytes(6), ip_bytes(HOST_IP))  # fmt: skip
    frame = b"\xff" * 6 + mac_bytes(GUEST_MAC) + struct.pack("!H", 0x0806) + arp
    return frame.ljust(60, b"\0")


def is_arp_reply(data: bytes, hdr_len: int = 12) -> bool:
    eth = data[hdr_len:]
    return eth[12:14] == b"\x08\x06" and eth[20:22] == b"\x00\x02" and eth[28:32] == socket.inet_aton(HOST_IP)


@pytest.mark.parametrize("reply_poll", [1, 0])
async def test_a_taps_answer_reaches_the_guest_in_the_requests_loop_turn(
    tmp_path: Path, tapns: Netns, reply_poll: int
) -> None:
    port = lambda: TapPort(TapConfig(netns=tapns.name, ifname="tap0", offload=False))  # noqa: E731
    async with rig(tmp_path, port, reply_poll=reply_poll, tx_irq_wait_us=LONG_WAIT_US) as (fe, sess):
        fe.post_rx(8)
        before = await settled(sess)
        fe.transmit([arp_request()])
        got = await fe.wait_used(RX, 1, timeout=5)
        assert got[0].data is not None and is_arp_reply(got[0].data)
        assert len(await fe.wait_used(TX, 1, timeout=5)) == 1
        rx = since(sess, before)
        if reply_poll:
            # Read from the TAP right after the write: the fd never had to wake the RX ring.
            assert rx["wakeups_reply"] >= 1 and rx["wakeups_other"] == 0
        else:
            assert rx["wakeups_reply"] == 0 and rx["wakeups_other"] >= 1
        assert sess.pumps[TX].counters["irqs_merged"] == 1
