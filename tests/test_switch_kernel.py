"""The switch's compiled forward (``nicsim.ports.switch_kernel``): a guest's TX round written straight
into another guest's RX buffers in one call. Each scenario runs twice on devices driven by the
driver-side model (``rings.driver``), once with the kernels on and once through the switch's general
path (``kernels.disable()``: the reference), and every observation must agree: what each guest
received (header fields and bytes, in order), every port and table counter, the devices' stats and
pools. Each also checks that the compiled forward really placed frames, and where it stopped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from nicsim.ports import enable_kernels, switch_kernel
from nicsim.ports.switch import Switch
from nicsim.ports.vnet_hdr import F_NEEDS_CSUM, tcp_layout
from rings import kernels
from rings.driver import Malformed, TxLayout
from tests.test_switch_offload import (
    ALL,
    HDR,
    MAC_A,
    MAC_B,
    MAC_C,
    MRG,
    V1,
    Guest,
    gso_header,
    guest,
    payload,
    tcp4,
    tcp6,
)
from tests.test_tap_port import GCSUM

BROADCAST = "ff:ff:ff:ff:ff:ff"
MODES = ("compiled", "python")


def udp(n: int, *, src: str = MAC_A, dst: str = MAC_B, sport: int = 1) -> bytes:
    return bytes(Ether(src=src, dst=dst) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=sport, dport=9)
                 / Raw(payload(n)))  # fmt: skip


class Calls:
    """What the compiled forward returned, call by call: (frames forwarded, why it stopped)."""

    def __init__(self) -> None:
        self.results: list[tuple[int, str]] = []

    def wrap(self, fn: Callable[..., tuple[int, ...]]) -> Callable[..., tuple[int, ...]]:
        def counted(*args: Any) -> tuple[int, ...]:
            got = fn(*args)
            self.results.append((int(got[1]), switch_kernel.STOPS[int(got[3])]))
            return got

        return counted


def both(scenario: Callable[[str, Calls], dict[str, Any]], monkeypatch: pytest.MonkeyPatch, *,
         ordered: bool = True) -> tuple[dict[str, Any], dict[str, Any], Calls]:  # fmt: skip
    """Run ``scenario`` with the kernels on, then through the general path; the observations must be
    equal (``ordered=False``: each guest's frames as a multiset, for a round that mixes floods and
    unicast, which the general path sends floods first). Returns both runs' observations and what
    the compiled forward returned."""
    calls = Calls()
    assert enable_kernels(), kernels.engine()
    compiled = switch_kernel.kernel()
    assert compiled is not None
    try:
        with monkeypatch.context() as m:
            m.setattr(switch_kernel, "kernel", lambda: calls.wrap(compiled))
            fast = scenario("compiled", calls)
        kernels.disable()
        assert switch_kernel.kernel() is None
        reference = scenario("python", Calls())
    finally:
        kernels.disable()
    assert reference["fast"] == {"calls": 0, "frames": 0, "queued": 0, "dropped": 0, "stops": {}}
    assert fast["fast"]["frames"] == sum(n for n, _ in calls.results)
    runs = [{k: v for k, v in run.items() if k != "fast"} for run in (fast, reference)]
    if not ordered:
        runs = [{k: sorted(v) if k.startswith("guest") else v for k, v in run.items()} for run in runs]
    assert runs[0] == runs[1]
    return fast, reference, calls


def send_round(g: Guest, frames: list[bytes], headers: list[bytes] | None = None,
               layouts: list[TxLayout] | None = None) -> None:  # fmt: skip
    """Post ``frames`` and let the device take them in one TX round (more than a short round)."""
    for i, f in enumerate(frames):
        g.tx.post_tx(f, header=headers[i] if headers else bytes(12),
                     layout=layouts[i] if layouts else TxLayout.ONE)  # fmt: skip
    g.dev.process_tx(1)
    g.tx.reap()


def observed(sw: Switch, *guests: Guest) -> dict[str, Any]:
    got: dict[str, Any] = {f"guest{i}": g.frames() for i, g in enumerate(guests)}
    got["switch"] = sw.stats()
    got["fast"] = got["switch"].pop("compiled")  # (what the compiled forward did: the runs differ there)
    for i, g in enumerate(guests):
        # What each queue carried and dropped (how many batches and interrupts it took may differ).
        queues = g.dev.stats.snapshot()["queues"]
        got[f"dev{i}"] = {"queues": [(q["packets"], q["bytes"], q["drops"]) for q in queues],
                          "pool": g.dev.pool.usage}  # fmt: skip
    return got


def learn(*guests: Guest) -> None:
    for g, mac in zip(guests, (MAC_A, MAC_B, MAC_C), strict=False):
        g.send(bytes(Ether(src=mac, dst=BROADCAST) / ARP()))
    for g in guests:
        g.rx.reap()


def test_a_round_of_learned_unicast_frames_goes_straight_into_the_receivers_buffers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes = [60, 61, 128, 777, 1400, 1514, 60, 300, 999, 1200, 64, 65]
    frames = [udp(n - 42, sport=k) for k, n in enumerate(sizes)]

    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        sw = Switch()
        a, b = guest(sw, "a", ALL), guest(sw, "b", ALL)
        learn(a, b)
        calls.results.clear()  # (the broadcasts that taught the switch: the general path's)
        layouts = [(TxLayout.ONE, TxLayout.TWO)[k % 2] for k in range(len(frames))]
        send_round(a, frames, layouts=layouts)
        got = observed(sw, a, b)
        sw.close()
        return got

    got, _, calls = both(scenario, monkeypatch)
    assert [data for _, data in got["guest1"]] == frames
    assert all(fields == (0, 0, 0, 0, 0, 0, 1) for fields, _ in got["guest1"])
    assert got["dev0"]["pool"] == got["dev1"]["pool"] == 0
    assert got["switch"]["ports"]["b"]["tx_packets"] == 1 + len(frames)
    assert calls.results == [(len(frames), "done")]


def test_the_forward_stops_at_a_frame_for_the_general_path_and_unicast_order_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        sw = Switch()
        a, b, c = guest(sw, "a", ALL), guest(sw, "b", ALL), guest(sw, "c", ALL)
        learn(a, b, c)
        calls.results.clear()  # (the broadcasts that taught the switch: the general path's)
        send_round(a, [udp(40, sport=100 + k) for k in range(9)])  # the first round: the general path
        frames = [udp(100, sport=1), udp(100, sport=2), udp(100, dst=BROADCAST, sport=3), udp(100, sport=4),
                  udp(100, dst="52:54:00:00:00:99", sport=5), udp(100, sport=6), udp(100, dst=MAC_C, sport=7),
                  udp(100, sport=8), udp(100, sport=9)]  # fmt: skip
        send_round(a, frames)
        # C, then B, again: the compiled forward follows the frames to their port.
        send_round(a, [udp(80, dst=MAC_C, sport=20 + k) for k in range(9)])
        send_round(a, [udp(80, sport=30 + k) for k in range(9)])
        got = observed(sw, a, b, c)
        sw.close()
        return got

    fast, reference, calls = both(scenario, monkeypatch, ordered=False)
    ports = {name: [Ether(d)[UDP].sport for _, d in got["guest1"] if Ether(d)[UDP].sport < 100]
             for name, got in (("compiled", fast), ("python", reference))}  # fmt: skip
    # The general path sends a round's flooded frames first; the compiled forward sends the frames
    # before the first flooded one first, as they came.
    assert ports == {"compiled": [1, 2, 3, 5, 4, 6, 8, 9, *range(30, 39)],
                     "python": [3, 5, 1, 2, 4, 6, 8, 9, *range(30, 39)]}  # fmt: skip
    assert [Ether(d)[UDP].sport for _, d in fast["guest2"]] == [3, 5, 7, *range(20, 29)]
    assert calls.results == [(2, "group"), (0, "elsewhere"), (9, "done"), (0, "elsewhere"), (9, "done")]


def test_headers_checksums_and_drops_are_forwarded_as_the_switch_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    partial = HDR.pack(F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0)
    valid = HDR.pack(2, 0, 0, 0, 0, 0, 0)  # DATA_VALID: not the sender's to set
    bad = HDR.pack(F_NEEDS_CSUM, 0, 0, 0, 300, 6, 0)  # the checksum past the frame's end
    headers = [partial, valid, bytes(12), partial, bad, partial, HDR.pack(0, 0, 0, 0, 5, 0, 0), partial,
               bytes(12), partial]  # fmt: skip

    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        sw = Switch()
        a, b, c = guest(sw, "a", ALL), guest(sw, "b", ALL), guest(sw, "c", V1 | MRG)  # C: no GUEST_CSUM
        learn(a, b, c)
        calls.results.clear()  # (the broadcasts that taught the switch: the general path's)
        send_round(a, [udp(40, sport=100 + k) for k in range(9)])  # the first round: the general path
        send_round(a, [udp(200, sport=k) for k in range(10)], headers)
        send_round(a, [udp(200, dst=MAC_C, sport=20 + k) for k in range(9)], [partial] * 9)
        got = observed(sw, a, b, c)
        sw.close()
        return got

    got, _, calls = both(scenario, monkeypatch)
    fields_b = [f[:6] for f, d in got["guest1"] if Ether(d)[UDP].sport < 100]
    assert fields_b[0] == (F_NEEDS_CSUM, 0, 0, 0, 34, 6) and fields_b[1][0] == 0
    assert len(fields_b) == 9 and got["switch"]["ports"]["a"]["drops"] == {"bad_csum_offset": 1}
    assert len(got["guest2"]) == 9 and all(f[:6] == (0,) * 6 for f, _ in got["guest2"])
    assert calls.results[0] == (4, "header") and "offload" in {why for _, why in calls.results}, calls.results


def test_a_receiver_short_of_buffers_gets_the_rest_through_its_backlog_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        sw = Switch(pace=False)  # A's second round into B's backlog (see test_switch_pacing.py)
        a, b = guest(sw, "a", ALL), guest(sw, "b", V1 | MRG | GCSUM, rx=0)
        learn(a, b)
        calls.results.clear()  # (the broadcasts that taught the switch: the general path's)
        b.rx.post_rx(4096, count=5)
        b.rx.post_rx(12 + 256, count=8)  # small buffers: the 1000-byte frame needs several (mergeable)
        send_round(a, [udp(300, sport=k) for k in range(5)] + [udp(958, sport=5)]
                   + [udp(60, sport=6 + k) for k in range(6)])  # fmt: skip
        send_round(a, [udp(70, sport=20 + k) for k in range(9)])  # behind a backlog: not placed ahead of it
        b.rx.post_rx(4096, count=32)
        b.dev.deliver_rx(0)
        got = observed(sw, a, b)
        sw.close()
        return got

    got, _, calls = both(scenario, monkeypatch)
    assert [Ether(d)[UDP].sport for _, d in got["guest1"]] == [*range(12), *range(20, 29)]
    assert got["dev0"]["pool"] == got["dev1"]["pool"] == 0
    # Five frames into the big buffers, the 1000-byte one across four small ones, four more: then
    # no buffer is left, and the rest waits in B's backlog, the next round's behind them.
    assert calls.results == [(10, "done"), (0, "done")], calls.results
    assert (got["fast"]["frames"], got["fast"]["queued"]) == (10, 2 + 9)


def test_an_unlearned_source_is_learned_by_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    other = "52:54:00:00:00:77"  # a second station behind A: not learned yet

    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        sw = Switch()
        a, b = guest(sw, "a", ALL), guest(sw, "b", ALL)
        learn(a, b)
        calls.results.clear()  # (the broadcasts that taught the switch: the general path's)
        send_round(a, [udp(90, sport=1), udp(90, src=other, sport=2), udp(90, src=other, sport=3)]
                   + [udp(90, sport=4 + k) for k in range(7)])  # fmt: skip
        send_round(b, [udp(90, src=MAC_B, dst=other, sport=40 + k) for k in range(9)])
        got = observed(sw, a, b)
        got["learned"] = sw.fdb.counters["learned"]
        sw.close()
        return got

    got, _, calls = both(scenario, monkeypatch)
    assert [Ether(d)[UDP].sport for _, d in got["guest0"]] == list(range(40, 49))
    assert got["learned"] == 3
    assert calls.results[0] == (1, "unlearned") and calls.results[-1] == (9, "done"), calls.results


def test_gso_frames_pass_whole_across_several_buffers_or_go_to_be_segmented(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hdr4 = gso_header(1, 34)

    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        sw = Switch()
        # B takes GSO frames (mergeable 4 KiB buffers: each takes several); C does not (segments).
        a, b, c = guest(sw, "a", ALL), guest(sw, "b", ALL), guest(sw, "c", V1 | MRG | GCSUM)
        learn(a, b, c)
        calls.results.clear()  # (the broadcasts that taught the switch: the general path's)
        send_round(a, [udp(40, sport=100 + k) for k in range(9)])  # the first round: the general path
        sizes = [20000, 1448, 60000, 3000, 9000, 100, 40000, 2000, 7000]
        send_round(a, [tcp4(n) for n in sizes], [hdr4 if n > 1448 else bytes(12) for n in sizes])
        not_tcp = bytearray(tcp4(5000))
        not_tcp[23] = 17  # the IP protocol says UDP: not a frame to pass on as TCP GSO
        send_round(a, [tcp4(4000), bytes(not_tcp), tcp4(4000)] + [tcp4(3000)] * 6, [hdr4] * 9)
        send_round(a, [tcp4(10000, dst=MAC_C)] * 9, [hdr4] * 9)
        got = observed(sw, a, b, c)
        sw.close()
        return got

    got, _, calls = both(scenario, monkeypatch)
    to_b = [(f, d) for f, d in got["guest1"] if UDP not in Ether(d)]
    sizes = (20000, 1448, 60000, 3000, 9000, 100, 40000, 2000, 7000, 4000, 4000, *[3000] * 6)
    assert [len(d) for _, d in to_b] == [len(tcp4(n)) for n in sizes]
    assert to_b[2][1] == tcp4(60000) and to_b[2][0][:6] == tuple(HDR.unpack(hdr4)[:6])
    assert got["switch"]["ports"]["a"]["drops"] == {"bad_gso_frame": 1}
    assert got["switch"]["ports"]["c"]["offload"]["gso_segmented"] == 9
    assert got["dev1"]["pool"] == got["dev2"]["pool"] == 0
    assert calls.results[:2] == [(9, "done"), (1, "header")], calls.results
    assert (0, "offload") in calls.results, calls.results


def test_a_receiver_without_mergeable_buffers_takes_a_frame_only_in_its_next_buffer_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        sw = Switch()
        a, b = guest(sw, "a", ALL), guest(sw, "b", V1 | GCSUM, rx=0)
        learn(a, b)
        calls.results.clear()  # (the broadcasts that taught the switch: the general path's)
        b.rx.post_rx(10 + 600, count=4)
        b.rx.post_rx(10 + 1514, count=12)
        send_round(a, [udp(500, sport=k) for k in range(3)] + [udp(1000, sport=3)]
                   + [udp(60, sport=4 + k) for k in range(6)])  # fmt: skip
        got = observed(sw, a, b)
        sw.close()
        return got

    got, _, calls = both(scenario, monkeypatch)
    # The 1042-byte frame finds a 600-byte buffer next: it is dropped there (buffers are used in order).
    assert [Ether(d)[UDP].sport for _, d in got["guest1"]] == [0, 1, 2, *range(4, 10)]
    assert got["dev1"]["queues"][0][2] == {"too_big": 1, "no_rx_buffer": 1}  # (and A's ARP, before B posted)
    assert calls.results[0] == (3, "no_buffer"), calls.results


def test_the_receivers_buffers_are_taken_several_at_a_time_and_a_broken_one_among_them_is_the_general_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The forward takes B's chains several at a time; a take that meets a broken chain falls back to
    # one at a time, so the frames before it are placed, and the general path meets the broken chain
    # as it would have. The chains taken and not used go back to the ring untouched.
    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        sw = Switch()
        a, b = guest(sw, "a", ALL), guest(sw, "b", ALL, rx=0)
        learn(a, b)
        calls.results.clear()
        b.rx.post_rx(4096, count=3)
        b.rx.post_malformed(Malformed.OUTSIDE_MEMORY)
        b.rx.post_rx(4096, count=4)
        send_round(a, [udp(60, sport=k) for k in range(7)])
        # B's used entries in order: each frame's UDP port, and the broken chain's (returned empty).
        used = [Ether(c.data[12:])[UDP].sport if c.data else None for c in b.rx.reap()]
        got = observed(sw, a)
        got["b"] = {"used": used, "queues": b.dev.stats.snapshot()["queues"][0]["drops"],
                    "pool": b.dev.pool.usage, "held": b.dev.pool.outstanding().tolist(),
                    "last_avail": b.dev.queue(0).last_avail_idx}  # fmt: skip
        sw.close()
        return got

    got, _, calls = both(scenario, monkeypatch)
    assert calls.results[0] == (3, "no_buffer"), calls.results
    assert got["b"]["used"][:4] == [0, 1, 2, None]  # the frames before it, then the broken chain
    assert got["dev0"]["pool"] == got["b"]["pool"] == 0 and got["b"]["held"] == []


def test_a_round_takes_the_receivers_chains_together_and_gives_back_those_it_did_not_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A round of five frames for B, then one for C: the forward takes chains for all six frames
    # left from B, uses five and stops at C's frame. The sixth chain goes back untouched: B's avail
    # side moves on by five, its pool holds nothing, and the chain takes B's next frame.
    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        sw = Switch()
        a, b, c = guest(sw, "a", ALL), guest(sw, "b", ALL, rx=0), guest(sw, "c", ALL)
        learn(a, b, c)
        b.rx.post_rx(4096, count=9)
        send_round(a, [udp(60, sport=99)])  # A's frames go to B now: the forward tries B first
        b.rx.reap()
        calls.results.clear()
        send_round(a, [udp(60, sport=k) for k in range(5)] + [udp(60, dst=MAC_C, sport=5)])
        first = (b.dev.queue(0).last_avail_idx, b.dev.pool.outstanding().tolist())
        send_round(a, [udp(60, sport=10 + k) for k in range(3)])
        got = observed(sw, a, b, c)
        got["b"] = (first, b.dev.queue(0).last_avail_idx, b.dev.pool.outstanding().tolist())
        sw.close()
        return got

    got, _, calls = both(scenario, monkeypatch)
    assert calls.results[0] == (5, "elsewhere") and calls.results[-1] == (3, "done"), calls.results
    assert [Ether(d)[UDP].sport for _, d in got["guest1"]] == [*range(5), *range(10, 13)]
    assert [Ether(d)[UDP].sport for _, d in got["guest2"]] == [5]
    assert got["b"] == ((6, []), 9, [])  # (B's avail side after each round; nothing held)


@pytest.mark.parametrize("seed", range(30))
def test_random_rounds_into_random_buffers_are_forwarded_as_the_general_path_forwards_them(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four rounds of A's frames (small and MTU-sized UDP for B, TCP GSO frames, a few for C) into
    # what B posted before each: buffers of mixed sizes, mergeable or not, now and then a broken
    # chain. Whatever the forward takes, places, queues, stops at or gives back, B must end up with
    # the used entries, drops, avail position and pool the general path gives it.
    hdr4 = gso_header(1, 34)

    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        rnd = random.Random(seed)
        sw = Switch()
        features = rnd.choice([ALL, V1 | MRG | GCSUM, V1 | GCSUM])
        a, b, c = guest(sw, "a", ALL), guest(sw, "b", features, rx=0), guest(sw, "c", ALL)
        learn(a, b, c)
        send_round(a, [udp(40)])  # A's frames go to B now: the forward tries B first
        for _ in range(4):
            for _ in range(rnd.randint(0, 12)):
                if features == ALL and rnd.random() < 0.08:
                    b.rx.post_malformed(Malformed.OUTSIDE_MEMORY)
                else:
                    b.rx.post_rx(rnd.choice([300, 700, 1600, 4096]), count=rnd.randint(1, 4))
            frames, headers = [], []
            for _ in range(rnd.randint(1, 10)):
                kind = rnd.random()
                if kind < 0.6:
                    frames.append(udp(rnd.choice([20, 200, 600, 1400]), sport=rnd.randint(1, 60000)))
                elif kind < 0.8:
                    frames.append(tcp4(rnd.choice([3000, 9000, 20000])))
                else:
                    frames.append(udp(60, dst=MAC_C, sport=rnd.randint(1, 60000)))
                headers.append(hdr4 if kind >= 0.6 and kind < 0.8 else bytes(12))
            send_round(a, frames, headers)
        used = [len(u.data or b"") for u in b.rx.reap()]  # (a broken chain comes back empty)
        got = observed(sw, a, c)
        got["b"] = (used, b.dev.stats.snapshot()["queues"][0]["drops"], b.dev.queue(0).last_avail_idx,
                    b.dev.pool.usage, b.dev.pool.outstanding().tolist())  # fmt: skip
        sw.close()
        return got

    got, _, _ = both(scenario, monkeypatch)
    assert got["b"][3] == 0 and got["b"][4] == []  # nothing held, nothing left marked in use


@pytest.mark.parametrize("vlan", [False, True])
def test_the_compiled_tcp_check_agrees_with_tcp_layout(vlan: bool) -> None:
    def framed(raw: bytes) -> bytes:
        return raw[:12] + b"\x81\x00\x00\x05" + raw[12:] if vlan else raw

    cases = [tcp4(100), tcp6(100), tcp4(0), udp(100), tcp4(2000)[:60], tcp4(2000)[:34 + 19]]
    odd = bytearray(tcp4(100))
    odd[14] = 0x46  # an IPv4 header with options (24 bytes)
    cases.append(bytes(odd))
    odd2 = bytearray(tcp4(100))
    odd2[34 + 12] = 0x40  # a TCP header of 16 bytes: too short
    cases.append(bytes(odd2))
    for raw in cases:
        frame = framed(raw)
        head = np.zeros(switch_kernel.HEAD_BYTES, np.uint8)
        prefix = frame[: switch_kernel.PREFIX]
        head[12 : 12 + len(prefix)] = np.frombuffer(prefix, np.uint8)
        for gso in (1, 4, 3):
            want = tcp_layout(np.frombuffer(frame, np.uint8), gso) is not None
            assert switch_kernel._tcp_ok(head, 12, len(frame), gso) == want, (raw[:40].hex(), gso)


def test_a_receiver_whose_backlog_is_full_loses_frames_counted_as_the_general_path_counts_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def scenario(name: str, calls: Calls) -> dict[str, Any]:
        sw = Switch(pace=False)  # every round taken, so the backlog fills and frames are dropped
        a, b = guest(sw, "a", ALL), guest(sw, "b", ALL, rx=0)
        learn(a, b)
        b.rx.post_rx(4096, count=16)
        calls.results.clear()
        for r in range(4):  # 16 into B's buffers, 256 into its backlog, the rest dropped
            send_round(a, [udp(60 + r, sport=100 * r + k) for k in range(100)])
        send_round(a, [udp(60, sport=900), udp(60, dst=BROADCAST, sport=901), udp(60, sport=902)])
        early = b.frames()
        for posted in (200, 100):  # B catches up: its backlog drains into the new buffers
            b.rx.post_rx(4096, count=posted)
            b.dev.deliver_rx(0)
            early += b.frames()
        send_round(a, [udp(80, sport=1000 + k) for k in range(9)])  # the backlog is empty again
        got = observed(sw, a, b)
        got["guest1"] = early + got["guest1"]
        sw.close()
        return got

    got, _, calls = both(scenario, monkeypatch)
    ports = [Ether(d)[UDP].sport for _, d in got["guest1"]]
    assert ports == [*range(16), *range(16, 100), *range(100, 200), *range(200, 272), *range(1000, 1009)]
    # Dropped for B: the general path's 28 (its backlog filling up) and 902, the compiled forward's
    # 100 and 900 (the backlog full); the broadcasts without a buffer (A's ARP, 901) are floods.
    assert got["switch"]["ports"]["b"]["drops"] == {"no_rx_buffer": 130, "flood_no_rx_buffer": 2}
    # Into B's buffers, then its backlog, then dropped: all in the compiled forward but 901 and 902.
    assert (got["fast"]["frames"], got["fast"]["queued"], got["fast"]["dropped"]) == (25, 256, 129)
    assert calls.results == [(16, "done"), (0, "done"), (0, "done"), (0, "done"), (0, "group"), (9, "done")]
    assert got["dev1"]["pool"] == got["dev0"]["pool"] == 0
