"""Backend counts: does the count a figure comes from agree with the backend's own count of the same traffic?

A benchmark figure is only as good as the count behind it. Every run compares the guest's count
(pktgen's frames, eth0's received frames, iperf3's bytes; with ``--backend-only`` the virtio-user
frontend's port counters, the frontend standing in the guest's place) with what the backend counted
itself (``Carried``): nicsim's stats file (packets and bytes per queue), testpmd's port counters, or,
for QEMU's tap, the TAP's counters in the run's namespace. ``Carried`` is seen from the guest: ``tx``
is what the backend took from the guest, ``rx`` what it gave the guest.

Two rules, by what the two counts cover:

* ``within``: both cover the same traffic (guest TX, where pktgen counts every frame it sent; udp-rr,
  where sockperf counts every reply of its run, the boot's only traffic; and both directions with
  ``--backend-only``, where the frontend's counters span the whole run). They
  may differ by at most one ring's worth: frames still on a ring when one side stopped, and the
  guest's own few frames while it boots (ARP, IPv6). DPDK's virtio-user receiving is allowed two
  rings: its device start also discards, uncounted, what the backend already put on its receive
  ring (``virtqueue_rxvq_flush`` in ``virtio_dev_start``); with the ring left at its stop, DPDK's
  vhost backend was two rings exactly ahead of it here.
* ``at_most``: the guest counted a window inside the backend's longer run (guest RX: the sender runs
  from the guest's boot to the end of the run) or counts something smaller (TCP: iperf3 counts
  payload bytes, the backend whole frames). The guest cannot have counted more than the backend
  carried (plus a ring, for packets); that is all that can be checked.

A check that does not hold fails the run and with it the cell (:func:`nicsim.bench.runner.run_cells`).
This module is pure; it also turns the negotiated virtio features, as the guest's ``link`` workload
or DPDK's virtio-user log reports them, into the cell's JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nicsim.vhost.features import feature_names

from .matrix import Cell, Direction

# QEMU's default rx_queue_size/tx_queue_size for virtio-net and DPDK virtio-user's default queue_size;
# the benchmark changes neither (the backend-only mode reads the frontend's own figure from its log).
RING_SIZE = 256


@dataclass(frozen=True, kw_only=True)
class Carried:
    """What a backend counted itself, seen from the guest; ``None`` where it does not count that."""

    source: str
    tx_packets: int | None = None
    tx_bytes: int | None = None
    rx_packets: int | None = None
    rx_bytes: int | None = None


def check_counts(
    cell: Cell, *, counted: int | None, carried: Carried | None, spans_run: bool, ring: int = RING_SIZE,
    rings: int = 1, who: str = "the guest",
) -> dict[str, Any]:  # fmt: skip
    """Compare ``counted`` (by the guest, or ``who``) with the backend's own count of the same direction.

    ``spans_run``: both counts cover the same traffic (rule ``within``); otherwise ``counted`` is a
    part of it (rule ``at_most``). TCP cells compare bytes with no slack, frame cells packets with
    ``rings`` rings of ``ring`` descriptors. Returns the JSON-ready record; ``ok`` False and
    ``reason`` when it fails."""
    tcp = cell.direction.is_tcp
    unit = "bytes" if tcp else "packets"
    side = "tx" if cell.direction in (Direction.TX, Direction.TCP_TX) else "rx"
    backend = None if carried is None else getattr(carried, f"{side}_{unit}")
    rule = "within" if spans_run and not tcp else "at_most"
    tolerance = 0 if tcp else ring * rings
    source = None if carried is None else carried.source
    out: dict[str, Any] = {"ok": False, "rule": rule, "unit": unit, "guest": counted, "backend": backend,
                           "tolerance": tolerance, "backend_source": source, "reason": None}  # fmt: skip
    if counted is None:
        out["reason"] = f"{who} reported no count of {unit}"
    elif backend is None:
        out["reason"] = f"the backend's own count of {side} {unit} is missing ({source or 'none reported'})"
    elif rule == "within":
        out["ok"] = abs(counted - backend) <= tolerance
        if not out["ok"]:
            apart = abs(counted - backend)
            out["reason"] = (f"{who} counted {counted} {unit}, the backend ({source}) {backend}: "
                             f"{apart} apart, more than {_rings(rings)} ({tolerance})")  # fmt: skip
    else:
        out["ok"] = counted <= backend + tolerance
        if not out["ok"]:
            slack = f" + {tolerance}" if tolerance else ""
            out["reason"] = (f"{who} counted {counted} {unit}, more than the backend ({source}) "
                             f"carried: {backend}{slack}")  # fmt: skip
    return out


def _rings(n: int) -> str:
    return "one ring" if n == 1 else f"{n} rings"


def features_record(mask: int, source: str) -> dict[str, Any]:
    """The negotiated virtio features as the JSON records them: hex, spec names, who said so."""
    return {"source": source, "hex": f"0x{mask:x}", "names": feature_names(mask)}


def guest_features(link: Mapping[str, Any]) -> dict[str, Any] | None:
    """From the guest's ``link`` result: ``features`` is the driver's bit string, bit 0 first."""
    bits = link.get("features")
    if not isinstance(bits, str) or not bits or set(bits) - {"0", "1"}:
        return None
    mask = sum(1 << i for i, c in enumerate(bits) if c == "1")
    return features_record(mask, "guest (virtio driver, sysfs)")


_NEGOTIATED_RE = re.compile(r"features after negotiate = (?:0x)?([0-9a-fA-F]+)")
_VQ_SIZE_RE = re.compile(r"vq_size: (\d+)")


def virtio_user_features(log: str) -> int | None:
    """The features DPDK's virtio PMD negotiated, from its init log (``pmd.net.virtio.init:debug``)."""
    found = _NEGOTIATED_RE.findall(log)
    return int(found[-1], 16) if found else None


def virtio_user_ring(log: str) -> int | None:
    """The largest ring DPDK's virtio PMD set up, from the same log."""
    sizes = [int(s) for s in _VQ_SIZE_RE.findall(log)]
    return max(sizes) if sizes else None
