"""nicsim's pytest plugin without booting a guest: unique ids per worker, the server factory, the marker,
the failure report, and the entry point that makes ``pip install nicsim`` enough.

The plugin's own behaviour under pytest-xdist is checked on a small suite written to ``tmp_path`` and
run in a subprocess with ``-n 2``: each worker records the names it was given, and no two agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from nicsim.testing import (
    ServerError,
    ServerProcess,
    VMFactory,
    WorkerIds,
    locked_build_image,
    worker_number,
)

ROOT = Path(__file__).resolve().parent.parent


def test_macs_are_locally_administered_unicast_and_unique_per_worker_and_call() -> None:
    macs = [WorkerIds(worker=w, pid=4242).mac() for w in ("gw0", "gw1", "gw2")]
    ids = WorkerIds(worker="gw3", pid=4242)
    macs += [ids.mac() for _ in range(3)]
    assert len(set(macs)) == len(macs) == 6, macs
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0b10 and not first & 0b01, mac  # locally administered, unicast
    assert WorkerIds(worker="gw0", pid=1).mac() != WorkerIds(worker="gw0", pid=2).mac()


def test_subnets_and_names_differ_per_worker() -> None:
    a, b = WorkerIds(worker="gw0", pid=7), WorkerIds(worker="gw1", pid=7)
    assert a.subnet() != b.subnet() and not a.subnet().overlaps(b.subnet())
    assert a.address(1) == "10.128.0.1/24" and b.address(2, index=3) == "10.129.3.2/24"
    assert a.name("vm") != b.name("vm") and a.name("vm") != a.name("vm")
    assert (worker_number("gw12"), worker_number("main")) == (12, 0)
    with pytest.raises(ValueError):
        a.address(255)


async def test_a_server_serves_named_sockets_writes_stats_and_stops_by_pid(tmp_path: Path) -> None:
    server = ServerProcess(["a", "b"], out_dir=tmp_path / "out", port="switch",
                           impair=["b:rx:loss=20% seed=1"], pcap=True)  # fmt: skip
    with server:
        assert server.socket("a").name == "a" and server.socket("b").is_socket()
        assert len(str(server.socket("b"))) < 108
        stats = await server.wait_stats(lambda s: len(s["sockets"]) == 2)
        assert server.port_stats(stats, "b")["impair"]["rx"]["dropped"]["loss"] == 0
        assert server.returncode is None
    assert server.returncode == 0 and not server.socket("a").parent.exists()
    assert server.pcap is not None and server.pcap.exists()
    assert server.stop() == 0  # a second stop is harmless


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="exited with code") as err:
        ServerProcess(["a"], out_dir=tmp_path, port="switch", impair=["nobody:rx:loss=1%"]).start()
    assert "nobody" in err.value.output and err.value.exitcode not in (0, None)
    with pytest.raises(ValueError, match="socket name"):
        ServerProcess(["../a"], out_dir=tmp_path)


SUITE = '''
import json, os
from pathlib import Path
import pytest

OUT = Path(os.environ["NICSIM_PLUGIN_TEST_OUT"])

@pytest.mark.parametrize("n", range(4))
def test_names(n, nicsim_ids, nicsim_server, nicsim_netns):
    server = nicsim_server("a", "b", port="switch")
    ns = nicsim_netns()
    doc = {"worker": nicsim_ids.worker, "mac": nicsim_ids.mac(), "subnet": str(nicsim_ids.subnet()),
           "netns": ns.name, "socket": str(server.socket("a")), "pid": server.pid}
    (OUT / f"{n}.json").write_text(json.dumps(doc))

def test_fails_and_names_its_capture(nicsim_server):
    nicsim_server("a", pcap=True)
    assert False, "on purpose"

def test_boots_a_guest(nicsim_vm):
    pass
'''


def run_suite(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_suite.py").write_text(SUITE)
    ini = "[pytest]\naddopts = --strict-markers\nasyncio_default_fixture_loop_scope = function\n"
    (tmp_path / "pytest.ini").write_text(ini)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "pytest", "-p", "nicsim.pytest_plugin", "-p", "no:cacheprovider", *args]
    env = {**os.environ, "NICSIM_PLUGIN_TEST_OUT": str(out)}
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip


def test_under_xdist_every_worker_gets_its_own_names_and_a_failure_names_its_artifacts(
    tmp_path: Path,
) -> None:
    done = run_suite(tmp_path, "-n", "2", "-m", "not vm")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 4 passed" in done.stdout, done.stdout
    docs = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*.json"))]
    assert len(docs) == 4 and {d["worker"] for d in docs} == {"gw0", "gw1"}, docs
    for key in ("mac", "netns", "socket", "pid"):
        assert len({d[key] for d in docs}) == 4, (key, docs)
    assert len({d["subnet"] for d in docs}) == 2, docs  # one per worker
    assert all(d["netns"].startswith(f"nicsim-{d['worker']}-") for d in docs), docs
    # Everything was stopped or deleted by the time the run ended.
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    assert not any(d["netns"] in namespaces for d in docs)
    assert not any(Path(d["socket"]).exists() for d in docs)
    assert "- nicsim -" in done.stdout and "capture of server 1:" in done.stdout, done.stdout


def test_a_test_that_uses_nicsim_vm_is_marked_vm(tmp_path: Path) -> None:
    done = run_suite(tmp_path, "--collect-only", "-q", "-m", "vm")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_suite.py::test_boots_a_guest" in done.stdout
    assert "1/6 tests collected (5 deselected)" in done.stdout, done.stdout


def test_the_plugin_is_a_pytest11_entry_point_named_after_its_module() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"nicsim.pytest_plugin": "nicsim.pytest_plugin"}
    plugin = __import__("nicsim.pytest_plugin", fromlist=["*"])
    for fixture in ("nicsim_image", "nicsim_server", "nicsim_vm", "nicsim_netns", "nicsim_ids"):
        assert hasattr(plugin, fixture), fixture


def test_the_vm_factory_names_and_addresses_each_guest_and_refuses_a_name_twice(tmp_path: Path) -> None:
    image = SimpleNamespace(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img")
    recorded: list[tuple[str, Path]] = []
    make = VMFactory(image, WorkerIds(worker="gw2", pid=99), tmp_path, accel="tcg",
                     record=lambda label, path: recorded.append((label, path)))  # fmt: skip
    b = make(tmp_path / "b.sock", name="b")
    a = make(tmp_path / "a.sock")
    plain = make(guest_ip=None, kernel=tmp_path / "bzImage")
    assert (make.ip_of(b), make.ip_of(a)) == ("10.130.0.1", "10.130.0.2")
    assert make.name_of(a) == "vm2" and recorded[0] == ("console of b", tmp_path / "b" / "console.log")
    with pytest.raises(ValueError, match="taken"):
        make(tmp_path / "c.sock", name="b")
    with pytest.raises(ValueError, match="no address"):
        make.ip_of(plain)
    assert make.vms == [b, a, plain]


def test_image_builds_that_start_together_run_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two builders at once would download into one debs/ directory; the cache's flock keeps them apart
    (flock is per open file, so two threads here contend exactly as two xdist workers do)."""
    import images.build

    running, overlaps = [0], []

    def slow_build(cache: Path, *, progress: object) -> Path:
        running[0] += 1
        overlaps.append(running[0])
        time.sleep(0.2)
        running[0] -= 1
        return cache

    monkeypatch.setattr(images.build, "build_image", slow_build)
    with ThreadPoolExecutor(3) as pool:
        caches = list(pool.map(lambda _: locked_build_image(tmp_path), range(3)))
    assert caches == [tmp_path.resolve()] * 3
    assert overlaps == [1, 1, 1]
