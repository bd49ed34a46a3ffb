"""Every key a topology file may hold: its type, its limits and what it means, in one table.

The parser (:mod:`nicsim.lab.topology`) checks a file against these tables, and the JSON Schema that
editors use (:mod:`nicsim.lab.schema`) is generated from them, so the two cannot disagree. A table of
keys is a ``dict[str, Key]``; a key whose value is itself a table (or a list of tables) names the
table of its own keys in ``table``. Pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, kw_only=True)
class Key:
    """One key of a table: ``kind`` is one of ``string``, ``integer``, ``number``, ``boolean``, ``table``
    (keys from ``table``), ``named`` (a table of named sub-tables: ``[guests.h1]``), ``array`` (of
    tables from ``table``), ``strings`` (a list of strings) or ``params`` (a workload's own parameters:
    any key, a string, number or boolean value)."""

    kind: str
    doc: str
    required: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    table: str = ""


CHECK_KINDS: Final = ("ping", "iperf3", "result", "capture")
CAPTURE_FORMATS: Final = ("pcapng", "pcap")

_GUEST_COMMON: Final = {
    "kernel": Key(kind="string", doc="the guest's kernel (default: the built-in image's)"),
    "initrd": Key(
        kind="string",
        doc="the guest's initrd (default: the built-in image's, whose /init "
        "runs the workloads); with your own kernel and no initrd, give a disk",
    ),
    "disk": Key(kind="string", doc="a disk image for the guest (virtio-blk); your file is never written"),
    "append": Key(kind="string", doc="more kernel command line, after nicsim's own"),
    "memory": Key(kind="integer", doc="guest memory in MiB (default 256)", minimum=64),
    "cpus": Key(kind="integer", doc="vCPUs (default 1)", minimum=1),
}

TABLES: Final[dict[str, dict[str, Key]]] = {
    "lab": {
        "name": Key(
            kind="string",
            doc="the lab's name; scopes its sockets, MACs and namespaces so that "
            "several labs run at once (default: the file's name without .toml)",
        ),
        "timeout": Key(
            kind="number", doc="seconds the whole run may take, boots included (default 300)", minimum=1
        ),
        "wait": Key(
            kind="number",
            doc="seconds a guest waits for each guest it sends to to answer before it goes on regardless "
            "(and that wait fails) (default 120)",
            minimum=1,
        ),
        "defaults": Key(kind="table", table="defaults", doc="guest settings every guest starts from"),
        "switches": Key(
            kind="named", table="switch", doc="learning L2 switches, one nicsim process each", required=True
        ),
        "guests": Key(
            kind="named",
            table="guest",
            doc="the guests, each with one NIC on a switch (switch =) or several (nics =)",
            required=True,
        ),
        "links": Key(kind="array", table="link", doc="impairments on a guest's link to a switch"),
        "checks": Key(kind="array", table="check", doc="what must hold for the run to pass"),
    },
    "defaults": dict(_GUEST_COMMON),
    "switch": {
        "subnet": Key(
            kind="string",
            doc="IPv4 network of its guests, e.g. 10.0.0.0/24: a guest without "
            "ip gets the next free address (default: 10.N.0.0/24, N counting switches from 1)",
        ),
        "ageing": Key(kind="number", doc="seconds a learned MAC address lives (default 300)", minimum=0),
        "max_entries": Key(kind="integer", doc="forwarding-table size (default 4096)", minimum=1),
        "offload": Key(
            kind="boolean",
            doc="pass checksum and TSO offloads between guests that negotiated them, segmenting and "
            "checksumming for one that did not (default true; false: every guest sees plain frames)",
        ),
        "pace": Key(
            kind="boolean",
            doc="a guest flooding one that cannot keep up waits in its own ring for the receiver's "
            "buffers, for at most 2 ms at a time, instead of having its frames taken and dropped "
            "(default true)",
        ),
        "capture": Key(
            kind="string",
            doc="capture file of every link on this switch (in the lab's directory): pcapng has one "
            "interface per link, named after its guest; pcap one file per link, FILE-GUEST.pcap",
        ),
        "capture_format": Key(kind="string", choices=CAPTURE_FORMATS, doc="capture format (default pcapng)"),
        "snaplen": Key(kind="integer", doc="bytes kept of each captured frame", minimum=1),
        "uplinks": Key(
            kind="strings",
            doc="ports that are not guests, as nicsim serve --uplink takes them: "
            "tap,netns=NS[,ifname=tap0] or vxlan,remote=IP,vni=N (how labs span hosts)",
        ),
    },
    "guest": {
        "switch": Key(kind="string", doc="the switch its one NIC is on (or nics, for several)"),
        "ip": Key(kind="string", doc="its address with prefix, e.g. 10.0.0.1/24 (default: from the subnet)"),
        "mac": Key(kind="string", doc="its MAC (default: derived from the lab's and the guest's names)"),
        "nics": Key(
            kind="array",
            table="nic",
            doc="several NICs (eth0, eth1, ... in order), each on a switch of its own, instead of "
            "switch, ip and mac",
        ),
        "forward": Key(kind="boolean", doc="route IPv4 between its NICs, a router (default false)"),
        "routes": Key(kind="array", table="route", doc="static routes, added after its NICs are up"),
        **_GUEST_COMMON,
        "workloads": Key(kind="array", table="workload", doc="what the guest runs, in order, after boot"),
    },
    "nic": {
        "switch": Key(kind="string", doc="the switch this NIC is on (one NIC per switch)", required=True),
        "ip": Key(kind="string", doc="its address with prefix (default: the next free one of the subnet)"),
        "mac": Key(
            kind="string", doc="its MAC (default: derived from the lab's, guest's and switch's names)"
        ),
    },
    "route": {
        "to": Key(
            kind="string",
            doc="the destination: a network such as 10.2.0.0/24, a switch's name (its subnet) or default",
            required=True,
        ),
        "via": Key(
            kind="string",
            doc="the gateway: an address on one of the guest's networks, or a guest on a switch it "
            "shares (its address there)",
            required=True,
        ),
    },
    "workload": {
        "run": Key(
            kind="string",
            doc="the workload: ping, iperf3-client, iperf3-server, pktgen-tx, "
            "rx-count, sleep, sockperf-ping-pong, wait-for, ...",
            required=True,
        ),
        "id": Key(kind="string", doc="a name for result checks to refer to (not passed to the guest)"),
        "*": Key(
            kind="params",
            doc="the workload's parameters; a target, server or dst that names a "
            "guest becomes its address, a dst_mac that names one its MAC",
        ),
    },
    "link": {
        "guest": Key(kind="string", doc="the guest whose link this is", required=True),
        "switch": Key(
            kind="string", doc="the switch at the other end (needed when the guest has several NICs)"
        ),
        "tx": Key(
            kind="string",
            doc="impairment of what the guest sends, netem-style: loss=10% "
            "delay=20ms jitter=2ms reorder=5% duplicate=1% corrupt=0.1% rate=10mbit limit=100 seed=1",
        ),
        "rx": Key(kind="string", doc="impairment of what the guest receives (same syntax)"),
        "capture": Key(
            kind="string",
            doc="a capture of this link alone (in the lab's directory), in its switch's capture_format",
        ),
    },
    "check": {
        "kind": Key(
            kind="string",
            choices=CHECK_KINDS,
            required=True,
            doc="ping: FROM pings TO; iperf3: TCP from FROM to TO; result: a field of a workload's "
            "result; capture: frames in a switch's capture that match a tcpdump filter",
        ),
        "name": Key(kind="string", doc="what the table calls it (default: made from the check)"),
        "from": Key(kind="string", doc="ping, iperf3: the guest that sends"),
        "to": Key(kind="string", doc="ping, iperf3: the guest it reaches"),
        "count": Key(kind="integer", doc="ping: echo requests (default 5)", minimum=1),
        "interval": Key(kind="number", doc="ping: seconds between requests (default 0.2)", minimum=0.01),
        "max_loss_pct": Key(
            kind="number", doc="ping: the most loss that passes, in % (default 0)", minimum=0
        ),
        "max_rtt_ms": Key(kind="number", doc="ping: the largest average RTT that passes", minimum=0),
        "seconds": Key(kind="number", doc="iperf3: how long (default 3)", minimum=1),
        "min_mbps": Key(
            kind="number", doc="iperf3: the lowest rate that passes, Mbit/s (default: any)", minimum=0
        ),
        "guest": Key(kind="string", doc="result: the guest whose workload it is"),
        "workload": Key(kind="string", doc="result: the workload's id"),
        "field": Key(kind="string", doc="result: the result field, e.g. received or loss_pct"),
        "min": Key(kind="number", doc="result, capture: the lowest value that passes"),
        "max": Key(kind="number", doc="result, capture: the highest value that passes"),
        "switch": Key(kind="string", doc="capture: the switch whose capture is read (or link)"),
        "link": Key(kind="string", doc="capture: the guest whose link capture is read (or switch)"),
        "filter": Key(kind="string", doc="capture: a tcpdump filter, e.g. 'icmp' (default: every frame)"),
    },
}

# Which keys each check kind needs, and which it may have besides ``kind`` and ``name``.
CHECK_KEYS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "ping": (("from", "to"), ("count", "interval", "max_loss_pct", "max_rtt_ms")),
    "iperf3": (("from", "to"), ("seconds", "min_mbps")),
    "result": (("guest", "workload", "field"), ("min", "max")),
    "capture": ((), ("switch", "link", "filter", "min", "max")),  # switch or link
}
