"""From a :class:`~nicsim.lab.topology.Topology` to what runs: each switch's ``nicsim serve`` command
line, and each guest's MAC, address and workload list. Pure: no I/O, no processes.

**Scoping.** Everything a lab makes is named after the lab, so that several labs run at once on one
host: the sockets live in the lab's own directory, and a MAC nobody gave is derived from the lab's
and the guest's names (locally administered, ``02:..``), so the same guest in two labs gets two MACs.
Addresses are the lab's own business: each switch is a separate wire, and a guest without ``ip``
gets the next free address of its switch's subnet (``10.N.0.0/24`` for the N-th switch, unless it
says otherwise).

**Workloads.** The guest's /init runs its workloads one after the other and powers off after the
last, so every guest's list is, in order:

1. the iperf3 servers its checks need (a server serves one client, then the next workload runs);
2. ``wait-for`` each guest it sends to: its peers may boot later than it does;
3. its own workloads, with a ``target``, ``server`` or ``dst`` that names a guest replaced by that
   guest's address (a ``dst_mac`` by its MAC);
4. what its checks run (a ping, an iperf3 client after a 1 s pause for the server);
5. a long sleep: it stays up, answering the others, until the runner has every guest's results and
   stops them all (``nicsim lab up``: a shell on its console first, for ``nicsim lab console``).

``GuestPlan.expect`` is how many results come before that sleep; ``result_index`` says which result a
user workload or a check reads.
"""

from __future__ import annotations

import hashlib
import ipaddress
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.testvm import Workload

from .topology import GuestSpec, Topology, TopologyError

ADDRESS_KEYS = ("target", "server", "dst")
HOLD_SECONDS = 86_400  # the final sleep: the runner stops the guest long before
WAIT_FOR_SECONDS = 120  # how long a guest waits for a peer to answer before its workloads


@dataclass(frozen=True, kw_only=True)
class GuestPlan:
    name: str
    switch: str
    socket: Path
    mac: str
    ip: str
    spec: GuestSpec
    workloads: tuple[Workload, ...]
    expect: int  # results before the final sleep
    labels: tuple[str, ...]  # what each of those results is, for the report

    @property
    def address(self) -> str:
        return self.ip.split("/")[0]

    def as_json(self) -> dict[str, Any]:
        """Where it is and what it runs (before its final sleep), for the JSON and state files."""
        return {"switch": self.switch, "ip": self.ip, "mac": self.mac, "socket": str(self.socket),
                "workloads": [w.render() for w in self.workloads[: self.expect]]}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SwitchPlan:
    name: str
    argv: tuple[str, ...]
    stats_file: Path
    sockets: Mapping[str, Path]  # guest -> socket
    capture: Path | None


@dataclass(frozen=True, kw_only=True)
class LabPlan:
    topology: Topology
    run_dir: Path
    switches: Mapping[str, SwitchPlan]
    guests: Mapping[str, GuestPlan]
    check_results: Mapping[int, tuple[str, int]] = field(default_factory=dict)  # check -> (guest, result)
    workload_results: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (guest, id) -> result


def lab_mac(lab: str, guest: str) -> str:
    """A locally administered unicast MAC, the same for the same lab and guest names."""
    digest = hashlib.sha256(f"nicsim-lab/{lab}/{guest}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def plan(
    topology: Topology, run_dir: Path, *, python: str = sys.executable, interactive: bool = False
) -> LabPlan:
    """What to start for ``topology``, with sockets, stats and logs under ``run_dir``. ``interactive``
    (``nicsim lab up``): each guest ends with a shell on its console before the final sleep."""
    ips = _addresses(topology)
    macs = {n: g.mac or lab_mac(topology.name, n) for n, g in topology.guests.items()}
    sockets = {n: run_dir / f"{n}.sock" for n in topology.guests}
    lists: dict[str, list[tuple[Workload, str]]] = {n: [] for n in topology.guests}
    check_at: dict[int, tuple[str, int]] = {}
    ids: dict[tuple[str, str], int] = {}

    def addr(n: str) -> str:
        return ips[n].split("/")[0]

    # 1. iperf3 servers first.
    for c in topology.checks:
        if c.kind == "iperf3":
            lists[c.get("to")].append((Workload("iperf3-server"), f"iperf3 server for {c.get('from')}"))
    # 2. wait for every guest this one sends to.
    for n, g in topology.guests.items():
        for peer in sorted(_peers(n, g, topology)):
            lists[n].append(
                (Workload("wait-for", target=addr(peer), timeout=WAIT_FOR_SECONDS), f"wait for {peer}")
            )
    # 3. the guest's own workloads, names resolved.
    for n, g in topology.guests.items():
        for w in g.workloads:
            params = {k: _resolve(k, v, ips, macs, topology) for k, v in w.params.items()}
            if w.id is not None:
                ids[(n, w.id)] = len(lists[n])
            lists[n].append((Workload(w.run, **params), w.id or w.run))
    # 4. what the checks run.
    for i, c in enumerate(topology.checks):
        if c.kind == "ping":
            src = c.get("from")
            check_at[i] = (src, len(lists[src]))
            lists[src].append(
                (
                    Workload(
                        "ping",
                        target=addr(c.get("to")),
                        count=c.get("count", 5),
                        interval=c.get("interval", 0.2),
                        rtts=True,
                    ),
                    c.name,
                )
            )
        elif c.kind == "iperf3":
            src = c.get("from")
            lists[src].append((Workload("sleep", seconds=1), f"pause before {c.name}"))
            check_at[i] = (src, len(lists[src]))
            lists[src].append(
                (
                    Workload(
                        "iperf3-client", server=addr(c.get("to")), time=c.get("seconds", 3), proto="tcp"
                    ),
                    c.name,
                )
            )
        elif c.kind == "result":
            check_at[i] = (c.get("guest"), ids[(c.get("guest"), c.get("workload"))])
    guests: dict[str, GuestPlan] = {}
    tail = (*((Workload("shell"),) if interactive else ()), Workload("sleep", seconds=HOLD_SECONDS))
    for n, g in topology.guests.items():
        items = lists[n]
        guests[n] = GuestPlan(
            name=n,
            switch=g.switch,
            socket=sockets[n],
            mac=macs[n],
            ip=ips[n],
            spec=g,
            workloads=(*(w for w, _ in items), *tail),
            expect=len(items),
            labels=tuple(label for _, label in items),
        )
    switches = {s: _switch_plan(topology, s, run_dir, sockets, python) for s in topology.switches}
    return LabPlan(
        topology=topology,
        run_dir=run_dir,
        switches=switches,
        guests=guests,
        check_results=check_at,
        workload_results=ids,
    )


