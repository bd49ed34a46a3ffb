"""The switch's forwarding database: learning, the flooding rules, ageing, moves, eviction and a port
leaving, on batches of MAC keys read from real frame bytes; the fan-out of a batch to ports, and the
per-port counters."""

from __future__ import annotations

import numpy as np
import pytest

from nicsim.ports import frames as fr
from nicsim.ports.fdb import FILTER, FLOOD, ForwardingTable, fan_out, is_group, mac_key, mac_keys, mac_text
from nicsim.ports.port_counters import PortCounters

A, B, C = (mac_key(f"52:54:00:00:00:0{i}") for i in (1, 2, 3))
BCAST = mac_key("ff:ff:ff:ff:ff:ff")
MCAST = mac_key("01:00:5e:00:00:fb")  # mDNS
IPV6_MCAST = mac_key("33:33:00:00:00:01")


def keys(*macs: int) -> np.ndarray:
    return np.array(macs, dtype=np.uint64)


def test_mac_keys_read_destination_and_source_from_frames() -> None:
    frames = [
        fr.ethernet(fr.mac_bytes("52:54:00:00:00:02"), fr.mac_bytes("52:54:00:00:00:01"), 0x0800, b"x"),
        fr.ethernet(fr.BROADCAST_MAC, fr.mac_bytes("52:54:00:00:00:03"), 0x0806, b"y"),
    ]
    data = np.frombuffer(b"\0\0" + b"".join(frames), np.uint8).copy()
    offsets = np.array([2, 2 + len(frames[0])], np.int64)
    assert mac_keys(data, offsets).tolist() == [B, BCAST]
    assert mac_keys(data, offsets, at=6).tolist() == [A, C]
    assert mac_text(A) == "52:54:00:00:00:01"
    assert mac_key(fr.mac_bytes("52:54:00:00:00:01")) == A
    with pytest.raises(ValueError, match="not a MAC"):
        mac_key("52:54:00")


def test_group_bit_is_the_first_octets_low_bit() -> None:
    assert is_group(keys(BCAST, MCAST, IPV6_MCAST, A)).tolist() == [True, True, True, False]
    assert not is_group(keys(mac_key("02:00:00:00:00:01")))[0]  # locally administered unicast


def test_unknown_unicast_floods_until_learned() -> None:
    t = ForwardingTable()
    assert t.lookup(keys(A, B), now=0.0).tolist() == [FLOOD, FLOOD]
    t.learn(keys(A, A, A), port=0, now=1.0)
    t.learn(keys(B), port=3, now=1.0)
    assert len(t) == 2
    assert t.lookup(keys(A, B, C, A), now=2.0).tolist() == [0, 3, FLOOD, 0]
    assert t.counters["learned"] == 2
    assert t.counters["hit"] == 3 and t.counters["flood_unknown"] == 3  # A, B before learning; C


def test_broadcast_and_multicast_always_flood_and_are_never_learned() -> None:
    t = ForwardingTable()
    t.learn(keys(BCAST, MCAST, A), port=1, now=0.0)
    assert len(t) == 1 and t.counters["group_source"] == 2
    assert t.lookup(keys(BCAST, MCAST, IPV6_MCAST), now=0.0).tolist() == [FLOOD] * 3
    assert t.counters["flood_group"] == 3


def test_destination_behind_the_ingress_port_is_filtered() -> None:
    t = ForwardingTable()
    t.learn(keys(A, B), port=0, now=0.0)
    t.learn(keys(C), port=1, now=0.0)
    out = t.lookup(keys(A, C, BCAST), now=0.0, ingress=0)
    assert out.tolist() == [FILTER, 1, FLOOD]
    assert t.counters["filtered"] == 1


