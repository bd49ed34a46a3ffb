"""The switch paces a guest that streams to one guest with no buffer left (``Switch.tx_budget``): its
next rounds take only as many chains as the receiver has buffers posted, none while it has none (the
frames wait in the sender's own ring), for at most ``PACE_MAX_S``; then the round is taken whole.
Each scenario runs on devices driven by the driver-side model, with the compiled forward and through
the general path (``tests.test_switch_kernel.both``): both must pace alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import UDP
from scapy.layers.l2 import Ether

from nicsim.ports.capture import CaptureConfig, CaptureWriter, capturing
from nicsim.ports.switch import PACE_MAX_S, Switch
from nicsim.virtio.features import VIRTIO_NET_F_MQ
from nicsim.virtio.queues import QueueResult
from tests.pcap_read import read_capture
from tests.test_switch_kernel import Calls, both, learn, observed, udp
from tests.test_switch_offload import ALL, MAC_C, Guest, guest


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def post(g: Guest, frames: list[bytes]) -> None:
    for f in frames:
        g.tx.post_tx(f, header=bytes(12))


def tx_round(g: Guest) -> QueueResult:
    res = g.dev.process_tx(1)
    g.tx.reap()
    return res


def ports_of(frames: list[tuple[tuple[int, ...], bytes]]) -> list[int]:
    return [Ether(d)[UDP].sport for _, d in frames]


def test_a_sender_waits_in_its_own_ring_for_the_receivers_next_buffers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        clock = Clock()
        sw = Switch(clock=clock)
        a, b = guest(sw, "a", ALL), guest(sw, "b", ALL, rx=0)
        learn(a, b)
        b.rx.post_rx(4096, count=16)
        post(a, [udp(60, sport=k) for k in range(20)])
        first = tx_round(a)  # 16 into B's buffers, 4 into its backlog: A is paced by B now
        post(a, [udp(60, sport=20 + k) for k in range(10)])
        waited = tx_round(a)  # B has no buffer: A's frames stay in A's ring
        b.rx.post_rx(4096, count=6)
        b.dev.deliver_rx(0)  # B's backlog takes 4 of them: 2 left for A
        budgeted = tx_round(a)
        clock.now += PACE_MAX_S / 2
        still = tx_round(a)  # none left: waiting again
        clock.now += PACE_MAX_S * 1.5  # (past the bound whatever the float rounding)
        whole = tx_round(a)  # waited long enough: the round is taken whole, into B's backlog
        b.rx.post_rx(4096, count=64)
        b.dev.deliver_rx(0)
        got = observed(sw, a, b)
        got["rounds"] = [(r.processed, r.blocked) for r in (first, waited, budgeted, still, whole)]
        sw.close()
        return got

    got, _, _ = both(scenario, monkeypatch)
    assert got["rounds"] == [(20, False), (0, True), (2, False), (0, True), (8, False)]
    assert ports_of(got["guest1"]) == list(range(30))  # every frame, in order, none dropped
    assert got["switch"]["ports"]["b"]["drops"] == {"flood_no_rx_buffer": 1}  # A's ARP, before B's buffers
    # budgeted once (2 chains), waited twice, and the second wait ran out
    assert got["switch"]["pacing"] == {"rounds": 1, "waits": 2, "expired": 1}
    assert got["dev0"]["pool"] == got["dev1"]["pool"] == 0


def test_a_frame_for_another_guest_waits_at_most_the_pacing_bound_and_ends_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        clock = Clock()
        sw = Switch(clock=clock)
        a, b, c = guest(sw, "a", ALL), guest(sw, "b", ALL, rx=0), guest(sw, "c", ALL)
        learn(a, b, c)
        b.rx.post_rx(4096, count=4)
        post(a, [udp(60, sport=k) for k in range(6)])
        tx_round(a)  # B is full: A is paced by B
        post(a, [udp(60, sport=50, dst=MAC_C)])
        held = tx_round(a)
        clock.now += PACE_MAX_S * 1.5
        sent = tx_round(a)  # the bound: taken whole, C's frame with it
        post(a, [udp(60, sport=51, dst=MAC_C)])
        again = tx_round(a)  # that round went to C: A is not paced any more
        got = observed(sw, a, b, c)
        got["rounds"] = [(r.processed, r.blocked) for r in (held, sent, again)]
        sw.close()
        return got

    got, _, _ = both(scenario, monkeypatch)
    assert got["rounds"] == [(0, True), (1, False), (1, False)]
    assert ports_of(got["guest2"]) == [50, 51]
    assert got["switch"]["pacing"] == {"rounds": 0, "waits": 1, "expired": 1}


def test_without_pacing_every_round_is_taken_and_what_finds_no_room_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        sw = Switch(pace=False)
        a, b = guest(sw, "a", ALL), guest(sw, "b", ALL, rx=0)
        learn(a, b)
        b.rx.post_rx(4096, count=16)
        rounds = []
        for r in range(3):
            post(a, [udp(60, sport=100 * r + k) for k in range(200)])
            res = tx_round(a)
            rounds.append((res.processed, res.blocked))
        got = observed(sw, a, b)
        got["rounds"] = rounds
        sw.close()
        return got

    got, _, _ = both(scenario, monkeypatch)
    assert got["rounds"] == [(200, False)] * 3
    # 16 into B's buffers, 256 into its backlog, the other 328 dropped
    assert got["switch"]["ports"]["b"]["drops"] == {"no_rx_buffer": 600 - 16 - 256, "flood_no_rx_buffer": 1}
    assert got["switch"]["pacing"] == {"rounds": 0, "waits": 0, "expired": 0}


def test_a_receiver_with_several_queue_pairs_never_paces_its_senders() -> None:
    # Each flow lands on the pair it last sent on: one pair's buffers say nothing of the others'.
    sw = Switch(clock=Clock())
    a, b = guest(sw, "a", ALL), guest(sw, "b", ALL | 1 << VIRTIO_NET_F_MQ, rx=4, pairs=2)
    learn(a, b)
    rounds = []
    for r in range(2):
        post(a, [udp(60, sport=10 * r + k) for k in range(8)])
        res = tx_round(a)
        rounds.append((res.processed, res.blocked))
    assert rounds == [(8, False), (8, False)]  # B's one pair full, and A still taken whole
    assert sw.stats()["pacing"] == {"rounds": 0, "waits": 0, "expired": 0}
    sw.close()


@pytest.mark.parametrize("who", ["sender", "receiver"])
def test_a_guest_that_comes_back_on_a_paced_slot_starts_unpaced(who: str) -> None:
    sw = Switch(clock=Clock())
    a, b = guest(sw, "a", ALL), guest(sw, "b", ALL, rx=0)
    learn(a, b)
    b.rx.post_rx(4096, count=16)
    post(a, [udp(60, sport=k) for k in range(20)])
    tx_round(a)  # 16 into B's buffers, 4 into its backlog: A is paced by B
    post(a, [udp(60, sport=20 + k) for k in range(10)])
    assert tx_round(a).blocked  # and waits in its ring
    if who == "sender":
        a.dev.shutdown()  # A's guest goes; a new one takes its socket's slot
        a = guest(sw, "a", ALL)
    else:
        b.dev.shutdown()
        b = guest(sw, "b", ALL, rx=0)
    learn(a, b)
    post(a, [udp(60, sport=100 + k) for k in range(5)])
    res = tx_round(a)  # B has no buffer, but nobody is paced by the old guests: taken whole
    assert (res.processed, res.blocked) == (5, False)
    sw.close()


def test_a_captured_sender_is_paced_and_its_capture_holds_each_frame_once(tmp_path: Path) -> None:
    # The capture wraps the switch's port: it must pass the switch's budget on, or a captured guest
    # floods its receiver's backlog where an uncaptured one would wait in its ring.
    path = tmp_path / "a.pcapng"
    with CaptureWriter(CaptureConfig(path=path)) as writer:
        iface = writer.add_interface("a")
        sw = Switch(clock=Clock())
        a = guest(sw, "a", ALL, wrap=lambda port: capturing(port, writer, iface))
        b = guest(sw, "b", ALL, rx=0)
        learn(a, b)
        b.rx.post_rx(4096, count=16)
        post(a, [udp(60, sport=k) for k in range(20)])
        tx_round(a)  # 16 into B's buffers, 4 into its backlog: A is paced by B
        post(a, [udp(60, sport=20 + k) for k in range(10)])
        waited = tx_round(a)
        b.rx.post_rx(4096, count=6)
        b.dev.deliver_rx(0)  # B's backlog takes 4 of them: 2 left for A
        budgeted = tx_round(a)
        sw.close()
    assert [(r.processed, r.blocked) for r in (waited, budgeted)] == [(0, True), (2, False)]
    sent = [Ether(c.data) for c in read_capture(path) if c.direction == 2]  # outbound: what A sent
    assert [f[UDP].sport for f in sent if UDP in f] == list(range(22))  # each taken frame once, in order
