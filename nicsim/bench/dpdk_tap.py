"""The ``dpdk-tap`` peer, latency rows only: DPDK's testpmd forwarding between the guest and a TAP.

``dpdk``'s latency rows are testpmd answering the guest itself (``icmpecho``): no kernel and no TAP
behind it, and no UDP responder (udp-rr is n/a there). This row puts DPDK where nicsim's and QEMU's
tap rows are: testpmd runs inside a throwaway namespace ``nicsim-bench-<pid>-<n>`` with two ports,
the guest's ``net_vhost0`` and ``net_tap0`` (a TAP ``tap0`` of its own, 10.0.2.2/24, the guest a
permanent neighbour), and forwards every frame from one to the other unchanged
(``--forward-mode=io``, one busy-polling lcore for both); the namespace's kernel answers the ping,
its sockperf server the udp-rr requests. The namespace (and the TAP) go with the run. Port 0's own
counters (what it received from the guest, what it sent it) are the backend's count.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
from collections.abc import AsyncIterator

from qemu.testvm import Netns, NetnsError, VhostUserNic

from .backend import PREFIX_LEN, BenchError, BenchRun, ChildProcess, RunContext
from .matrix import Cell, Direction
from .tap import NETNS_PREFIX, sockperf_missing, start_peer_server
from .testpmd import RUNTIME_DIR, DpdkBackend, build_testpmd_argv, testpmd_carried

TAP = "tap0"
_counter = itertools.count()
_PORT_BLOCK = re.compile(r"Forward statistics for port (\d+)\s*-+\s*(.*?)-{20,}", re.S)
_COUNTER = re.compile(r"(RX-packets|TX-packets|RX-dropped|TX-dropped):\s*(\d+)")


def port_counters(output: str, port: int) -> dict[str, int]:
    """Port ``port``'s counters in testpmd's final "Forward statistics" block (the last one printed)."""
    found: dict[str, int] = {}
    for number, body in _PORT_BLOCK.findall(output):
        if int(number) == port:
            found = {name: int(value) for name, value in _COUNTER.findall(body)}
    return found


class DpdkTapBackend(DpdkBackend):
    name = "dpdk-tap"

    def unavailable(self) -> str | None:
        if not os.path.exists("/dev/net/tun"):
            return "dpdk-tap: /dev/net/tun is missing (load the tun module)"
        return super().unavailable()

    def unsupported(self, cell: Cell) -> str | None:
        if not cell.direction.is_latency:
            return "dpdk-tap has latency rows only (testpmd forwarding to a TAP); dpdk's rows measure frames"
        return sockperf_missing() if cell.direction is Direction.UDP_RR else None

    @contextlib.asynccontextmanager
    async def open_run(self, cell: Cell, ctx: RunContext) -> AsyncIterator[BenchRun]:
        n = next(_counter)
        prefix = f"nicsim-bench-tap-{os.getpid()}-{n}"
        sock = ctx.workdir / f"testpmd-tap-{n}.sock"
        argv = build_testpmd_argv(socket=sock, mode="io", frame_len=cell.frame_len, prefix=prefix,
                                  cpu=ctx.backend_cpu, peer_mac=ctx.guest_mac, binary=self.binary,
                                  tap=TAP)  # fmt: skip
        with Netns.create(NETNS_PREFIX) as ns:
            proc = ChildProcess(ns.exec_argv(argv), ctx.workdir / f"testpmd-tap-{n}.log")
            run = BenchRun(nic=VhostUserNic(mac=ctx.guest_mac, socket=sock))
            server: ChildProcess | None = None
            try:
                await proc.start()
                run.pid = proc.pid
                await proc.wait_for_path(sock, ctx.start_timeout)
                await _address_tap(ns, ctx, proc)
                server = await start_peer_server(ns, cell, ctx)
                if server is not None:
                    run.sender_pid = server.pid
                yield run
                if server is not None:
                    await server.stop()
                status = await proc.stop()
                counters = port_counters(proc.output(20000), 0)
                run.extra["testpmd"] = {"mode": "io", "tap": TAP, "exit_status": status, **counters}
                run.carried = testpmd_carried(counters, source="testpmd port 0 (the guest's) counters")
                if status not in (0, None) and not counters:
                    raise BenchError(f"dpdk-testpmd exited with status {status}:\n{proc.output()}")
            finally:
                if server is not None:
                    await server.stop()
                await proc.stop()
                shutil.rmtree(RUNTIME_DIR / prefix, ignore_errors=True)
                sock.unlink(missing_ok=True)


async def _address_tap(ns: Netns, ctx: RunContext, proc: ChildProcess, timeout: float = 10.0) -> None:
    """Give testpmd's TAP the host's address and the guest as a neighbour, once testpmd created it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while ns.run("ip", "link", "show", "dev", TAP, check=False).returncode != 0:
        if proc.returncode is not None or loop.time() > deadline:
            raise BenchError(f"dpdk-testpmd created no {TAP} in {ns.name}:\n{proc.output()}")
        await asyncio.sleep(0.05)
    try:
        ns.run("ip", "addr", "add", f"{ctx.host_ip}/{PREFIX_LEN}", "dev", TAP)
        ns.run("ip", "link", "set", TAP, "up")
        ns.run("ip", "neigh", "replace", ctx.guest_ip, "lladdr", ctx.guest_mac, "dev", TAP, "nud",
               "permanent")
    except NetnsError as err:
        raise BenchError(f"cannot address {TAP} in {ns.name}: {err}") from err
