"""Reading capture files back two independent ways: Debian's ``tcpdump -r`` and scapy's raw readers.

``read_capture(path)`` returns every record as a :class:`Captured` (bytes as stored, original length,
timestamp in ns, interface name and direction for pcapng) through scapy; ``tcpdump(path)`` runs
``tcpdump -r PATH -nn -e`` and returns its header line and one :class:`Dumped` per frame line.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from scapy.utils import RawPcapNgReader, RawPcapReader

PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


@dataclass(frozen=True)
class Captured:
    data: bytes
    wirelen: int
    ts_ns: int
    interface: str | None = None  # pcapng only
    direction: int | None = None  # pcapng only: 1 inbound, 2 outbound


def read_capture(path: Path) -> list[Captured]:
    if path.read_bytes()[:4] == PCAPNG_MAGIC:
        out = []
        with RawPcapNgReader(str(path)) as ng:
            for data, meta in ng:
                units = (meta.tshigh << 32) | meta.tslow
                out.append(Captured(data, meta.wirelen, units * 1_000_000_000 // meta.tsresol,
                                    meta.ifname.decode(), meta.direction))  # fmt: skip
        return out
    with RawPcapReader(str(path)) as pcap:
        scale = 1 if pcap.nano else 1000
        # scapy names the fraction usec whatever the resolution; nano says which it is.
        return [Captured(data, meta.wirelen, meta.sec * 10**9 + meta.usec * scale) for data, meta in pcap]


@dataclass(frozen=True)
class Dumped:
    src: str
    dst: str
    length: int  # the frame's original length, as tcpdump -e prints it
    line: str


_LINE = re.compile(r"^\S+ (?:(?:In|Out) )?([0-9a-f:]{17}) > ([0-9a-f:]{17}), .*?length (\d+)")


def tcpdump(path: Path, *extra: str) -> tuple[str, list[Dumped]]:
    """(the 'reading from file ...' line, one entry per frame) of ``tcpdump -r path -nn -e``."""
    proc = subprocess.run(["tcpdump", "-r", str(path), "-nn", "-e", *extra], capture_output=True, text=True,
                          timeout=30, check=True)  # fmt: skip
    header = next((line for line in proc.stderr.splitlines() if line.startswith("reading from file")), "")
    frames = []
    for line in proc.stdout.splitlines():
        m = _LINE.match(line)
        assert m, f"tcpdump printed an unexpected line: {line!r}"
        frames.append(Dumped(m.group(1), m.group(2), int(m.group(3)), line))
    return header, frames
