"""From a :class:`~nicsim.lab.topology.Topology` to what runs: each switch's ``nicsim serve`` command
line, and each guest's MAC, address and workload list. Pure: no I/O, no processes.

**Scoping.** Everything a lab makes is named after the lab, so that several labs run at once on one
host: the sockets live in the lab's own directory, and a MAC nobody gave is derived from the lab's
and the guest's names (locally administered, ``02:..``), so the same guest in two labs gets two MACs.
Addresses are the lab's own business: each switch is a separate wire, and a NIC without ``ip``
gets the next free address of its switch's subnet (``10.N.0.0/24`` for the N-th switch, unless it
says otherwise). A guest with several NICs (a router) has a socket, a MAC and an address per NIC;
where a check or workload names it, it is its address on a switch the sender is on (else its first).
A route's switch becomes that switch's subnet and a gateway guest its address on the shared switch.

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

from qemu.testvm import Route, Workload

from .topology import GuestSpec, Topology, TopologyError, subnet_of

ADDRESS_KEYS = ("target", "server", "dst")
HOLD_SECONDS = 86_400  # the final sleep: the runner stops the guest long before


@dataclass(frozen=True, kw_only=True)
class NicPlan:
    switch: str
    socket: Path
    mac: str
    ip: str

    @property
    def address(self) -> str:
        return self.ip.split("/")[0]

    def as_json(self) -> dict[str, Any]:
        return {"switch": self.switch, "ip": self.ip, "mac": self.mac, "socket": str(self.socket)}


@dataclass(frozen=True, kw_only=True)
class GuestPlan:
    name: str
    nics: tuple[NicPlan, ...]  # eth0 first
    spec: GuestSpec
    workloads: tuple[Workload, ...]
    expect: int  # results before the final sleep
    labels: tuple[str, ...]  # what each of those results is, for the report
    routes: tuple[Route, ...] = ()

    # Its first NIC's, as a one-NIC guest has them.
    @property
    def switch(self) -> str:
        return self.nics[0].switch

    @property
    def socket(self) -> Path:
        return self.nics[0].socket

    @property
    def mac(self) -> str:
        return self.nics[0].mac

    @property
    def ip(self) -> str:
        return self.nics[0].ip

    @property
    def address(self) -> str:
        return self.nics[0].address

    def as_json(self) -> dict[str, Any]:
        """Where it is and what it runs (before its final sleep), for the JSON and state files: its
        first NIC's keys, then every NIC (``nics``), its forwarding and routes."""
        return {**self.nics[0].as_json(), "nics": [n.as_json() for n in self.nics],
                "forward": self.spec.forward, "routes": [r.render() for r in self.routes],
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
    nics = {n: _nics(topology, n, g, run_dir, ips) for n, g in topology.guests.items()}
    lists: dict[str, list[tuple[Workload, str]]] = {n: [] for n in topology.guests}
    check_at: dict[int, tuple[str, int]] = {}
    ids: dict[tuple[str, str], int] = {}

    def addr(n: str, src: str) -> str:
        return address_of(nics, n, src)

    # 1. iperf3 servers first.
    for c in topology.checks:
        if c.kind == "iperf3":
            lists[c.get("to")].append((Workload("iperf3-server"), f"iperf3 server for {c.get('from')}"))
    # 2. wait for every guest this one sends to.
    for n, g in topology.guests.items():
        for peer in sorted(_peers(n, g, topology)):
            lists[n].append(
                (Workload("wait-for", target=addr(peer, n), timeout=round(topology.wait)), f"wait for {peer}")
            )
    # 3. the guest's own workloads, names resolved.
    for n, g in topology.guests.items():
        for w in g.workloads:
            params = {k: _resolve(k, v, n, nics) for k, v in w.params.items()}
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
                        target=addr(c.get("to"), src),
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
                        "iperf3-client", server=addr(c.get("to"), src), time=c.get("seconds", 3), proto="tcp"
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
            nics=nics[n],
            routes=_routes(topology, g, nics),
            spec=g,
            workloads=(*(w for w, _ in items), *tail),
            expect=len(items),
            labels=tuple(label for _, label in items),
        )
    switches = {s: _switch_plan(topology, s, run_dir, nics, python) for s in topology.switches}
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


