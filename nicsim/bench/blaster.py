"""A bounded UDP sender for the qemu-tap guest-RX cells: ``python -m nicsim.bench.blaster``.

It runs inside the benchmark's own network namespace (``ip netns exec``) and sends UDP datagrams to
one address only — the guest's, on the namespace's TAP — for a fixed number of seconds, then prints
one JSON line ``{"sent": N, "errors": E, "seconds": S}``. A datagram of ``payload = frame - 42`` bytes
makes an Ethernet frame of ``frame`` bytes (14 Ethernet + 20 IPv4 + 8 UDP headers). Send errors
(ENOBUFS when the TAP's queue is full) are counted and skipped: QEMU not keeping up is what is measured.
The Linux host's pktgen would send faster, but it needs a kernel module on the host; this needs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import time
from collections.abc import Sequence

HEADERS = 14 + 20 + 8
BURST = 256  # sends between clock reads: keeps time.monotonic() off the per-packet path
DISCARD_PORT = 9


def blast(dst: str, frame_len: int, seconds: float, *, port: int = DISCARD_PORT) -> dict[str, float]:
    payload = bytes(max(frame_len - HEADERS, 0))
    sent = errors = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((dst, port))
        send = sock.send
        start = time.monotonic()
        deadline = start + seconds
        # SIGINT (the benchmark stopping it early) ends the loop but still reports the counts.
        with contextlib.suppress(KeyboardInterrupt):
            while time.monotonic() < deadline:
                for _ in range(BURST):
                    try:
                        send(payload)
                    except OSError:
                        errors += 1
                sent += BURST
        elapsed = time.monotonic() - start
    return {"sent": sent - errors, "errors": errors, "seconds": round(elapsed, 6)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nicsim.bench.blaster", description=__doc__)
    parser.add_argument("--dst", required=True, help="the one IPv4 address to send to")
    parser.add_argument("--frame", type=int, required=True, help="Ethernet frame length without FCS")
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(blast(args.dst, args.frame, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
