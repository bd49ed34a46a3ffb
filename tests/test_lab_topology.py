"""Topology files: what the parser accepts, what it refuses and how it says so, what a lab plans to run,
the verdict on results, and the published JSON Schema agreeing with the parser."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

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


def with_(path: str, value: Any) -> dict[str, Any]:
    """BASE with one key set (``a.b.c``; a number indexes a list)."""
    doc = copy.deepcopy(BASE)
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
    doc = with_("switches.lan", {"ageing": 30, "capture": "c.pcapng", "uplinks": ["tap,netns=x"]})
    doc["links"][0]["capture"] = "h2.pcapng"
    lab = plan(from_dict(doc, base_dir=tmp_path), tmp_path / "run", python="py")
    argv = list(lab.switches["lan"].argv)
    assert argv[:5] == ["py", "-m", "nicsim", "serve", "--port"] and argv[5] == "switch,ageing=30"
    sock = str(tmp_path / "run" / "h2.sock")
    assert argv[argv.index("--impair") + 1] == f"{sock}:rx:loss=10% seed=1"
    assert argv[argv.index("--uplink") + 1] == "tap,netns=x"
    assert argv[argv.index("--pcap-port") + 1] == f"{sock}={tmp_path / 'run' / 'h2.pcapng'}"  # one link alone
    assert argv[argv.index("--pcap") + 1] == str(tmp_path / "run" / "c.pcapng")  # an output: in the run dir
    sockets = [argv[i + 1] for i, a in enumerate(argv) if a == "--socket"]
    assert sockets == [str(tmp_path / "run" / "h1.sock"), sock]


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
