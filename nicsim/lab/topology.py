"""A topology file (TOML, read with :mod:`tomllib`) or the same thing as a dict, checked and turned into
a :class:`Topology`.

Every mistake is a :class:`TopologyError` that names the file, the key (``guests.h1.memory``) and what
is allowed there, found before anything boots: unknown keys (with the nearest known one suggested),
wrong types, values out of range, names that point nowhere (a guest's switch, a check's guest), an
impairment netem would not take, an address outside its switch's subnet or taken twice, a guest with
two NICs on one switch, a route whose gateway is not on the guest's own networks, files that do not
exist.
Input files (kernel, initrd, disk) are relative to the file's directory; a capture is an output,
relative to the lab's run directory. The keys themselves are defined once, in
:mod:`nicsim.lab.fields`. Pure apart from reading the file and checking that named files exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nicsim.errors import LocalError
from nicsim.ports.impair_config import ImpairConfig
from qemu.testvm import Workload
from qemu.testvm.errors import InvalidOptionError

from .fields import CHECK_KEYS, TABLES, Key

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
DEFAULT_TIMEOUT = 300.0
DEFAULT_WAIT = 120.0
GUEST_DEFAULTS: Mapping[str, Any] = {"memory": 256, "cpus": 1}

Param = str | int | float | bool


class TopologyError(LocalError):
    """A topology that cannot run; ``str()`` is ``SOURCE: KEY: what is wrong and what is allowed``."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")
        self.source, self.key = source, key


@dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    run: str
    id: str | None = None
    params: Mapping[str, Param] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class NicSpec:
    switch: str
    ip: str | None = None
    mac: str | None = None
    where: str = field(default="", compare=False)  # its key in the file: guests.h1 or guests.r1.nics[1]


@dataclass(frozen=True, kw_only=True)
class RouteSpec:
    to: str  # a network, a switch's name or "default"
    via: str  # an address or a guest's name


@dataclass(frozen=True, kw_only=True)
class GuestSpec:
    name: str
    nics: tuple[NicSpec, ...]
    forward: bool = False
    routes: tuple[RouteSpec, ...] = ()
    kernel: Path | None = None
    initrd: Path | None = None
    disk: Path | None = None
    append: str = ""
    memory: int = 256
    cpus: int = 1
    workloads: tuple[WorkloadSpec, ...] = ()

    @property
    def switches(self) -> tuple[str, ...]:
        return tuple(n.switch for n in self.nics)


@dataclass(frozen=True, kw_only=True)
class SwitchSpec:
    name: str
    subnet: ipaddress.IPv4Network | None = None
    ageing: float | None = None
    max_entries: int | None = None
    offload: bool | None = None  # None: nicsim serve's default (on), as for pace
    pace: bool | None = None
    capture: Path | None = None
    capture_format: str = "pcapng"
    snaplen: int | None = None
    uplinks: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    guest: str
    switch: str
    tx: str | None = None
    rx: str | None = None
    capture: Path | None = None


@dataclass(frozen=True, kw_only=True)
class CheckSpec:
    kind: str
    name: str
    values: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


@dataclass(frozen=True, kw_only=True)
class Topology:
    name: str
    source: str
    timeout: float = DEFAULT_TIMEOUT
    wait: float = DEFAULT_WAIT
    switches: Mapping[str, SwitchSpec] = field(default_factory=dict)
    guests: Mapping[str, GuestSpec] = field(default_factory=dict)
    links: Mapping[tuple[str, str], LinkSpec] = field(default_factory=dict)  # by (guest, switch)
    checks: tuple[CheckSpec, ...] = ()


def subnet_of(switches: Mapping[str, SwitchSpec], name: str) -> ipaddress.IPv4Network:
    """Switch ``name``'s subnet: its own, or 10.N.0.0/24 for the N-th switch of the file."""
    sw = switches[name]
    return sw.subnet or ipaddress.IPv4Network(f"10.{list(switches).index(name) + 1}.0.0/24")


def nic_network(switches: Mapping[str, SwitchSpec], nic: NicSpec) -> ipaddress.IPv4Network:
    """The network a NIC is on: its own address's, or its switch's subnet."""
    return ipaddress.IPv4Interface(nic.ip).network if nic.ip else subnet_of(switches, nic.switch)