def _peers(name: str, g: GuestSpec, topology: Topology) -> set[str]:
    """The guests ``name`` sends to: its checks' destinations, and guests its workloads name."""
    peers = {c.get("to") for c in topology.checks if c.kind in ("ping", "iperf3") and c.get("from") == name}
    peers |= {
        str(v)
        for w in g.workloads
        for k, v in w.params.items()
        if k in ADDRESS_KEYS and str(v) in topology.guests
    }
    return peers - {name}


def _resolve(
    key: str, value: Any, ips: Mapping[str, str], macs: Mapping[str, str], topology: Topology
) -> Any:
    if isinstance(value, str) and value in topology.guests:
        if key in ADDRESS_KEYS:
            return ips[value].split("/")[0]
        if key == "dst_mac":
            return macs[value]
    return value


def _addresses(topology: Topology) -> dict[str, str]:
    """Each guest's address with prefix: its own, or the next free one of its switch's subnet."""
    out: dict[str, str] = {}
    for number, (sname, sw) in enumerate(topology.switches.items(), 1):
        subnet = sw.subnet or ipaddress.IPv4Network(f"10.{number}.0.0/24")
        members = [g for g in topology.guests.values() if g.switch == sname]
        taken = {ipaddress.IPv4Interface(g.ip).ip for g in members if g.ip}
        free = (h for h in subnet.hosts() if h not in taken)
        for g in members:
            if g.ip:
                out[g.name] = g.ip
                continue
            host = next(free, None)
            if host is None:
                raise TopologyError(
                    topology.source,
                    f"switches.{sname}.subnet",
                    f"{subnet} has no address left for guest {g.name}",
                )
            out[g.name] = f"{host}/{subnet.prefixlen}"
    return out


def _switch_plan(
    topology: Topology, name: str, run_dir: Path, sockets: Mapping[str, Path], python: str
) -> SwitchPlan:
    sw = topology.switches[name]
    members = {n: sockets[n] for n, g in topology.guests.items() if g.switch == name}
    stats = run_dir / f"switch-{name}.stats.json"
    port = "switch" + "".join(
        f",{k}={v}" for k, v in (("ageing", sw.ageing), ("max_entries", sw.max_entries)) if v is not None
    )
    argv = [
        python,
        "-m",
        "nicsim",
        "serve",
        "--port",
        port,
        "--quiet",
        "--stats-file",
        str(stats),
        "--stats-interval",
        "0.5",
    ]
    for sock in members.values():
        argv += ["--socket", str(sock)]
    for guest, sock in members.items():
        link = topology.links.get(guest)
        for direction in ("tx", "rx"):
            spec = getattr(link, direction) if link is not None else None
            if spec:
                argv += ["--impair", f"{sock}:{direction}:{spec}"]
        if link is not None and link.capture is not None:
            argv += ["--pcap-port", f"{sock}={run_dir / link.capture}"]
    for up in sw.uplinks:
        argv += ["--uplink", up]
    capture = run_dir / sw.capture if sw.capture is not None else None  # an absolute path stays itself
    if capture is not None:
        argv += ["--pcap", str(capture)]
    if capture is not None or "--pcap-port" in argv:
        argv += ["--pcap-format", sw.capture_format]
        if sw.snaplen is not None:
            argv += ["--snaplen", str(sw.snaplen)]
    return SwitchPlan(name=name, argv=tuple(argv), stats_file=stats, sockets=members, capture=capture)
