"""``nicsim serve --pcap`` as users run it, in a subprocess: a guest (the Python frontend) pings the
responder, serve stops on SIGINT, and the file reads back with ``tcpdump -r`` and scapy; several
sockets share one pcapng file as interfaces, or get a pcap file each; the closing note says what was
captured and what it cost; a bad option or an unwritable file is one line and a non-zero exit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nicsim.cli.capture import interface_names, pcap_paths, uplink_interface
from nicsim.frontend import VhostUserFrontend
from nicsim.ports import frames as fr
from tests.pcap_read import read_capture, tcpdump
from tests.test_capture_ports import arp_request, ping, udp

ROOT = Path(__file__).resolve().parent.parent


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def stderr(self) -> str:
        return self.log.read_text()


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, sockets: list[Path], *args: str) -> AsyncIterator[Served]:
    """``nicsim serve`` on ``sockets`` until the block ends, then SIGINT and wait for it to exit."""
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "nicsim", "serve", "--stats-interval", "0.2", *args]
    for s in sockets:
        argv += ["--socket", str(s)]
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stderr=err, cwd=ROOT)
    served = Served(proc, log)
    try:
        async with asyncio.timeout(30):
            while not all(s.exists() for s in sockets):
                assert proc.poll() is None, served.stderr
                await asyncio.sleep(0.05)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def exchange(sock: Path, requests: list[bytes]) -> list[bytes]:
    """Send each request as a guest would and wait for its one reply; returns what the guest sent and
    received, interleaved, as the capture should hold it."""
    fe = await VhostUserFrontend.connect(sock)
    try:
        await fe.handshake()
        await fe.start()
        fe.post_rx(16)
        seen: list[bytes] = []
        for request in requests:
            fe.transmit([request])
            await fe.wait_used(1, 1)
            (reply,) = await fe.wait_used(0, 1)
            seen += [request, (reply.data or b"")[12:]]
        return seen
    finally:
        await fe.close()


async def test_a_ping_through_serve_is_captured_exactly(tmp_path: Path) -> None:
    sock, cap, stats = tmp_path / "nicsim.sock", tmp_path / "cap.pcapng", tmp_path / "stats.json"
    async with serve(tmp_path, [sock], "--pcap", str(cap), "--stats-file", str(stats)) as served:
        seen = await exchange(sock, [arp_request(), ping(1), ping(2), ping(3)])
    assert served.proc.returncode == 0, served.stderr
    captured = read_capture(cap)
    assert [c.data for c in captured] == seen
    assert [c.direction for c in captured] == [2, 1] * 4
    assert {c.interface for c in captured} == {"nicsim.sock"}
    _, dumped = tcpdump(cap)
    kinds = ["Request who-has", "Reply 10.0.2.2 is-at", "ICMP echo request", "ICMP echo reply"]
    assert [next(k for k in kinds if k in d.line) for d in dumped] == kinds[:2] + kinds[2:] * 3
    assert f"nicsim serve: capture: 8 frames in {cap} (pcapng), " in served.stderr
    assert "ms spent capturing" in served.stderr
    assert served.stderr.rstrip().endswith("nicsim serve: stopped")
    (summary,) = json.loads(stats.read_text())["capture"]
    assert summary["frames"] == 8
    assert summary["interfaces"] == [{"name": "nicsim.sock", "inbound": 4, "outbound": 4}]


async def test_several_sockets_share_one_pcapng_file_as_interfaces(tmp_path: Path) -> None:
    a, b, cap = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "cap.pcapng"
    async with serve(tmp_path, [a, b], "--pcap", str(cap), "--snaplen", "64") as served:
        seen_a = await exchange(a, [ping(1)])
        seen_b = await exchange(b, [ping(2), ping(3)])
    assert served.proc.returncode == 0, served.stderr
    captured = read_capture(cap)
    assert [(c.interface, c.data) for c in captured] == [("a.sock", f[:64]) for f in seen_a] + [
        ("b.sock", f[:64]) for f in seen_b]  # fmt: skip
    assert [c.wirelen for c in captured] == [len(f) for f in seen_a + seen_b]
    header, dumped = tcpdump(cap)
    assert "snapshot length 64" in header and len(dumped) == 6


async def test_pcap_gives_each_socket_its_own_file(tmp_path: Path) -> None:
    a, b, cap = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "cap.pcap"
    async with serve(tmp_path, [a, b], "--pcap", str(cap), "--pcap-format", "pcap", "--pcap-ns") as served:
        seen_a = await exchange(a, [ping(1)])
        seen_b = await exchange(b, [arp_request(), ping(2)])
    assert served.proc.returncode == 0, served.stderr
    assert not cap.exists()
    assert [c.data for c in read_capture(tmp_path / "cap-a.pcap")] == seen_a
    assert [c.data for c in read_capture(tmp_path / "cap-b.pcap")] == seen_b
    assert len(tcpdump(tmp_path / "cap-b.pcap")[1]) == 4


async def test_one_port_is_captured_on_its_own_beside_the_shared_file(tmp_path: Path) -> None:
    """--pcap-port b.sock=FILE: b's frames alone in FILE (one interface, named after it), while --pcap
    still holds both sockets' frames."""
    a, b, cap, own = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "cap.pcapng", tmp_path / "b.pcapng"
    async with serve(tmp_path, [a, b], "--pcap", str(cap), "--pcap-port", f"b.sock={own}") as served:
        seen_a = await exchange(a, [ping(1)])
        seen_b = await exchange(b, [ping(2), ping(3)])
    assert served.proc.returncode == 0, served.stderr
    assert [(c.interface, c.data) for c in read_capture(own)] == [("b.sock", f) for f in seen_b]
    assert len(read_capture(cap)) == len(seen_a) + len(seen_b)
    assert len(tcpdump(own)[1]) == 4