def nic_of(nics: Mapping[str, tuple[NicPlan, ...]], guest: str, src: str) -> NicPlan:
    """``guest``'s NIC as ``src`` reaches it: on the first switch they share, else its first (a guest
    behind a router)."""
    near = {n.switch for n in nics[src]}
    return next((n for n in nics[guest] if n.switch in near), nics[guest][0])


def address_of(nics: Mapping[str, tuple[NicPlan, ...]], guest: str, src: str) -> str:
    return nic_of(nics, guest, src).address


def _resolve(key: str, value: Any, src: str, nics: Mapping[str, tuple[NicPlan, ...]]) -> Any:
    if isinstance(value, str) and value in nics:
        if key in ADDRESS_KEYS:
            return address_of(nics, value, src)
        if key == "dst_mac":
            return nic_of(nics, value, src).mac
    return value


def _nics(
    topology: Topology, name: str, g: GuestSpec, run_dir: Path, ips: Mapping[tuple[str, str], str]
) -> tuple[NicPlan, ...]:
    """A one-NIC guest's socket is ``NAME.sock`` and its MAC made from its name; a guest with several
    has ``NAME.SWITCH.sock`` each ('.' is in no name) and, after the first, MACs made from both."""
    several = len(g.nics) > 1
    return tuple(
        NicPlan(
            switch=nic.switch,
            socket=run_dir / (f"{name}.{nic.switch}.sock" if several else f"{name}.sock"),
            mac=nic.mac or lab_mac(topology.name, f"{name}.{nic.switch}" if i else name),
            ip=ips[(name, nic.switch)],
        )
        for i, nic in enumerate(g.nics)
    )


def _routes(topology: Topology, g: GuestSpec, nics: Mapping[str, tuple[NicPlan, ...]]) -> tuple[Route, ...]:
    out = []
    for r in g.routes:
        to = str(subnet_of(topology.switches, r.to)) if r.to in topology.switches else r.to
        via = address_of(nics, r.via, g.name) if r.via in topology.guests else r.via
        out.append(Route(to=to, via=via))
    return tuple(out)


def _addresses(topology: Topology) -> dict[tuple[str, str], str]:
    """Each NIC's address with prefix, by (guest, switch): its own, or the next free one of its switch's
    subnet."""
    out: dict[tuple[str, str], str] = {}
    for sname in topology.switches:
        subnet = subnet_of(topology.switches, sname)
        members = [(g.name, nic) for g in topology.guests.values() for nic in g.nics if nic.switch == sname]
        taken = {ipaddress.IPv4Interface(nic.ip).ip for _, nic in members if nic.ip}
        free = (h for h in subnet.hosts() if h not in taken)
        for guest, nic in members:
            if nic.ip:
                out[(guest, sname)] = nic.ip
                continue
            host = next(free, None)
            if host is None:
                raise TopologyError(
                    topology.source,
                    f"switches.{sname}.subnet",
                    f"{subnet} has no address left for guest {guest}",
                )
            out[(guest, sname)] = f"{host}/{subnet.prefixlen}"
    return out


def _switch_plan(
    topology: Topology, name: str, run_dir: Path, nics: Mapping[str, tuple[NicPlan, ...]], python: str
) -> SwitchPlan:
    sw = topology.switches[name]
    members = {g: nic.socket for g, ns in nics.items() for nic in ns if nic.switch == name}
    stats = run_dir / f"switch-{name}.stats.json"
    on_off = {True: "on", False: "off", None: None}  # --port switch's words for a topology boolean
    keys: tuple[tuple[str, object], ...] = (
        ("ageing", sw.ageing),
        ("max_entries", sw.max_entries),
        ("offload", on_off[sw.offload]),
        ("pace", on_off[sw.pace]),
    )
    port = "switch" + "".join(f",{k}={v}" for k, v in keys if v is not None)
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
        link = topology.links.get((guest, name))
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
