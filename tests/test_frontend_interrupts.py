"""The Python frontend sleeps on the call eventfd, as a guest driver does, so a backend that completes
buffers but withholds the interrupt it owes fails the wait instead of being rescued by a poll.

The backend is the real server in the test's loop; "withholding" is ``RingPump.signal`` replaced (for
one ring) by a method that records the interrupt and does not write the call eventfd. The device still
decides the interrupt (its ``interrupts`` counter says it was due); only the write is missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from nicsim.frontend import CompletionTimeout, VhostUserFrontend
from nicsim.ports import GeneratorConfig, GeneratorPort, Port, SinkPort
from nicsim.server import Server, Session
from nicsim.server.pump import RingPump
from nicsim.virtio.device import VirtioNetDevice
from rings.driver import Completion
from tests.hardening import frame

N = 10
WITHHELD_WAIT = 0.5  # seconds a wait that must fail gets (the backend publishes in a few loop turns)
RINGS = {"rx": 0, "tx": 1}
PORTS: dict[int, Callable[[], Port]] = {0: lambda: GeneratorPort(GeneratorConfig(size=60)), 1: SinkPort}


@pytest.fixture(params=["rx", "tx"])
def ring(request: pytest.FixtureRequest) -> int:
    return RINGS[request.param]


@pytest.fixture(params=[True, False], ids=["event_idx", "no_event_idx"])
def event_idx(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
async def rig(tmp_path: Path, ring: int, event_idx: bool) -> AsyncIterator[tuple[VhostUserFrontend, Session]]:
    async with Server([tmp_path / "s.sock"], lambda: VirtioNetDevice(port=PORTS[ring]())) as server:
        fe = await VhostUserFrontend.connect(tmp_path / "s.sock")
        try:
            await fe.handshake(event_idx=event_idx)
            await fe.start()
            sess = await asyncio.wait_for(server.endpoints[0].wait_session(), 10)
            yield fe, sess
        finally:
            await fe.close()


@pytest.fixture
def withheld(monkeypatch: pytest.MonkeyPatch, ring: int) -> list[int]:
    """Every interrupt of ring ``ring`` the backend decides is recorded here and not signalled."""
    record: list[int] = []
    signal = RingPump.signal

    def withholding(self: RingPump) -> None:
        if self.index != ring:
            signal(self)
            return
        record.append(self.index)

    monkeypatch.setattr(RingPump, "signal", withholding)
    return record


async def _start_waiting(
    fe: VhostUserFrontend, ring: int, **kwargs: float
) -> asyncio.Task[list[Completion]]:
    """Start ``wait_used(ring, N)`` before there is anything to reap, so it can only finish by being
    woken; then give the backend the N buffers (frames to send, or buffers to fill)."""
    waiting = asyncio.create_task(fe.wait_used(ring, N, **kwargs))
    await asyncio.sleep(0)  # one loop turn: the task has looked (nothing used) and sleeps
    assert not waiting.done() and fe.queues[ring].used_pending() == 0
    if ring == 1:
        fe.transmit([frame(i) for i in range(N)])
    else:
        fe.post_rx(N)
    return waiting


async def test_the_wait_is_woken_by_the_backends_interrupt(
    rig: tuple[VhostUserFrontend, Session], ring: int
) -> None:
    fe, sess = rig
    waiting = await _start_waiting(fe, ring)
    assert len(await asyncio.wait_for(waiting, 10)) == N
    # Every interrupt the device decided was signalled (the eventfd may merge several into one read).
    assert 1 <= fe.interrupts[ring] <= int(sess.device.stats.interrupts[ring])


async def test_a_withheld_interrupt_fails_the_wait_and_says_so(
    rig: tuple[VhostUserFrontend, Session], ring: int, withheld: list[int]
) -> None:
    fe, sess = rig
    waiting = await _start_waiting(fe, ring, timeout=WITHHELD_WAIT)
    with pytest.raises(CompletionTimeout, match="missing interrupt") as caught:
        await waiting
    err = caught.value
    assert (err.index, err.wanted, err.completions, err.unsignalled) == (ring, N, [], N)
    assert isinstance(err, TimeoutError)
    # The interrupt was due: the device decided it, the pump withheld it, none reached the frontend.
    assert withheld and int(sess.device.stats.interrupts[ring]) == len(withheld)
    assert fe.interrupts[ring] == 0
    assert len(fe.queues[ring].reap()) == N  # the work itself was done


async def test_polling_must_be_asked_for_and_hides_a_withheld_interrupt(
    rig: tuple[VhostUserFrontend, Session], ring: int, withheld: list[int]
) -> None:
    """The control: the same backend passes a wait that polls (what every wait used to do)."""
    fe, _ = rig
    waiting = await _start_waiting(fe, ring, poll_interval=0.01)
    assert len(await asyncio.wait_for(waiting, 10)) == N
    assert withheld and fe.interrupts[ring] == 0


async def test_a_ring_with_interrupts_turned_off_is_waited_for_by_polling(
    rig: tuple[VhostUserFrontend, Session], ring: int
) -> None:
    """Where polling is meant: the guest turned the ring's interrupts off (NO_INTERRUPT, or a used_event
    it will not reach), so the backend rightly stays silent; the plain wait says so, a polling one works."""
    fe, sess = rig
    fe.queues[ring].disable_interrupts()
    waiting = await _start_waiting(fe, ring, timeout=WITHHELD_WAIT)
    with pytest.raises(CompletionTimeout, match="interrupts turned off") as caught:
        await waiting
    assert caught.value.unsignalled == N and not caught.value.interrupts_enabled
    assert len(fe.queues[ring].reap()) == N
    waiting = await _start_waiting(fe, ring, poll_interval=0.01)
    assert len(await asyncio.wait_for(waiting, 10)) == N
    assert fe.interrupts[ring] == 0 == int(sess.device.stats.interrupts[ring])