def test_entries_age_out_after_ageing_seconds_unless_seen_again() -> None:
    t = ForwardingTable(ageing=10.0)
    t.learn(keys(A, B), port=0, now=0.0)
    t.learn(keys(A), port=0, now=5.0)  # A refreshed as a source; B is not
    assert t.lookup(keys(A, B), now=9.999).tolist() == [0, 0]
    assert t.lookup(keys(A, B), now=10.0).tolist() == [0, FLOOD]  # expired at exactly ageing seconds
    t.lookup(keys(A), now=14.0)  # a lookup does not refresh
    assert t.port_of(A, now=15.0) is None
    assert t.expire(now=15.0) == 2 and len(t) == 0 and t.counters["aged"] == 2


def test_ageing_zero_is_a_hub() -> None:
    t = ForwardingTable(ageing=0.0)
    t.learn(keys(A), port=2, now=1.0)
    assert t.lookup(keys(A), now=1.0).tolist() == [FLOOD]


def test_default_ageing_is_linux_bridges_300_seconds() -> None:
    t = ForwardingTable()
    t.learn(keys(A), port=0, now=0.0)
    assert t.port_of(A, now=299.9) == 0
    assert t.port_of(A, now=300.0) is None


def test_a_mac_seen_on_another_port_moves_there() -> None:
    t = ForwardingTable()
    t.learn(keys(A, B), port=0, now=0.0)
    t.learn(keys(A), port=2, now=1.0)
    assert t.lookup(keys(A, B), now=1.0).tolist() == [2, 0]
    assert t.counters["moved"] == 1 and t.counters["learned"] == 2 and len(t) == 2


def test_the_table_is_bounded_and_evicts_the_least_recently_seen() -> None:
    t = ForwardingTable(max_entries=3)
    for i, mac in enumerate((A, B, C)):
        t.learn(keys(mac), port=i, now=float(i))
    t.learn(keys(A), port=0, now=5.0)  # A is now the most recent; B the oldest
    d = mac_key("52:54:00:00:00:0d")
    t.learn(keys(d), port=3, now=6.0)
    assert len(t) == 3 and t.counters["evicted"] == 1
    assert t.lookup(keys(A, B, C, d), now=6.0).tolist() == [0, FLOOD, 2, 3]


def test_aged_entries_make_room_before_live_ones_are_evicted() -> None:
    t = ForwardingTable(max_entries=2, ageing=10.0)
    t.learn(keys(A), port=0, now=0.0)
    t.learn(keys(B), port=1, now=8.0)
    t.learn(keys(C), port=2, now=12.0)  # A has aged out: it goes, B stays
    assert t.counters["evicted"] == 0 and t.counters["aged"] == 1
    assert t.lookup(keys(B, C), now=12.0).tolist() == [1, 2]


def test_a_batch_larger_than_the_table_keeps_it_bounded() -> None:
    t = ForwardingTable(max_entries=100)
    macs = np.arange(1000, dtype=np.uint64) * 2 + (0x525400 << 24)  # even first octet: unicast
    t.learn(macs, port=1, now=0.0)
    assert len(t) == 100 and t.counters["evicted"] == 900
    assert (t.lookup(macs, now=0.0) != FLOOD).sum() == 100


def test_forget_port_drops_only_that_ports_entries() -> None:
    t = ForwardingTable()
    t.learn(keys(A, B), port=0, now=0.0)
    t.learn(keys(C), port=1, now=0.0)
    assert t.entries_per_port(3).tolist() == [2, 1, 0]
    assert t.forget_port(0) == 2
    assert t.lookup(keys(A, B, C), now=0.0).tolist() == [FLOOD, FLOOD, 1]
    assert t.forget_port(0) == 0
    assert t.counters["forgotten"] == 2
    assert t.entries(now=1.0) == [("52:54:00:00:00:03", 1, 1.0)]


