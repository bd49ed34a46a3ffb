"""Names, MACs and addresses that no other pytest-xdist worker (or other run on the host) will pick.

This module owns the uniqueness rule of the pytest plugin. A worker is named by pytest-xdist's
``PYTEST_XDIST_WORKER`` (``gw0``, ``gw1``, ...; ``main`` without xdist) and numbered from it; every
name also carries the process id, so two runs on one host stay apart too. MACs are locally
administered unicast (first octet ``02``): ``02:WW:PP:PP:NN:NN`` with the worker number, the low 16
bits of the pid and a per-process counter, so they differ per worker and per VM. Addresses come from
``10.0.0.0/8``: one ``/16`` per worker (``10.(128 + worker % 128).0.0/16``), cut into ``/24`` subnets
that a test asks for by index.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from dataclasses import dataclass, field

XDIST_WORKER_ENV = "PYTEST_XDIST_WORKER"
_WORKER_RE = re.compile(r"^gw(\d+)$")


def worker_id() -> str:
    """pytest-xdist's name for this worker (``gw3``), or ``main`` when tests run without xdist."""
    return os.environ.get(XDIST_WORKER_ENV, "") or "main"


def worker_number(worker: str) -> int:
    """``gw3`` → 3; any other name (``main``, a custom id) → 0 (it runs alone, or is the only worker)."""
    m = _WORKER_RE.match(worker)
    return int(m.group(1)) if m else 0


@dataclass
class WorkerIds:
    """The unique-name source of one worker process; ``tag`` prefixes names (``gw3-41237``)."""

    worker: str = field(default_factory=worker_id)
    pid: int = field(default_factory=os.getpid)
    _macs: itertools.count[int] = field(default_factory=itertools.count, repr=False)
    _names: itertools.count[int] = field(default_factory=itertools.count, repr=False)

    @property
    def number(self) -> int:
        return worker_number(self.worker)

    @property
    def tag(self) -> str:
        return f"{self.worker}-{self.pid}"

    def name(self, base: str) -> str:
        """``base-gw3-41237-N``: a name no other worker, run or earlier call of this one uses."""
        return f"{base}-{self.tag}-{next(self._names)}"

    def mac(self) -> str:
        """A fresh locally administered unicast MAC, unique per worker, per process and per call."""
        n = next(self._macs) & 0xFFFF
        octets = (0x02, self.number & 0xFF, (self.pid >> 8) & 0xFF, self.pid & 0xFF, n >> 8, n & 0xFF)
        return ":".join(f"{o:02x}" for o in octets)

    def subnet(self, index: int = 0) -> ipaddress.IPv4Network:
        """The ``index``-th ``/24`` (0..255) of this worker's ``/16``: ``10.(128 + w % 128).index.0/24``."""
        if not 0 <= index <= 255:
            raise ValueError(f"subnet index {index} is not 0..255")
        return ipaddress.IPv4Network(f"10.{128 + self.number % 128}.{index}.0/24")

    def address(self, host: int, index: int = 0) -> str:
        """Host ``host`` (1..254) of ``subnet(index)``, with its prefix (``TestVM(guest_ip=...)``)."""
        net = self.subnet(index)
        if not 1 <= host <= 254:
            raise ValueError(f"host number {host} is not 1..254")
        return f"{net.network_address + host}/{net.prefixlen}"
