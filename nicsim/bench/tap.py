"""The ``qemu-tap`` peer: QEMU's own userspace virtio-net on a TAP inside a throwaway network namespace.

Each run creates a namespace ``nicsim-bench-<pid>-<n>`` with ``tap0`` (10.0.2.2/24) and a permanent
neighbour entry for the guest (so no ARP is needed before the first frame), runs QEMU in it, and
deletes it afterwards, which deletes the TAP too; nothing is ever addressed outside it. Guest TX:
pktgen in the guest into the TAP (the guest's own count is the measure; the namespace's kernel drops
the frames). Guest RX: ``nicsim.bench.blaster`` in the namespace writes the frame every backend
sends (nicsim's generator, testpmd's txonly: to 198.18.0.2, UDP checksum 0) onto the TAP, started
when the guest is up, for the window plus a margin. TCP: an iperf3 server in the namespace; udp-rr:
a sockperf server there; ping: the namespace's kernel. QEMU's tap backend runs inside QEMU, so this
backend has no process of its own (no "CPU backend"); the sender, iperf3 or sockperf server is the
run's ``sender_pid`` (the "CPU sender" column, flagged at 90 %).
Once the guest has gone, the TAP's own counters (``ip -s -j link``) are the backend's count the
guest's is checked against: QEMU writes what the guest sent into the TAP (the TAP's rx, dropped
frames included: they reached it) and reads from it what the guest receives (the TAP's tx).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from qemu.testvm import Netns, NetnsError, TapNic

from .backend import PREFIX_LEN, Backend, BenchError, BenchRun, ChildProcess, RunContext, pinned, python_env
from .counts import Carried
from .latency import RR_PORT
from .matrix import Cell, Direction

SEND_MARGIN = 3.0  # the sender outlives the guest's counting window by this much
NETNS_PREFIX = "nicsim-bench"


@contextlib.contextmanager
def peer_netns(ctx: RunContext) -> Iterator[Netns]:
    """A fresh namespace ``nicsim-bench-<pid>-<n>`` with ``tap0`` (persistent, ``ctx.host_ip``, up) and
    the guest as a permanent neighbour, deleted (with the TAP) on the way out. Shared by QEMU's tap
    backend and nicsim's tap port, so both face the same peer."""
    with Netns.create(NETNS_PREFIX) as ns:
        ns.add_tap("tap0", f"{ctx.host_ip}/{PREFIX_LEN}", neighbour=(ctx.guest_ip, ctx.guest_mac))
        yield ns


def pinned_in(ns: Netns, argv: list[str], ctx: RunContext) -> list[str]:
    """``argv`` in ``ns`` on the backend's core."""
    return ns.exec_argv(pinned(argv, ctx.backend_cpu))


async def _start_server(ns: Netns, ctx: RunContext, argv: list[str]) -> ChildProcess:
    server = ChildProcess(pinned_in(ns, argv, ctx), ctx.workdir / f"{argv[0]}-{ns.name}.log")
    await server.start()
    # The server must be listening before the guest's client starts; it is up within ms, and the
    # guest needs seconds to boot, but check it did not die at once.
    if await server.wait(0.2) is not None:
        raise BenchError(f"{argv[0]} server in {ns.name} exited: {server.output()}")
    return server


async def start_iperf3_server(ns: Netns, ctx: RunContext) -> ChildProcess:
    """An iperf3 server on ``ctx.host_ip`` in ``ns``, on the backend's core; the caller stops it."""
    return await _start_server(ns, ctx, ["iperf3", "-s", "-B", ctx.host_ip])


async def start_sockperf_server(ns: Netns, ctx: RunContext) -> ChildProcess:
    """A UDP ``sockperf server`` on ``ctx.host_ip`` in ``ns`` (udp-rr's peer, blocking in recvfrom,
    not polling), on the backend's core; the caller stops it (SIGINT)."""
    return await _start_server(ns, ctx, ["sockperf", "server", "-i", ctx.host_ip, "-p", str(RR_PORT)])


def sockperf_missing() -> str | None:
    """Why the host cannot answer a udp-rr cell, or ``None``."""
    if shutil.which("sockperf") is None:
        return "udp-rr needs sockperf on the host: 'apt-get install sockperf'"
    return None


