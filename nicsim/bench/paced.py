"""A paced UDP sender for ``nicsim bench --ndr`` on the qemu-tap peer: ``python -m nicsim.bench.paced``.

Like :mod:`nicsim.bench.blaster` it runs inside the benchmark's own network namespace and sends to
one address only, the guest's, on the namespace's TAP. Unlike the blaster it offers a load: exactly
``count`` datagrams at ``pps``, sent in bursts of ``BURST`` on a clock schedule (burst ``k`` is due
at ``k * BURST / pps`` s), then prints one JSON line ``{"offered": N, "sent": S, "errors": E,
"refused": R, "seconds": T, "achieved_pps": A}``. A send that fails (ENOBUFS: the TAP's queue is
full) is an offered frame that was lost, so ``offered`` is always ``count``; a send refused with
ECONNREFUSED (the guest's ICMP port unreachable, reported on the connected socket) sent nothing and
is sent again. When ``achieved_pps`` falls short of ``pps`` the sender, not the guest, set the rate:
the caller says so.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from collections.abc import Sequence

HEADERS = 14 + 20 + 8
BURST = 32
DISCARD_PORT = 9


def paced(dst: str, frame_len: int, pps: float, count: int, *, port: int = DISCARD_PORT) -> dict[str, float]:
    payload = bytes(max(frame_len - HEADERS, 0))
    sent = errors = refused = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((dst, port))
        send = sock.send
        start = time.monotonic()
        done = 0
        while done < count:
            due = start + done / pps
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            n = min(BURST, count - done)
            for _ in range(n):
                try:
                    send(payload)
                    sent += 1
                except ConnectionRefusedError:
                    # The guest's ICMP port unreachable (to port 9, rate-limited) comes back as a
                    # pending error on this connected socket, reported by a send that then sends
                    # nothing: not a lost frame, so send it again.
                    refused += 1
                    try:
                        send(payload)
                        sent += 1
                    except OSError:
                        errors += 1
                except OSError:
                    errors += 1
            done += n
        elapsed = time.monotonic() - start
    achieved = count / elapsed if elapsed > 0 else 0.0
    return {"offered": count, "sent": sent, "errors": errors, "refused": refused,
            "seconds": round(elapsed, 6), "achieved_pps": round(achieved, 1)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nicsim.bench.paced", description=__doc__)
    parser.add_argument("--dst", required=True, help="the one IPv4 address to send to")
    parser.add_argument("--frame", type=int, required=True, help="Ethernet frame length without FCS")
    parser.add_argument("--pps", type=float, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(paced(args.dst, args.frame, args.pps, args.count)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