def test_many_addresses_round_trip_through_one_batch() -> None:
    rng = np.random.default_rng(1)
    macs = np.unique(rng.integers(0, 1 << 48, 5000, dtype=np.uint64) & ~np.uint64(1 << 40))  # unicast
    ports = rng.integers(0, 8, macs.size)
    t = ForwardingTable(max_entries=10_000)
    for p in range(8):
        t.learn(macs[ports == p], port=p, now=0.0)
    order = rng.permutation(macs.size)
    assert (t.lookup(macs[order], now=1.0) == ports[order]).all()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="ageing"):
        ForwardingTable(ageing=-1)
    with pytest.raises(ValueError, match="max_entries"):
        ForwardingTable(max_entries=0)
    with pytest.raises(ValueError, match="port"):
        ForwardingTable().learn(keys(A), port=-1, now=0.0)


def test_fan_out_sends_known_frames_to_their_port_and_floods_the_rest_to_all_but_the_ingress() -> None:
    out = np.array([2, FLOOD, 1, FILTER, FLOOD, 2], np.int32)
    fan = fan_out(out, ingress=0, ports=4)
    assert {p: v.tolist() for p, v in fan.items()} == {1: [1, 2, 4], 2: [0, 1, 4, 5], 3: [1, 4]}
    only_up = fan_out(out, ingress=3, ports=[0, 2])  # port 1 is down: nothing goes there
    assert {p: v.tolist() for p, v in only_up.items()} == {0: [1, 4], 2: [0, 1, 4, 5]}
    assert fan_out(np.array([FILTER], np.int32), ingress=0, ports=3) == {}


def test_port_counters_by_batch_by_fan_out_and_drops_by_reason() -> None:
    c = PortCounters(2)
    c.received(0, np.array([60, 1514], np.uint32))
    c.sent(1, np.array([60], np.uint32))
    c.sent_many(np.array([1, 3, 3], np.int64), np.array([100, 200, 300], np.uint32))  # grows to 4 ports
    c.dropped(3, "no_rx_buffer", 5)
    c.dropped(3, "loss")
    assert c.ports == 4
    assert c.port(0) == {"rx_packets": 2, "rx_bytes": 1574, "tx_packets": 0, "tx_bytes": 0, "drops": {}}
    assert c.port(1)["tx_packets"] == 2 and c.port(1)["tx_bytes"] == 160
    assert c.port(3) == {
        "rx_packets": 0, "rx_bytes": 0, "tx_packets": 2, "tx_bytes": 500,
        "drops": {"loss": 1, "no_rx_buffer": 5},
    }
    assert c.port(9)["tx_packets"] == 0
    c.forget(3)
    assert c.port(3)["tx_bytes"] == 0 and c.port(3)["drops"] == {}
    with pytest.raises(ValueError, match="out of range"):
        c.dropped(-1, "loss")


@pytest.mark.parametrize("seed", range(3))
def test_one_address_at_a_time_learns_looks_up_and_counts_as_batches_do(seed: int) -> None:
    # The switch's path for a frame or two (learn_one, lookup_one) against the batch calls, on a
    # small table that evicts and ages out, with group addresses, moves and filtered destinations.
    rng = np.random.default_rng(seed)
    macs = [mac_key(f"52:54:00:00:00:{i:02x}") for i in range(6)] + [mac_key("ff:ff:ff:ff:ff:ff")]
    batch, single = ForwardingTable(ageing=5.0, max_entries=4), ForwardingTable(ageing=5.0, max_entries=4)
    now = 0.0
    for _ in range(300):
        now += float(rng.choice([0.1, 0.5, 3.0]))
        port, src, dst = int(rng.integers(0, 3)), macs[int(rng.integers(0, 7))], macs[int(rng.integers(0, 7))]
        batch.learn(np.array([src], np.uint64), port, now)
        single.learn_one(src, port, now)
        ingress = int(rng.integers(0, 3))
        want = int(batch.lookup(np.array([dst], np.uint64), now, ingress=ingress)[0])
        assert single.lookup_one(dst, now, ingress=ingress) == want
        assert single.counters == batch.counters and len(single) == len(batch)
    assert batch.counters["filtered"] and batch.counters["evicted"] and batch.counters["moved"]
