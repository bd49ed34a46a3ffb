"""The ``dpdk`` peer: DPDK's ``dpdk-testpmd`` as the guest's vhost-user backend (``net_vhost``).

What it needs here, checked on Debian 12 with DPDK 22.11 (package ``dpdk-dev``): no hugepages
(``--no-huge -m 1024``), no PCI scan (``--no-pci``), a unique ``--file-prefix`` per run (its runtime
directory is ours to delete afterwards; ``--in-memory`` cannot be combined with ``--no-huge``), a
bounded mbuf pool (``--total-num-mbufs``), and ``--stats-period 1`` so it runs without a terminal
(otherwise it exits at once on an empty stdin). Two lcores, both mapped onto the backend's CPU: the
main lcore only prints statistics, the forwarding lcore busy-polls, so "CPU% backend" reads ~100 %
by design. Guest TX cells use ``--forward-mode=rxonly``; guest RX cells ``txonly`` with
``--txpkts=<frame length>`` and ``--eth-peer`` set to the guest's MAC; ping cells ``icmpecho``
(testpmd itself answers the guest's ARP requests and pings: no kernel, no TAP behind it). udp-rr is
"n/a": no forwarding mode answers a sockperf request (``UDP_RR_NA`` says why). QEMU
starts once the socket exists; SIGINT stops testpmd, which prints its accumulated counters (kept in
the run's JSON); its packet counters are the backend's own count the guest's is checked against
(``testpmd_carried``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from qemu.testvm import VhostUserNic

from .backend import Backend, BenchError, BenchRun, ChildProcess, RunContext
from .counts import Carried
from .matrix import Cell, Direction

TESTPMD = "dpdk-testpmd"
RUNTIME_DIR = Path("/var/run/dpdk")
_counter = itertools.count()
# Tried with testpmd 22.11 (5tswap on a net_tap port, sockperf 3.7 on the kernel's side): the request
# came back with MACs, addresses and ports swapped and reached the client's socket, and the client
# waited on, its first message unanswered. 5tswap leaves the payload alone, and sockperf's header
# flags a message a client sent (MASK_CLIENT) until a server clears it; the client ignores one that
# still has it. 5tswap also answers no ARP request (it swaps the MACs and sends the request back).
UDP_RR_NA = (
    "testpmd has no UDP responder: 5tswap sends the request back with addresses and ports swapped but "
    "its payload unchanged, and sockperf's client ignores a message still flagged as a client's"
)
_STAT_RE = re.compile(r"(RX-packets|RX-bytes|RX-missed|TX-packets|TX-bytes|TX-errors):\s*(\d+)")


def build_testpmd_argv(
    *, socket: Path, mode: str, frame_len: int, prefix: str, cpu: int | None, peer_mac: str,
    binary: str = TESTPMD, tap: str | None = None,
) -> list[str]:  # fmt: skip
    """testpmd's command line; ``tap``: a second port, ``net_tap0``, a TAP of that name it creates
    (``nicsim.bench.dpdk_tap``: ``io`` forwarding between the two)."""
    lcores = f"0@{cpu},1@{cpu}" if cpu is not None else "0,1"
    ports = ["--vdev", f"net_vhost0,iface={socket}"] + (["--vdev", f"net_tap0,iface={tap}"] if tap else [])
    argv = [
        binary, "--lcores", lcores, "--no-huge", "-m", "1024", "--no-pci",
        f"--file-prefix={prefix}", *ports, "--log-level=user1,7",
        "--", f"--forward-mode={mode}", "--stats-period", "1", "--nb-cores=1",
        "--total-num-mbufs=16384", f"--eth-peer=0,{peer_mac}",
    ]  # fmt: skip
    if mode == "txonly":
        argv.append(f"--txpkts={frame_len}")
    return argv


def parse_counters(output: str) -> dict[str, int]:
    """The last value testpmd printed for each port counter (its final, accumulated block)."""
    counters: dict[str, int] = {}
    for name, value in _STAT_RE.findall(output):
        counters[name] = int(value)
    return counters


def testpmd_carried(counters: dict[str, int], source: str = "testpmd port counters") -> Carried:
    """A vhost testpmd's own count, seen from the guest: what it received was the guest's TX, what
    it sent the guest's RX. Packets only: its last RX-/TX-bytes come from the last periodic block,
    not from the final summary, and lag the packet counts."""
    return Carried(source=source, tx_packets=counters.get("RX-packets"),
                   rx_packets=counters.get("TX-packets"))  # fmt: skip


def dpdk_version() -> str | None:
    """DPDK's version as its pkg-config file or Debian's package database says, if either knows."""
    for argv in (["pkg-config", "--modversion", "libdpdk"], ["dpkg-query", "-W", "-f", "${Version}", "dpdk"]):
        with contextlib.suppress(OSError):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
    return None


def testpmd_mode(direction: Direction) -> str:
    """testpmd's forwarding mode for a cell: it sinks guest TX, sends guest RX, and for latency cells
    answers the guest's ARP and ICMP echo requests itself (``icmpecho``, on the port they came in on)."""
    if direction.is_latency:
        return "icmpecho"
    return "rxonly" if direction is Direction.TX else "txonly"


class DpdkBackend(Backend):
    name = "dpdk"

    def __init__(self, binary: str = TESTPMD) -> None:
        self.binary = binary

    def unavailable(self) -> str | None:
        if shutil.which(self.binary) is None:
            return (f"{self.name}: {self.binary} not found; install it with 'apt-get install dpdk-dev' "
                    "(Debian)")
        return None

    def unsupported(self, cell: Cell) -> str | None:
        if cell.direction.is_tcp:
            return "testpmd forwards frames and has no TCP stack"
        if cell.direction is Direction.UDP_RR:
            return UDP_RR_NA
        return None

    @contextlib.asynccontextmanager
    async def open_run(self, cell: Cell, ctx: RunContext) -> AsyncIterator[BenchRun]:
        n = next(_counter)
        prefix = f"nicsim-bench-{os.getpid()}-{n}"
        sock = ctx.workdir / f"testpmd-{n}.sock"
        mode = testpmd_mode(cell.direction)
        argv = build_testpmd_argv(
            socket=sock, mode=mode, frame_len=cell.frame_len, prefix=prefix, cpu=ctx.backend_cpu,
            peer_mac=ctx.guest_mac, binary=self.binary,
        )  # fmt: skip
        proc = ChildProcess(argv, ctx.workdir / f"testpmd-{n}.log")
        run = BenchRun(nic=VhostUserNic(mac=ctx.guest_mac, socket=sock))
        try:
            await proc.start()
            run.pid = proc.pid
            await proc.wait_for_path(sock, ctx.start_timeout)
            yield run
            status = await proc.stop()
            counters = parse_counters(proc.output(20000))
            run.extra["testpmd"] = {"mode": mode, "exit_status": status, **counters}
            run.carried = testpmd_carried(counters)
            if status not in (0, None) and not counters:
                raise BenchError(f"dpdk-testpmd exited with status {status}:\n{proc.output()}")
        finally:
            await proc.stop()
            shutil.rmtree(RUNTIME_DIR / prefix, ignore_errors=True)
            sock.unlink(missing_ok=True)