async def start_peer_server(ns: Netns, cell: Cell, ctx: RunContext) -> ChildProcess | None:
    """The server in ``ns`` that ``cell``'s guest talks to: iperf3 for TCP, sockperf for udp-rr;
    ``None`` for the cells the namespace's kernel (ping) or a sender serves."""
    if cell.direction.is_tcp:
        return await start_iperf3_server(ns, ctx)
    if cell.direction is Direction.UDP_RR:
        return await start_sockperf_server(ns, ctx)
    return None


def tap_stats(ns: Netns, ifname: str = "tap0") -> dict[str, Any]:
    """``ifname``'s ``stats64`` in ``ns``, as ``ip -s -j link show`` prints them (``BenchError`` if not)."""
    try:
        links = json.loads(ns.run("ip", "-s", "-j", "link", "show", "dev", ifname).stdout)
        stats: dict[str, Any] = links[0]["stats64"]
    except (NetnsError, ValueError, LookupError, TypeError) as err:
        raise BenchError(f"cannot read {ifname}'s counters in {ns.name}: {err}") from err
    return stats


def tap_carried(stats64: dict[str, Any]) -> Carried:
    """The TAP's count, seen from the guest: its rx (with drops) is what QEMU wrote for the guest,
    its tx what QEMU read for the guest."""
    rx, tx = stats64.get("rx", {}), stats64.get("tx", {})
    return Carried(source="tap0 counters in the namespace",
                   tx_packets=int(rx.get("packets", 0)) + int(rx.get("dropped", 0)),
                   tx_bytes=int(rx.get("bytes", 0)),
                   rx_packets=int(tx.get("packets", 0)), rx_bytes=int(tx.get("bytes", 0)))  # fmt: skip


class TapRun(BenchRun):
    def __init__(self, *, nic: TapNic, ns: Netns, cell: Cell, ctx: RunContext) -> None:
        super().__init__(nic=nic, netns=ns.name)
        self.ns = ns
        self.cell = cell
        self.ctx = ctx
        self.children: list[ChildProcess] = []

    async def spawn(self, name: str, argv: list[str]) -> ChildProcess:
        argv = pinned_in(self.ns, argv, self.ctx)
        child = ChildProcess(argv, self.ctx.workdir / f"{name}.log", env=python_env())
        self.children.append(child)
        await child.start()
        self.sender_pid = child.pid
        return child

    async def ready(self) -> None:
        if self.cell.direction is Direction.RX:
            await self.spawn("blaster", [
                sys.executable, "-m", "nicsim.bench.blaster", "--ifname", "tap0", "--dst-mac",
                self.ctx.guest_mac, "--frame", str(self.cell.frame_len),
                "--seconds", str(self.ctx.duration + SEND_MARGIN),
            ])  # fmt: skip


class QemuTapBackend(Backend):
    name = "qemu-tap"

    def unavailable(self) -> str | None:
        if not Path("/dev/net/tun").exists():
            return "qemu-tap: /dev/net/tun is missing (load the tun module)"
        return None

    def unsupported(self, cell: Cell) -> str | None:
        return sockperf_missing() if cell.direction is Direction.UDP_RR else None

    @contextlib.asynccontextmanager
    async def open_run(self, cell: Cell, ctx: RunContext) -> AsyncIterator[BenchRun]:
        with peer_netns(ctx) as ns:
            run = TapRun(nic=TapNic(mac=ctx.guest_mac, ifname="tap0"), ns=ns, cell=cell, ctx=ctx)
            try:
                server = await start_peer_server(ns, cell, ctx)
                if server is not None:
                    run.children.append(server)
                    run.sender_pid = server.pid
                yield run
                for child in run.children:
                    # SIGINT makes the blaster print its counts. The iperf3 server runs without -1 so
                    # that its CPU time is still readable when the measured window closes (sockperf's
                    # server never ends by itself).
                    await child.stop()
                    if "nicsim.bench.blaster" in child.argv:
                        run.extra["sender"] = child.output(500).strip()
                stats = tap_stats(ns)  # the guest has gone: nothing crosses the TAP any more
                run.extra["tap0"] = stats
                run.carried = tap_carried(stats)
            finally:
                for child in run.children:
                    await child.stop()
