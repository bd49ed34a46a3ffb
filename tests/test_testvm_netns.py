"""``qemu.testvm.Netns``: the one implementation of a throwaway namespace holding a TAP (used by the
``netns`` fixture, ``nicsim vm --nic tap`` and the bench's tap peers), and its one-line failures."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from nicsim.cli.failures import explain
from qemu.testvm import InvalidOptionError, Netns, NetnsError


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_a_namespace_has_lo_up_a_tap_with_its_neighbour_and_is_gone_after_close() -> None:
    with Netns.create("nicsim-t") as ns:
        assert ns.name.startswith(f"nicsim-t-{os.getpid()}-") and ns.name in namespaces()
        ns.add_tap("tap7", "10.9.0.2/24", neighbour=("10.9.0.15", "52:54:00:12:34:56"))
        assert "<LOOPBACK,UP" in ns.run("ip", "link", "show", "lo").stdout
        assert "10.9.0.2/24" in ns.run("ip", "addr", "show", "tap7").stdout
        neigh = ns.run("ip", "neigh", "show", "dev", "tap7").stdout
        assert "10.9.0.15 lladdr 52:54:00:12:34:56 PERMANENT" in neigh
        assert ns.exec_argv(["true"]) == ["ip", "netns", "exec", ns.name, "true"]
        other = Netns.create("nicsim-t")
        assert other.name != ns.name  # unique within the process
        other.close()
    assert ns.name not in namespaces() and other.name not in namespaces()
    ns.close()  # a second close is harmless


def test_a_bridge_holds_two_taps_without_addresses_and_goes_with_the_namespace() -> None:
    with Netns.create("nicsim-t") as ns:
        ns.add_bridge("br0")
        for tap in ("tapa", "tapb"):
            ns.add_tap(tap, None, master="br0")
        links = {link["ifname"]: link for link in json.loads(ns.run("ip", "-j", "link", "show").stdout)}
        assert links["tapa"].get("master") == links["tapb"].get("master") == "br0"
        assert "UP" in links["br0"]["flags"] and "UP" in links["tapa"]["flags"]
        assert "inet " not in ns.run("ip", "addr", "show", "tapa").stdout
    assert ns.name not in namespaces()


def test_close_kills_what_popen_started() -> None:
    with Netns.create("nicsim-t") as ns:
        child = ns.popen("sleep", "60")
    assert child.returncode is not None and child.returncode < 0


def test_a_failed_ip_is_one_line_with_what_ip_said_and_the_namespace_is_not_left_behind() -> None:
    with Netns.create("nicsim-t") as ns:
        ns.add_tap("tap0", "10.9.0.2/24")
        with pytest.raises(NetnsError) as info:
            ns.add_tap("tap0", "10.9.0.3/24")  # the TAP exists already
    err = info.value
    assert isinstance(err, subprocess.CalledProcessError) and err.returncode != 0
    assert "\n" not in str(err) and str(err).startswith(f"'ip netns exec {ns.name} ip tuntap add dev tap0")
    assert err.stderr.strip() and err.stderr.strip().splitlines()[0] in str(err)
    line = explain(err)  # what `nicsim vm --nic tap` prints instead of a traceback
    assert line is not None and "\n" not in line and err.stderr.strip().splitlines()[0] in line
    assert ns.name not in namespaces()
    assert ns.run("true", check=False).returncode != 0  # gone; and check=False returns, never raises


def test_a_name_that_is_not_plain_is_refused_before_ip_sees_it() -> None:
    with pytest.raises(InvalidOptionError):
        Netns("../etc")
