"""Frames the switch writes straight into a sleeping guest's receive buffers get their interrupt decided
at once (``RingPump.delivered``), without a round of that ring: the guest is interrupted (the
frontend waits on its call eventfd, so a missing interrupt fails the wait), by used_event, and the
ring's pump ran no round and slept on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nicsim.ports.frames import mac_bytes
from tests.test_mtu_announce import Lab

A_MAC, B_MAC = mac_bytes("52:54:00:00:00:0a"), mac_bytes("52:54:00:00:00:0b")


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path)
    await lab.server.start()
    yield lab
    await lab.server.close()
    lab.switch.close()


def frame(dst: bytes, src: bytes, n: int) -> bytes:
    return dst + src + b"\x08\x00" + bytes([n]) * 46


async def test_a_frame_into_a_sleeping_ring_is_signalled_without_a_round(two: Lab) -> None:
    lab = two
    a, b = await lab.guest(0), await lab.guest(1)
    b.transmit([frame(b"\xff" * 6, B_MAC, 0)])  # B's MAC learned (a broadcast A receives)
    await a.wait_used(0, 1, timeout=5)
    sessions = [await ep.wait_session() for ep in lab.server.endpoints]
    rx_b = sessions[1].pumps[0]
    before = rx_b.snapshot()
    interrupts = lab.device(1).snapshot()["queues"][0]["interrupts"]
    for n in range(1, 4):
        a.transmit([frame(B_MAC, A_MAC, n)])
        (got,) = await b.wait_used(0, 1, timeout=5)  # the interrupt came: the wait is on the eventfd
        assert got.data is not None and got.data[12 + 14] == n
    after = rx_b.snapshot()
    assert after["delivered"] - before["delivered"] == 3
    assert after["rounds"] == before["rounds"] and not rx_b.busy
    assert lab.device(1).snapshot()["queues"][0]["interrupts"] == interrupts + 3
    for fe in (a, b):
        await fe.close()