def load(path: str | Path) -> Topology:
    """Read and check the topology file ``path``."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise TopologyError(str(p), "", "no such file") from None
    except OSError as err:
        raise TopologyError(str(p), "", f"cannot read it: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise TopologyError(str(p), "", f"not valid TOML: {err}") from None
    return from_dict(data, source=str(p), base_dir=p.parent, default_name=p.stem)


def renamed(topology: Topology, name: str) -> Topology:
    """``topology`` under another lab name (``nicsim lab run --name``)."""
    if not NAME_RE.match(name):
        raise TopologyError("--name", "", f"{name!r}: lower-case letters, digits and '-', at most 24")
    return dataclasses.replace(topology, name=name)


def from_dict(
    data: Mapping[str, Any], *, source: str = "<dict>", base_dir: str | Path = ".", default_name: str = "lab"
) -> Topology:
    """Check a topology given as a dict (the parsed TOML, or one a test builds)."""
    return _Reader(source, Path(base_dir)).topology(data, default_name)


class _Reader:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, key: str, message: str) -> TopologyError:
        return TopologyError(self.source, key, message)

    # -- generic checks against the key tables -----------------------------------------------------

    def table(self, value: Any, table: str, where: str) -> dict[str, Any]:
        """``value`` checked against the keys of ``table``: every value type-checked, nothing unknown."""
        if not isinstance(value, Mapping):
            raise self.fail(where, f"must be a table, not {_kind(value)}")
        keys = TABLES[table]
        out: dict[str, Any] = {}
        for k, v in value.items():
            path = f"{where}.{k}" if where else k
            spec = keys.get(k) or keys.get("*")
            if spec is None:
                known = sorted(keys)
                near = difflib.get_close_matches(k, known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise self.fail(path, f"unknown key{hint}; allowed here: {', '.join(known)}")
            out[k] = self.value(v, spec, path)
        for k, spec in keys.items():
            if spec.required and k not in value:
                raise self.fail(f"{where}.{k}" if where else k, f"missing: {spec.doc}")
        return out

    def value(self, v: Any, spec: Key, path: str) -> Any:
        kind = spec.kind
        if kind == "string":
            if not isinstance(v, str):
                raise self.fail(path, f"must be a string, not {_kind(v)}")
            if spec.choices and v not in spec.choices:
                raise self.fail(path, f"{v!r} is not one of: {', '.join(spec.choices)}")
            return v
        if kind in ("integer", "number"):
            ok = isinstance(v, int) if kind == "integer" else isinstance(v, int | float)
            if not ok or isinstance(v, bool):
                raise self.fail(
                    path, f"must be {'an integer' if kind == 'integer' else 'a number'}, not {_kind(v)}"
                )
            if spec.minimum is not None and v < spec.minimum:
                raise self.fail(path, f"{v} is too small: at least {spec.minimum:g}")
            return v
        if kind == "boolean":
            if not isinstance(v, bool):
                raise self.fail(path, f"must be true or false, not {_kind(v)}")
            return v
        if kind == "table":
            return self.table(v, spec.table, path)
        if kind == "named":
            if not isinstance(v, Mapping):
                raise self.fail(path, f"must be a table of named tables ([{path}.NAME]), not {_kind(v)}")
            for name in v:
                if not NAME_RE.match(name):
                    raise self.fail(
                        f"{path}.{name}",
                        "a name is lower-case letters, digits and '-', "
                        "at most 24, starting with a letter or digit",
                    )
            return {name: self.table(t, spec.table, f"{path}.{name}") for name, t in v.items()}
        if kind == "array":
            if not isinstance(v, list):
                raise self.fail(path, f"must be a list of tables ([[{path}]]), not {_kind(v)}")
            return [self.table(t, spec.table, f"{path}[{i}]") for i, t in enumerate(v)]
        if kind == "strings":
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise self.fail(path, "must be a list of strings")
            return list(v)
        if kind == "params":
            if not isinstance(v, str | int | float | bool):
                raise self.fail(path, f"a workload parameter is a string, number or boolean, not {_kind(v)}")
            return v
        raise AssertionError(kind)

    def path(self, text: str, key: str) -> Path:
        p = Path(text).expanduser()
        p = p if p.is_absolute() else self.base_dir / p
        if not p.is_file():
            raise self.fail(key, f"{p}: no such file")
        return p

    # -- the topology --------------------------------------------------------------------------------

    def topology(self, data: Mapping[str, Any], default_name: str) -> Topology:
        top = self.table(data, "lab", "")
        name = top.get("name", default_name)
        if not NAME_RE.match(name):
            key = "name" if "name" in top else ""
            raise self.fail(
                key,
                f"the lab's name {name!r} must be lower-case letters, digits and '-', at "
                "most 24" + ("" if key else ' (set name = "..." in the file)'),
            )
        switches = {n: self.switch(n, t, i) for i, (n, t) in enumerate(top["switches"].items(), 1)}
        if not switches:
            raise self.fail("switches", "at least one switch ([switches.NAME])")
        defaults = top.get("defaults", {})
        guests = {n: self.guest(n, {**defaults, **t}, switches) for n, t in top["guests"].items()}
        if not guests:
            raise self.fail("guests", "at least one guest ([guests.NAME])")
        self.addresses(guests, switches)
        self.routes(guests, switches)
        links: dict[tuple[str, str], LinkSpec] = {}
        for i, t in enumerate(top.get("links", [])):
            link = self.link(t, f"links[{i}]", guests)
            if (link.guest, link.switch) in links:
                raise self.fail(
                    f"links[{i}].guest",
                    f"{link.guest!r} has a link table to switch {link.switch} already: one per link",
                )
            links[(link.guest, link.switch)] = link
        checks = tuple(
            self.check(t, f"checks[{i}]", guests, switches, links)
            for i, t in enumerate(top.get("checks", []))
        )
        self.servers(checks)
        return Topology(
            name=name,
            source=self.source,
            timeout=float(top.get("timeout", DEFAULT_TIMEOUT)),
            wait=float(top.get("wait", DEFAULT_WAIT)),
            switches=switches,
            guests=guests,
            links=links,
            checks=checks,
        )

    def switch(self, name: str, t: dict[str, Any], number: int) -> SwitchSpec:
        where = f"switches.{name}"
        subnet = None
        if "subnet" in t:
            try:
                subnet = ipaddress.IPv4Network(t["subnet"])
            except ValueError as err:
                raise self.fail(f"{where}.subnet", f"{err} (an IPv4 network such as 10.0.0.0/24)") from None
        capture = t.get("capture")
        return SwitchSpec(
            name=name,
            subnet=subnet,
            ageing=t.get("ageing"),
            max_entries=t.get("max_entries"),
            offload=t.get("offload"),
            pace=t.get("pace"),
            capture=Path(capture).expanduser() if capture else None,
            capture_format=t.get("capture_format", "pcapng"),
            snaplen=t.get("snaplen"),
            uplinks=tuple(t.get("uplinks", ())),
        )

    def guest(self, name: str, t: dict[str, Any], switches: Mapping[str, SwitchSpec]) -> GuestSpec:
        where = f"guests.{name}"
        if "nics" in t:
            for k in ("switch", "ip", "mac"):
                if k in t:
                    raise self.fail(
                        f"{where}.{k}", "give switch, ip and mac (one NIC) or nics (several), not both"
                    )
            if not t["nics"]:
                raise self.fail(f"{where}.nics", 'at least one NIC: nics = [{ switch = "NAME" }, ...]')
            nics = tuple(self.nic(n, f"{where}.nics[{i}]", switches) for i, n in enumerate(t["nics"]))
        elif "switch" in t:
            nics = (self.nic(t, where, switches),)
        else:
            raise self.fail(
                f"{where}.switch", 'missing: the switch its NIC is on (or nics = [{ switch = "NAME" }, ...])'
            )
        seen: set[str] = set()
        for nic in nics:
            if nic.switch in seen:
                raise self.fail(
                    f"{nic.where}.switch",
                    f"guest {name} has a NIC on switch {nic.switch} already: one NIC per switch",
                )
            seen.add(nic.switch)
        files = {k: self.path(t[k], f"{where}.{k}") for k in ("kernel", "initrd", "disk") if k in t}
        workloads = tuple(
            self.workload(w, f"{where}.workloads[{i}]") for i, w in enumerate(t.get("workloads", []))
        )
        ids = [w.id for w in workloads if w.id is not None]
        if len(ids) != len(set(ids)):
            raise self.fail(f"{where}.workloads", f"two workloads with the same id: {sorted(ids)}")
        return GuestSpec(
            name=name,
            nics=nics,
            forward=t.get("forward", False),
            routes=tuple(RouteSpec(to=r["to"], via=r["via"]) for r in t.get("routes", [])),
            append=t.get("append", ""),
            memory=t.get("memory", GUEST_DEFAULTS["memory"]),
            cpus=t.get("cpus", GUEST_DEFAULTS["cpus"]),
            workloads=workloads,
            **files,
        )

    def nic(self, t: Mapping[str, Any], where: str, switches: Mapping[str, SwitchSpec]) -> NicSpec:
        if t["switch"] not in switches:
            raise self.fail(
                f"{where}.switch", f"no switch {t['switch']!r}; the switches: {', '.join(switches)}"
            )
        mac = t.get("mac")
        if mac is not None:
            mac = mac.lower()
            if not MAC_RE.match(mac) or int(mac[:2], 16) & 1:
                raise self.fail(
                    f"{where}.mac", f"{t['mac']!r} is not a unicast MAC such as 02:00:00:00:00:01"
                )
        return NicSpec(switch=t["switch"], ip=t.get("ip"), mac=mac, where=where)

    def workload(self, t: dict[str, Any], where: str) -> WorkloadSpec:
        params = {k: v for k, v in t.items() if k not in ("run", "id")}
        try:
            Workload(t["run"], **params)  # the guest's own syntax rules
        except InvalidOptionError as err:
            raise self.fail(where, str(err)) from None
        return WorkloadSpec(run=t["run"], id=t.get("id"), params=params)

    def addresses(self, guests: Mapping[str, GuestSpec], switches: Mapping[str, SwitchSpec]) -> None:
        taken: dict[tuple[str, ipaddress.IPv4Address], str] = {}  # (switch, address) -> guest
        macs: dict[str, str] = {}
        for g in guests.values():
            for nic in g.nics:
                if nic.mac is not None:
                    if nic.mac in macs:
                        raise self.fail(f"{nic.where}.mac", f"{nic.mac} is {macs[nic.mac]}'s MAC already")
                    macs[nic.mac] = f"{g.name}"
                if nic.ip is None:
                    continue
                iface = self.address(nic)
                subnet = switches[nic.switch].subnet
                if subnet is not None and iface.ip not in subnet:
                    raise self.fail(
                        f"{nic.where}.ip", f"{nic.ip} is outside switch {nic.switch}'s subnet {subnet}"
                    )
                other = taken.setdefault((nic.switch, iface.ip), g.name)
                if other != g.name:
                    raise self.fail(
                        f"{nic.where}.ip", f"{iface.ip} is {other}'s address on switch {nic.switch} already"
                    )
            nets = [(nic, nic_network(switches, nic)) for nic in g.nics]
            for i, (nic, net) in enumerate(nets):
                for first, first_net in nets[:i]:
                    if net.overlaps(first_net):
                        raise self.fail(
                            f"{nic.where}.ip" if nic.ip else f"{nic.where}.switch",
                            f"its network {net} overlaps {first_net} of the NIC on {first.switch}: "
                            "each NIC of a guest on a network of its own",
                        )

    def address(self, nic: NicSpec) -> ipaddress.IPv4Interface:
        assert nic.ip is not None
        try:
            iface = ipaddress.IPv4Interface(nic.ip)
        except ValueError as err:
            raise self.fail(f"{nic.where}.ip", f"{err} (an address with prefix, 10.0.0.1/24)") from None
        if "/" not in nic.ip:
            raise self.fail(f"{nic.where}.ip", f"{nic.ip!r} needs its prefix length, e.g. {nic.ip}/24")
        return iface

    def routes(self, guests: Mapping[str, GuestSpec], switches: Mapping[str, SwitchSpec]) -> None:
        for g in guests.values():
            nets = [nic_network(switches, nic) for nic in g.nics]
            for i, r in enumerate(g.routes):
                where = f"guests.{g.name}.routes[{i}]"
                if r.to in g.switches:
                    raise self.fail(f"{where}.to", f"{g.name} is on switch {r.to} itself: it needs no route")
                if r.to != "default" and r.to not in switches:
                    try:
                        ipaddress.IPv4Network(r.to)
                    except ValueError as err:
                        raise self.fail(
                            f"{where}.to",
                            f"{err} (a network such as 10.2.0.0/24, a switch's name or default)",
                        ) from None
                if r.via in guests:
                    if r.via == g.name or not set(guests[r.via].switches) & set(g.switches):
                        raise self.fail(
                            f"{where}.via",
                            f"{r.via} shares no switch with {g.name}: a gateway is a guest on a switch "
                            f"{g.name} is on ({', '.join(g.switches)})",
                        )
                    continue
                try:
                    via = ipaddress.IPv4Address(r.via)
                except ValueError:
                    raise self.fail(
                        f"{where}.via", f"{r.via!r} is neither a guest nor an IPv4 address"
                    ) from None
                if not any(via in net for net in nets):
                    raise self.fail(
                        f"{where}.via",
                        f"{via} is on none of {g.name}'s networks ({', '.join(map(str, nets))})",
                    )

    def link(self, t: dict[str, Any], where: str, guests: Mapping[str, GuestSpec]) -> LinkSpec:
        if t["guest"] not in guests:
            raise self.fail(f"{where}.guest", f"no guest {t['guest']!r}; the guests: {', '.join(guests)}")
        g = guests[t["guest"]]
        if "switch" in t and t["switch"] not in g.switches:
            raise self.fail(
                f"{where}.switch",
                f"{g.name} has no NIC on switch {t['switch']!r}; its switches: " + ", ".join(g.switches),
            )
        if "switch" not in t and len(g.nics) > 1:
            raise self.fail(
                f"{where}.switch", f"{g.name} has NICs on {', '.join(g.switches)}: say which link (switch =)"
            )
        for d in ("tx", "rx"):
            if d in t:
                try:
                    ImpairConfig.parse(t[d])
                except ValueError as err:
                    raise self.fail(f"{where}.{d}", str(err)) from None
        capture = Path(t["capture"]).expanduser() if t.get("capture") else None
        return LinkSpec(
            guest=g.name,
            switch=t.get("switch", g.switches[0]),
            tx=t.get("tx"),
            rx=t.get("rx"),
            capture=capture,
        )

    def check(
        self,
        t: dict[str, Any],
        where: str,
        guests: Mapping[str, GuestSpec],
        switches: Mapping[str, SwitchSpec],
        links: Mapping[tuple[str, str], LinkSpec],
    ) -> CheckSpec:
        kind = t["kind"]
        needed, optional = CHECK_KEYS[kind]
        for k in needed:
            if k not in t:
                raise self.fail(f"{where}.{k}", f"a {kind} check needs {', '.join(needed)}")
        for k in t:
            if k not in (*needed, *optional, "kind", "name"):
                raise self.fail(
                    f"{where}.{k}",
                    f"not a key of a {kind} check; it takes {', '.join((*needed, *optional, 'name'))}",
                )
        for k in ("from", "to", "guest"):
            if k in t and t[k] not in guests:
                raise self.fail(f"{where}.{k}", f"no guest {t[k]!r}; the guests: {', '.join(guests)}")
        if kind in ("ping", "iperf3") and t["from"] == t["to"]:
            raise self.fail(f"{where}.to", "a guest checks its reach to another guest, not to itself")
        if kind == "result":
            ids = [w.id for w in guests[t["guest"]].workloads if w.id]
            if t["workload"] not in ids:
                raise self.fail(
                    f"{where}.workload",
                    f"guest {t['guest']} has no workload with id "
                    f"{t['workload']!r}; its ids: {', '.join(ids) or 'none'}",
                )
        if kind == "capture" and ("switch" in t) == ("link" in t):
            raise self.fail(
                where, 'a capture check reads one capture: give switch = "NAME" or link = "GUEST"'
            )
        if kind == "capture" and "link" in t:
            captured = [ln.switch for ln in links.values() if ln.guest == t["link"] and ln.capture]
            if not captured:
                raise self.fail(f"{where}.link", f'no link of {t["link"]!r} has capture = "FILE"')
            if len(captured) > 1:
                raise self.fail(
                    f"{where}.link",
                    f"{t['link']}'s links to {', '.join(captured)} each have a capture: a capture check "
                    "reads one (keep one link capture, or check a switch's capture)",
                )
        if kind == "capture" and "switch" in t:
            sw = switches.get(t["switch"])
            if sw is None:
                raise self.fail(
                    f"{where}.switch", f"no switch {t['switch']!r}; the switches: {', '.join(switches)}"
                )
            if sw.capture is None or sw.capture_format != "pcapng":
                raise self.fail(
                    f"{where}.switch",
                    f'switch {sw.name} must have a pcapng capture = "FILE" for a capture check',
                )
        if kind in ("result", "capture") and "min" not in t and "max" not in t:
            raise self.fail(where, f"a {kind} check needs min, max or both")
        name = t.get("name") or _check_name(kind, t)
        return CheckSpec(
            kind=kind, name=name, values={k: v for k, v in t.items() if k not in ("kind", "name")}
        )

    def servers(self, checks: tuple[CheckSpec, ...]) -> None:
        # An iperf3 server in the guest serves one client, then the next workload runs.
        seen: set[str] = set()
        for i, c in enumerate(checks):
            if c.kind == "iperf3":
                if c.get("to") in seen:
                    raise self.fail(
                        f"checks[{i}].to",
                        f"one iperf3 check per receiving guest ({c.get('to')} has one already)",
                    )
                seen.add(c.get("to"))


def _check_name(kind: str, t: Mapping[str, Any]) -> str:
    if kind in ("ping", "iperf3"):
        return f"{kind} {t['from']} -> {t['to']}"
    if kind == "result":
        return f"{t['guest']} {t['workload']}.{t['field']}"
    where = f"switch {t['switch']}" if "switch" in t else f"link {t['link']}"
    return f"capture {where}" + (f" '{t['filter']}'" if t.get("filter") else "")


def _kind(v: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(v), type(v).__name__)
