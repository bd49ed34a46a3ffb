"""Topology files: what the parser accepts, what it refuses and how it says so, what a lab plans to run,
the verdict on results, and the published JSON Schema agreeing with the parser."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from nicsim.cli.serve import parse_switch
from nicsim.lab import TopologyError, from_dict, load
from nicsim.lab.checks import evaluate
from nicsim.lab.plan import lab_mac, plan
from nicsim.lab.schema import schema
from qemu.testvm.workload import WorkloadResult

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "labs").glob("*.toml"))

BASE: dict[str, Any] = {
    "name": "t",
    "switches": {"lan": {}},
    "guests": {"h1": {"switch": "lan"}, "h2": {"switch": "lan"}},
    "links": [{"guest": "h2", "rx": "loss=10% seed=1"}],
    "checks": [{"kind": "ping", "from": "h1", "to": "h2"}],
}


def with_(path: str, value: Any, base: dict[str, Any] = BASE) -> dict[str, Any]:
    """BASE (or ``base``) with one key set (``a.b.c``; a number indexes a list)."""
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def refused(doc: dict[str, Any]) -> TopologyError:
    with pytest.raises(TopologyError) as info:
        from_dict(doc, source="lab.toml")
    return info.value


# -- what the parser refuses, and how it says so --------------------------------------------------------


def test_an_unknown_key_names_the_file_the_key_and_the_nearest_known_one() -> None:
    err = refused(with_("guests.h1.memroy", 512))
    assert str(err).startswith("lab.toml: guests.h1.memroy: unknown key (did you mean 'memory'?)")
    assert "allowed here:" in str(err) and "cpus" in str(err)


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        ("guests.h1.memory", "512", "guests.h1.memory: must be an integer, not a string"),
        ("guests.h1.memory", 16, "guests.h1.memory: 16 is too small: at least 64"),
        ("guests.h1.switch", "wan", "guests.h1.switch: no switch 'wan'; the switches: lan"),
        ("guests.h1.ip", "10.9.0.1/24", None),  # no subnet on lan: any address is fine
        ("guests.h1.mac", "01:00:00:00:00:01", "guests.h1.mac: '01:00:00:00:00:01' is not a unicast MAC"),
        ("guests.h1.workloads", [{"run": "ping", "target": "a b"}], "guests.h1.workloads[0]: workload ping"),
        ("guests.h1.workloads", [{"target": "h2"}], "guests.h1.workloads[0].run: missing"),
        ("links.0.rx", "loss=lots", "links[0].rx:"),
        ("links.0.guest", "h9", "links[0].guest: no guest 'h9'"),
        ("checks.0.kind", "traceroute", "checks[0].kind: 'traceroute' is not one of: ping, iperf3"),
        ("checks.0.to", "h1", "checks[0].to: a guest checks its reach to another guest"),
        ("checks.0.min_mbps", 5, "checks[0].min_mbps: not a key of a ping check"),
        ("name", "My Lab", "lab.toml: name: the lab's name 'My Lab' must be lower-case"),
        ("guests", {}, "lab.toml: guests: at least one guest"),
    ],
)
def test_mistakes_are_refused_with_the_key_and_what_is_allowed(
    path: str, value: Any, words: str | None
) -> None:
    doc = with_(path, value)
    if words is None:
        from_dict(doc)
        return
    assert words in str(refused(doc))


def test_an_address_outside_the_switch_subnet_is_refused() -> None:
    doc = with_("switches.lan", {"subnet": "10.5.0.0/24"})
    doc["guests"]["h1"]["ip"] = "10.6.0.1/24"
    assert "guests.h1.ip: 10.6.0.1/24 is outside switch lan's subnet 10.5.0.0/24" in str(refused(doc))


def test_checks_name_what_exists() -> None:
    doc = with_("checks", [{"kind": "result", "guest": "h1", "workload": "x", "field": "f", "min": 1}])
    assert "guest h1 has no workload with id 'x'" in str(refused(doc))
    doc = with_("checks", [{"kind": "capture", "switch": "lan", "min": 1}])
    assert "switch lan must have a pcapng capture" in str(refused(doc))
    doc = with_("checks", [{"kind": "capture", "link": "h2", "min": 1}])
    assert "no link of 'h2' has capture" in str(refused(doc))
    doc = with_("checks", [{"kind": "capture", "min": 1}])
    assert 'give switch = "NAME" or link = "GUEST"' in str(refused(doc))
    doc["links"][0]["capture"] = "h2.pcap"
    doc["checks"][0]["link"] = "h2"
    from_dict(doc)
    doc = with_("checks", [{"kind": "iperf3", "from": "h1", "to": "h2"}] * 2)
    assert "one iperf3 check per receiving guest" in str(refused(doc))


def test_a_file_that_is_not_toml_or_not_there_says_so(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[guests.h1\n")
    with pytest.raises(TopologyError, match=r"bad.toml: not valid TOML"):
        load(bad)
    with pytest.raises(TopologyError, match=r"missing.toml: no such file"):
        load(tmp_path / "missing.toml")


def test_files_are_relative_to_the_topology_file_and_must_exist(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    path = tmp_path / "lab.toml"
    path.write_text('[switches.lan]\n[guests.h1]\nswitch = "lan"\nkernel = "vmlinuz"\ninitrd = "nope.img"\n')
    with pytest.raises(TopologyError, match=r"guests.h1.initrd: .*nope.img: no such file"):
        load(path)
    path.write_text('[switches.lan]\n[guests.h1]\nswitch = "lan"\nkernel = "vmlinuz"\n')
    top = load(path)
    assert top.guests["h1"].kernel == tmp_path / "vmlinuz"
    assert top.name == "lab"  # the file's name


# -- what a lab plans to run ------------------------------------------------------------------------------


def test_addresses_come_from_the_subnet_and_macs_from_the_lab_name(tmp_path: Path) -> None:
    doc = with_("switches.wan", {"subnet": "192.168.7.0/29"})
    doc["guests"]["h3"] = {"switch": "wan", "mac": "02:00:00:00:00:33"}
    doc["guests"]["h1"]["ip"] = "10.1.0.1/24"
    lab = plan(from_dict(doc), tmp_path)
    assert [g.ip for g in lab.guests.values()] == ["10.1.0.1/24", "10.1.0.2/24", "192.168.7.1/29"]
    assert lab.guests["h3"].mac == "02:00:00:00:00:33"
    assert lab.guests["h1"].mac == lab_mac("t", "h1") != lab_mac("other", "h1")
    assert int(lab.guests["h1"].mac[:2], 16) & 3 == 2  # locally administered, unicast
    other = plan(from_dict(with_("name", "other")), tmp_path / "o")
    assert other.guests["h1"].mac != lab.guests["h1"].mac  # two labs at once: no clash


def test_a_full_subnet_is_refused(tmp_path: Path) -> None:
    doc = with_("switches.lan", {"subnet": "10.0.0.0/30"})  # two hosts
    doc["guests"]["h3"] = {"switch": "lan"}
    with pytest.raises(TopologyError, match=r"10\.0\.0\.0/30 has no address left for guest h3"):
        plan(from_dict(doc), tmp_path)


def test_each_guest_waits_for_its_peers_then_runs_its_own_then_the_checks_then_stays_up(
    tmp_path: Path,
) -> None:
    doc = with_("guests.h1.workloads", [{"run": "ping", "target": "h2", "count": 3, "id": "mine"}])
    doc["checks"].append({"kind": "iperf3", "from": "h1", "to": "h2", "seconds": 2})
    lab = plan(from_dict(doc), tmp_path)
    h1, h2 = lab.guests["h1"], lab.guests["h2"]
    assert [w.render() for w in h1.workloads] == [
        "wait-for,target=10.1.0.2,timeout=120",
        "ping,target=10.1.0.2,count=3",  # the name became the address; the id stayed on the host
        "ping,target=10.1.0.2,count=5,interval=0.2,rtts=1",
        "sleep,seconds=1",
        "iperf3-client,server=10.1.0.2,time=2,proto=tcp",
        "sleep,seconds=86400",
    ]
    assert h1.expect == 5 and lab.check_results == {0: ("h1", 2), 1: ("h1", 4)}
    assert lab.workload_results == {("h1", "mine"): 1}
    assert [w.name for w in h2.workloads] == ["iperf3-server", "sleep"]  # the server first


def test_the_switch_command_line_carries_sockets_impairments_uplinks_and_capture(tmp_path: Path) -> None:
    lan = {"ageing": 30, "pace": False, "capture": "c.pcapng", "uplinks": ["tap,netns=x"]}
    doc = with_("switches.lan", lan)
    doc["links"][0]["capture"] = "h2.pcapng"
    lab = plan(from_dict(doc, base_dir=tmp_path), tmp_path / "run", python="py")
    argv = list(lab.switches["lan"].argv)
    assert argv[:5] == ["py", "-m", "nicsim", "serve", "--port"] and argv[5] == "switch,ageing=30,pace=off"
    sock = str(tmp_path / "run" / "h2.sock")
    assert argv[argv.index("--impair") + 1] == f"{sock}:rx:loss=10% seed=1"
    assert argv[argv.index("--uplink") + 1] == "tap,netns=x"
    assert argv[argv.index("--pcap-port") + 1] == f"{sock}={tmp_path / 'run' / 'h2.pcapng'}"  # one link alone
    assert argv[argv.index("--pcap") + 1] == str(tmp_path / "run" / "c.pcapng")  # an output: in the run dir
    sockets = [argv[i + 1] for i, a in enumerate(argv) if a == "--socket"]
    assert sockets == [str(tmp_path / "run" / "h1.sock"), sock]


@pytest.mark.parametrize(("given", "port"), [
    ({}, "switch"),  # nicsim serve's defaults: offloads on, pacing on
    ({"offload": False, "pace": True}, "switch,offload=off,pace=on"),
])
def test_a_switch_s_offload_and_pacing_reach_the_switch_nicsim_serve_builds(
    tmp_path: Path, given: dict[str, Any], port: str
) -> None:
    lab = plan(from_dict(with_("switches.lan", given), base_dir=tmp_path), tmp_path / "run", python="py")
    argv = list(lab.switches["lan"].argv)
    assert argv[argv.index("--port") + 1] == port
    switch = parse_switch(port)
    assert (switch.offload, switch.pace) == (given.get("offload", True), given.get("pace", True))
    switch.close()


# -- the verdict ------------------------------------------------------------------------------------------


def result(name: str, ok: bool = True, **data: Any) -> WorkloadResult:
    return WorkloadResult(workload=name, ok=ok, error=None if ok else "it broke", data=data)


def test_the_verdict_reads_each_check_and_fails_on_any_failed_or_missing_workload(tmp_path: Path) -> None:
    doc = with_("checks.0.max_loss_pct", 10)
    doc["guests"]["h2"]["workloads"] = [{"run": "sleep", "seconds": 1, "id": "nap"}]
    doc["checks"].append({"kind": "result", "guest": "h2", "workload": "nap", "field": "seconds", "max": 0.5})
    lab = plan(from_dict(doc), tmp_path)
    wait = result("wait-for")
    good = evaluate(lab, {"h1": [wait, result("ping", loss_pct=5, received=19, transmitted=20)],
                          "h2": [result("sleep", seconds=1)]})
    assert [(o.name, o.passed) for o in good] == [("ping h1 -> h2", True), ("h2 nap.seconds", False)]
    assert good[1].measured == "1" and good[1].expected == "<= 0.5"
    bad = evaluate(lab, {"h1": [result("wait-for", ok=False)], "h2": []})
    assert [(o.name, o.passed, o.measured) for o in bad] == [
        ("ping h1 -> h2", False, "no result"),
        ("h2 nap.seconds", False, "no result"),
        ("h1: wait for h2", False, "failed: it broke"),
        ("h1: ping h1 -> h2", False, "no result"),
        ("h2: nap", False, "no result"),
    ]


# -- the published schema -----------------------------------------------------------------------------


def test_the_published_schema_is_the_one_the_code_makes() -> None:
    published = json.loads((ROOT / "docs" / "lab.schema.json").read_text())
    assert published == schema(), "regenerate it: nicsim lab schema > docs/lab.schema.json"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_examples_pass_both_the_schema_and_the_parser(path: Path) -> None:
    import tomllib

    jsonschema.validate(tomllib.loads(path.read_text()), schema())
    load(path)


@pytest.mark.parametrize(
    ("path", "value"),
    [("guests.h1.memroy", 512), ("guests.h1.memory", "512"), ("checks.0.kind", "traceroute"),
     ("checks.0.min_mbps", 5), ("guests.h1.workloads", [{"target": "h2"}])],
)
def test_the_schema_refuses_what_the_parser_refuses_key_by_key(path: str, value: Any) -> None:
    doc = with_(path, value)
    refused(doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema())
    jsonschema.validate(BASE, schema())


# -- guests with several NICs: routers -------------------------------------------------------------------

ROUTER: dict[str, Any] = {
    "name": "rt",
    "switches": {"a": {"subnet": "10.1.0.0/24"}, "b": {"subnet": "10.2.0.0/24"}},
    "guests": {
        "r1": {"forward": True, "nics": [{"switch": "a", "ip": "10.1.0.1/24"}, {"switch": "b"}]},
        "h1": {"switch": "a", "routes": [{"to": "b", "via": "r1"}]},
        "h2": {"switch": "b", "routes": [{"to": "10.1.0.0/24", "via": "10.2.0.1"}]},
    },
    "links": [{"guest": "r1", "switch": "b", "rx": "delay=1ms"}, {"guest": "h1", "tx": "loss=1%"}],
    "checks": [{"kind": "ping", "from": "h1", "to": "h2"}, {"kind": "ping", "from": "h2", "to": "r1"}],
}


def router(path: str, value: Any) -> dict[str, Any]:
    return with_(path, value, ROUTER)


def test_a_router_has_a_nic_socket_mac_and_address_on_each_switch(tmp_path: Path) -> None:
    top = from_dict(ROUTER)
    assert top.guests["r1"].switches == ("a", "b") and top.guests["r1"].forward
    lab = plan(top, tmp_path)
    r1 = lab.guests["r1"]
    assert [(n.switch, n.ip, n.socket.name) for n in r1.nics] == [
        ("a", "10.1.0.1/24", "r1.a.sock"),
        ("b", "10.2.0.1/24", "r1.b.sock"),  # the next free one of b
    ]
    assert r1.nics[0].mac == lab_mac("rt", "r1") and r1.nics[1].mac == lab_mac("rt", "r1.b")
    assert lab.guests["h1"].ip == "10.1.0.2/24" and lab.guests["h1"].socket.name == "h1.sock"
    assert lab.switches["a"].sockets == {"r1": r1.nics[0].socket, "h1": lab.guests["h1"].socket}
    assert lab.switches["b"].sockets == {"r1": r1.nics[1].socket, "h2": lab.guests["h2"].socket}
    b_argv = lab.switches["b"].argv
    assert f"{r1.nics[1].socket}:rx:delay=1ms" in b_argv  # the link is r1's on b, not on a
    assert not any("delay" in a for a in lab.switches["a"].argv)
    assert f"{lab.guests['h1'].socket}:tx:loss=1%" in lab.switches["a"].argv
    # A route's switch is its subnet, a gateway guest its address on the shared switch.
    assert [r.render() for r in lab.guests["h1"].routes] == ["10.2.0.0/24,via=10.1.0.1"]
    assert [r.render() for r in lab.guests["h2"].routes] == ["10.1.0.0/24,via=10.2.0.1"]
    assert lab.guests["r1"].routes == ()
    # A guest names another by the address it reaches: h2 pings r1 on b, h1 pings h2 through r1.
    assert lab.guests["h1"].workloads[1].params["target"] == "10.2.0.2"
    assert lab.guests["h2"].workloads[1].params["target"] == "10.2.0.1"
    doc = r1.as_json()
    assert doc["switch"] == "a" and [n["switch"] for n in doc["nics"]] == ["a", "b"] and doc["forward"]


def test_the_wait_for_peers_is_the_labs_wait(tmp_path: Path) -> None:
    lab = plan(from_dict(router("wait", 9)), tmp_path)
    assert lab.guests["h1"].workloads[0].render() == "wait-for,target=10.2.0.2,timeout=9"


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        (
            "guests.r1.switch",
            "a",
            "guests.r1.switch: give switch, ip and mac (one NIC) or nics (several), not both",
        ),
        ("guests.r1.nics", [], "guests.r1.nics: at least one NIC"),
        ("guests.r1.nics.1.switch", "a", "guests.r1.nics[1].switch: guest r1 has a NIC on switch a already"),
        ("guests.r1.nics.1.switch", "c", "guests.r1.nics[1].switch: no switch 'c'; the switches: a, b"),
        ("guests.h1.ip", "10.1.0.1/24", "guests.h1.ip: 10.1.0.1 is r1's address on switch a already"),
        ("guests.r1.nics.1.ip", "10.3.0.1/24", "guests.r1.nics[1].ip: 10.3.0.1/24 is outside switch b's"),
        ("guests.r1.nics.1.mac", "01:00:00:00:00:01", "guests.r1.nics[1].mac: '01:00:00:00:00:01' is not"),
        ("guests.r1.nics.1.vlan", 3, "guests.r1.nics[1].vlan: unknown key"),
        ("guests.h1.routes.0.to", "a", "guests.h1.routes[0].to: h1 is on switch a itself"),
        ("guests.h1.routes.0.to", "10.2.0.1/24", "guests.h1.routes[0].to: 10.2.0.1/24 has host bits set"),
        ("guests.h1.routes.0.via", "h2", "guests.h1.routes[0].via: h2 shares no switch with h1"),
        ("guests.h1.routes.0.via", "h1", "guests.h1.routes[0].via: h1 shares no switch with h1"),
        (
            "guests.h1.routes.0.via",
            "10.2.0.1",
            "guests.h1.routes[0].via: 10.2.0.1 is on none of h1's networks",
        ),
        ("guests.h1.routes.0.via", "gw", "guests.h1.routes[0].via: 'gw' is neither a guest nor an IPv4"),
        ("guests.h1.routes.0", {"to": "b"}, "guests.h1.routes[0].via: missing"),
        ("guests.h1.forward", "yes", "guests.h1.forward: must be true or false"),
        ("links.0", {"guest": "r1", "rx": "loss=1%"}, "links[0].switch: r1 has NICs on a, b: say which link"),
        ("links.1.switch", "b", "links[1].switch: h1 has no NIC on switch 'b'; its switches: a"),
        (
            "links.1",
            {"guest": "r1", "switch": "b"},
            "links[1].guest: 'r1' has a link table to switch b already",
        ),
        ("wait", 0, "wait: 0 is too small: at least 1"),
    ],
)
def test_router_mistakes_are_refused_with_the_key_and_what_is_allowed(
    path: str, value: Any, words: str
) -> None:
    assert words in str(refused(router(path, value)))


def test_a_guest_without_switch_or_nics_and_overlapping_nics_and_one_mac_twice_are_refused() -> None:
    doc = router("guests.h1", {})
    assert "guests.h1.switch: missing: the switch its NIC is on (or nics" in str(refused(doc))
    doc = router("switches.b.subnet", "10.1.0.0/16")
    doc["guests"]["r1"]["nics"][1]["ip"] = "10.1.1.1/16"
    doc["guests"]["h2"]["routes"] = []
    assert "guests.r1.nics[1].ip: its network 10.1.0.0/16 overlaps 10.1.0.0/24 of the NIC on a" in str(
        refused(doc)
    )
    doc = router("guests.h1.mac", "02:00:00:00:00:01")
    doc["guests"]["r1"]["nics"][1]["mac"] = "02:00:00:00:00:01"
    assert "guests.h1.mac: 02:00:00:00:00:01 is r1's MAC already" in str(refused(doc))


def test_a_capture_check_reads_one_link_capture_of_a_router() -> None:
    doc = router("links", [{"guest": "r1", "switch": s, "capture": f"r1-{s}.pcapng"} for s in ("a", "b")])
    doc["checks"] = [{"kind": "capture", "link": "r1", "min": 1}]
    assert "checks[0].link: r1's links to a, b each have a capture" in str(refused(doc))
    doc["links"].pop()
    assert from_dict(doc).links[("r1", "a")].capture == Path("r1-a.pcapng")


@pytest.mark.parametrize(
    ("path", "value"),
    [("guests.r1.switch", "a"), ("guests.r1.ip", "10.1.0.9/24"), ("guests.h1", {}),
     ("guests.h1.routes.0", {"to": "b"}), ("guests.r1.nics.0.vlan", 3)],
)  # fmt: skip
def test_the_schema_refuses_what_the_parser_refuses_about_nics(path: str, value: Any) -> None:
    doc = router(path, value)
    refused(doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema())
    jsonschema.validate(ROUTER, schema())
