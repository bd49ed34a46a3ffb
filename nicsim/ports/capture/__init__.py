"""Packet capture: any port's traffic written to a pcap or pcapng file that tcpdump and Wireshark read.

:mod:`~nicsim.ports.capture.records` builds the file bytes a batch at a time,
:mod:`~nicsim.ports.capture.writer` owns a file (interfaces, size limit and rotation, cost), and
:mod:`~nicsim.ports.capture.port` wraps a port so that what it sends and receives is captured.
"""

from __future__ import annotations

from nicsim.ports.capture.port import CapturingPort, capturing
from nicsim.ports.capture.records import MAX_SNAPLEN, Direction, Format
from nicsim.ports.capture.writer import CaptureConfig, CaptureError, CaptureWriter, rotated_name

__all__ = [
    "MAX_SNAPLEN", "CaptureConfig", "CaptureError", "CaptureWriter", "CapturingPort", "Direction", "Format",
    "capturing", "rotated_name",
]
