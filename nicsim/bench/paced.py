"""A paced sender for ``nicsim bench --ndr`` on the qemu-tap peer: ``python -m nicsim.bench.paced``.

It writes the same frame as every other backend's guest-RX sender (:func:`nicsim.bench.blaster.frame_for`:
198.18.0.1 -> 198.18.0.2, UDP checksum 0, to the guest's MAC) raw onto the namespace's TAP, so the
guest does the same work per packet behind every backend. Unlike the blaster it offers a load: exactly
``count`` frames at ``pps``, sent in bursts of ``BURST`` on a clock schedule (burst ``k`` is due at
``k * BURST / pps`` s), then prints one JSON line ``{"offered": N, "sent": S, "errors": E,
"dropped_at_tap": D, "seconds": T, "achieved_pps": A}``. A send the TAP refuses (ENOBUFS: its queue is
full) or drops is an offered frame that was lost, so ``offered`` is always ``count`` and the guest's
count gives the loss. When ``achieved_pps`` falls short of ``pps`` the sender, not the guest, set the
rate: the caller says so.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import socket
import time
from collections.abc import Callable, Sequence

from .blaster import PACKET_QDISC_BYPASS, SOL_PACKET, frame_for

BURST = 32


def paced(send: Callable[[], object], pps: float, count: int, *,
          sleep: Callable[[float], object] = time.sleep,
          monotonic: Callable[[], float] = time.monotonic) -> dict[str, float]:  # fmt: skip
    """Call ``send()`` exactly ``count`` times at ``pps``, in clock-scheduled bursts of ``BURST``."""
    sent = errors = 0
    start = monotonic()
    done = 0
    while done < count:
        wait = start + done / pps - monotonic()
        if wait > 0:
            sleep(wait)
        n = min(BURST, count - done)
        for _ in range(n):
            try:
                send()
                sent += 1
            except OSError:  # ENOBUFS: the TAP's queue is full; the frame was offered and lost
                errors += 1
        done += n
    elapsed = monotonic() - start
    achieved = count / elapsed if elapsed > 0 else 0.0
    return {"offered": count, "sent": sent, "errors": errors,
            "seconds": round(elapsed, 6), "achieved_pps": round(achieved, 1)}  # fmt: skip


def paced_on_tap(ifname: str, frame: bytes, pps: float, count: int) -> dict[str, float]:
    """``frame`` onto ``ifname`` (an ``AF_PACKET`` socket bound to it), ``count`` times at ``pps``."""
    with open(f"/sys/class/net/{ifname}/statistics/tx_dropped", "rb") as counter:
        dropped0 = int(counter.read() or b"0")
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((ifname, 0))
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        out = paced(functools.partial(sock.send, frame), pps, count)
    with open(f"/sys/class/net/{ifname}/statistics/tx_dropped", "rb") as counter:
        out["dropped_at_tap"] = int(counter.read() or b"0") - dropped0
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nicsim.bench.paced", description=__doc__)
    parser.add_argument("--ifname", default="tap0", help="the TAP to write the frames onto (default tap0)")
    parser.add_argument("--dst-mac", required=True, help="the guest's MAC, the frames' destination")
    parser.add_argument("--frame", type=int, required=True, help="Ethernet frame length without FCS")
    parser.add_argument("--pps", type=float, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    frame = frame_for(args.frame, args.dst_mac)
    print(json.dumps(paced_on_tap(args.ifname, frame, args.pps, args.count)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
