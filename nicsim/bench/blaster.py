"""A bounded frame sender for the qemu-tap guest-RX cells: ``python -m nicsim.bench.blaster``.

It runs inside the benchmark's own network namespace (``ip netns exec``) and writes one prebuilt
Ethernet frame, again and again, onto that namespace's TAP (an ``AF_PACKET`` socket bound to it), for
a fixed number of seconds; QEMU reads the TAP and hands the frames to the guest. The frame is the one
nicsim's generator and DPDK testpmd's txonly send (``frame_for``: UDP 198.18.0.1:9 -> 198.18.0.2:9,
checksum 0, to the guest's MAC), so every backend's guest does the same work per frame: it counts it
on eth0 and its IP layer drops it (not its address), with no checksum to verify.

The sender must not be the bottleneck, and its CPU share must say whether it was. A TAP never blocks
a writer: when QEMU does not read fast enough, the TAP's queue fills and the kernel drops what comes
next (the TAP's ``tx_dropped``). So after each burst the sender reads that counter (one ``pread`` of
sysfs) and, if it rose, sleeps ``BACKOFF`` seconds before the next burst: the queue stays full, and
the sender uses only the CPU it needs to keep it so. A sender near 100 % of its core never found the
queue full — it, not QEMU, set the rate (the benchmark flags such a cell). At the end it prints one
JSON line ``{"sent", "dropped_at_tap", "refused", "backoffs", "seconds"}`` (``refused``: sends the
device turned away with ENOBUFS, also a full queue).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import socket
import time
from collections.abc import Callable, Sequence

from nicsim.ports.generator import GeneratorConfig, GeneratorPort

BURST = 64  # frames between reads of the clock and the TAP's drop counter
BACKOFF = 0.0002  # seconds to sleep once the TAP's queue was found full (it holds 1000 frames)
SOL_PACKET, PACKET_QDISC_BYPASS = 263, 20  # linux/socket.h, linux/if_packet.h: skip the qdisc
#: the frame every backend sends the guest (nicsim.bench.serve.TESTPMD_FRAME, testpmd's txonly)
SRC_IP, DST_IP = "198.18.0.1", "198.18.0.2"


def frame_for(frame_len: int, dst_mac: str) -> bytes:
    """The ``frame_len``-byte UDP frame to ``dst_mac`` that nicsim's generator sends in the RX cells."""
    port = GeneratorPort(GeneratorConfig(size=frame_len, dst_mac=dst_mac, src_ip=SRC_IP, dst_ip=DST_IP,
                                         udp_checksum=False))  # fmt: skip
    return port.template.tobytes()


def _dropped(fd: int) -> int:
    return int(os.pread(fd, 32, 0) or b"0")


def send_loop(send: Callable[[], object], dropped: Callable[[], int], seconds: float, *,
              sleep: Callable[[float], object] = time.sleep,
              monotonic: Callable[[], float] = time.monotonic) -> dict[str, float]:  # fmt: skip
    """Call ``send()`` in bursts for ``seconds``; after a burst in which the TAP's drop counter
    (``dropped()``) rose or a send was refused (ENOBUFS), sleep ``BACKOFF``: the queue is full."""
    sent = refused = backoffs = 0
    dropped0 = last = dropped()
    start = monotonic()
    deadline = start + seconds
    # SIGINT (the benchmark stopping it early) ends the loop but still reports the counts.
    with contextlib.suppress(KeyboardInterrupt):
        while monotonic() < deadline:
            full = False
            for _ in range(BURST):
                try:
                    send()
                except OSError as err:  # ENOBUFS: the device refused it (queue stopped): full
                    if err.errno != errno.ENOBUFS:
                        raise
                    refused += 1
                    full = True
                    break
                sent += 1
            now = dropped()
            if full or now != last:
                last = now
                backoffs += 1
                sleep(BACKOFF)
    elapsed = monotonic() - start
    return {"sent": sent, "dropped_at_tap": dropped() - dropped0, "refused": refused, "backoffs": backoffs,
            "seconds": round(elapsed, 6)}  # fmt: skip


def blast(ifname: str, frame: bytes, seconds: float) -> dict[str, float]:
    """``frame`` onto ``ifname`` (an ``AF_PACKET`` socket bound to it) for ``seconds``."""
    with open(f"/sys/class/net/{ifname}/statistics/tx_dropped", "rb", buffering=0) as counter, \
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:  # fmt: skip
        stats = counter.fileno()
        sock.bind((ifname, 0))
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        return send_loop(functools.partial(sock.send, frame), functools.partial(_dropped, stats), seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nicsim.bench.blaster", description=__doc__)
    parser.add_argument("--ifname", default="tap0", help="the TAP to write the frames onto (default tap0)")
    parser.add_argument("--dst-mac", required=True, help="the guest's MAC, the frames' destination")
    parser.add_argument("--frame", type=int, required=True, help="Ethernet frame length without FCS")
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(blast(args.ifname, frame_for(args.frame, args.dst_mac), args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