def test_a_pcap_port_that_names_no_port_is_refused_with_the_ports(tmp_path: Path) -> None:
    done = nicsim("serve", "--socket", str(tmp_path / "s.sock"), "--pcap-port", f"x.sock={tmp_path / 'c'}")
    assert done.returncode == 2
    assert "--pcap-port" in done.stderr and "the ports: s.sock" in done.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "s.sock").exists()


async def test_a_size_limit_rotates_the_files_serve_writes(tmp_path: Path) -> None:
    sock, cap = tmp_path / "nicsim.sock", tmp_path / "cap.pcapng"
    args = ["--port", "reflect", "--pcap", str(cap), "--pcap-max-mb", "0.004", "--pcap-files", "3"]
    async with serve(tmp_path, [sock], *args) as served:
        fe = await VhostUserFrontend.connect(sock)
        try:
            await fe.handshake()
            await fe.start()
            fe.post_rx(64)
            for i in range(0, 60, 10):
                fe.transmit([udp(i + k, size=500) for k in range(10)])
                await fe.wait_used(1, 10)
                await fe.wait_used(0, 10)
        finally:
            await fe.close()
    assert served.proc.returncode == 0, served.stderr
    names = sorted(p.name for p in tmp_path.glob("cap.pcapng*"))
    assert names == ["cap.pcapng", "cap.pcapng.1", "cap.pcapng.2"]
    for p in tmp_path.glob("cap.pcapng*"):
        assert p.stat().st_size <= 4000
        assert len(tcpdump(p)[1]) == len(read_capture(p)) > 0
    newest = read_capture(cap)
    last = newest[-1].data
    assert last[:6] == fr.mac_bytes("52:54:00:12:34:56") and newest[-1].direction == 1  # a reflection
    assert "rotations" in served.stderr


async def test_generator_frames_reach_the_guest_and_the_capture_through_the_pump(tmp_path: Path) -> None:
    sock, cap = tmp_path / "nicsim.sock", tmp_path / "cap.pcapng"
    args = ["--port", "generator,size=100,count=300", "--pcap", str(cap)]
    async with serve(tmp_path, [sock], *args) as served:
        fe = await VhostUserFrontend.connect(sock)
        try:
            await fe.handshake()
            await fe.start()
            got: list[bytes] = []
            while len(got) < 300:
                fe.post_rx(100)
                got += [(c.data or b"")[12:] for c in await fe.wait_used(0, 100)]
        finally:
            await fe.close()
    assert served.proc.returncode == 0, served.stderr
    captured = read_capture(cap)
    assert len(set(got)) == 1 and len(got[0]) == 100
    assert [(c.data, c.direction) for c in captured] == [(got[0], 1)] * 300


def nicsim(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nicsim", *argv], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)  # fmt: skip


def test_an_unwritable_capture_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    done = nicsim("serve", "--socket", str(sock), "--pcap", str(tmp_path / "no-such-dir" / "cap.pcapng"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"nicsim serve: capture file {tmp_path / 'no-such-dir' / 'cap.pcapng'}: No such file or directory"
    ]
    assert not sock.exists()


@pytest.mark.parametrize(("option", "message"), [
    (["--snaplen", "0"], "--snaplen 0: use 1..262144"),
    (["--pcap-files", "0"], "--pcap-files 0: keep at least 1 file"),
    (["--pcap-max-mb", "-1"], "--pcap-max-mb -1: use 0"),
])  # fmt: skip
def test_a_bad_capture_option_is_named_and_exits_2(tmp_path: Path, option: list[str], message: str) -> None:
    done = nicsim("serve", "--socket", str(tmp_path / "s.sock"), "--pcap", str(tmp_path / "c"), *option)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "c").exists()


def test_socket_names_stay_apart_in_interfaces_and_pcap_file_names() -> None:
    cap = Path("run/cap.pcap")
    assert interface_names([Path("x/a.sock"), Path("x/b.sock")]) == ["a.sock", "b.sock"]
    assert interface_names([Path("x/g.sock"), Path("y/g.sock")]) == ["x/g.sock", "y/g.sock"]
    assert pcap_paths(cap, [Path("x/a.sock")]) == [cap]
    two, clash = [Path("x/a.sock"), Path("x/b.sock")], [Path("x/g.sock"), Path("y/g.sock")]
    assert pcap_paths(cap, two) == [Path("run/cap-a.pcap"), Path("run/cap-b.pcap")]
    assert pcap_paths(cap, clash) == [Path("run/cap-0.pcap"), Path("run/cap-1.pcap")]


def test_uplinks_are_named_after_their_switch_port_and_kind() -> None:
    cap = Path("run/cap.pcap")
    assert uplink_interface("uplink0", "tap,netns=lab,ifname=tap0") == "uplink0 (tap)"
    assert uplink_interface("uplink1", "vxlan,remote=10.0.0.2,vni=42") == "uplink1 (vxlan)"
    # A socket and an uplink are two captured ports: a file each, the uplink's named after it.
    assert pcap_paths(cap, [Path("x/a.sock")], ["uplink0"]) == [Path("run/cap-a.pcap"),
                                                                Path("run/cap-uplink0.pcap")]  # fmt: skip
    assert pcap_paths(cap, [], ["uplink0"]) == [cap]
    assert pcap_paths(cap, [Path("x/uplink0.sock")], ["uplink0"]) == [Path("run/cap-0.pcap"),
                                                                      Path("run/cap-1.pcap")]  # fmt: skip
