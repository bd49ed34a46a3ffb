"""The paced sender of --ndr's qemu-tap trials, on loopback only."""

from __future__ import annotations

import socket

from nicsim.bench.paced import paced


def test_paced_sender_offers_exactly_count_datagrams_at_about_the_rate() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        out = paced("127.0.0.1", 60, 2000.0, 100, port=rx.getsockname()[1])
        rx.settimeout(1.0)
        got = sum(1 for _ in range(100) if len(rx.recv(2048)) == 60 - 42)
    assert out["offered"] == out["sent"] == got == 100 and out["errors"] == 0
    assert out["seconds"] >= 96 / 2000  # paced: the last burst (frames 96..99) is due at 96 / 2000 s


def test_a_refused_send_is_sent_again_not_counted_lost() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # closed once the probe is gone: ICMP port unreachable
    out = paced("127.0.0.1", 60, 1000.0, 40, port=closed)
    assert out["offered"] == 40 and out["refused"] > 0 and out["sent"] + out["errors"] == 40
