"""The ``nicsim`` backend: ``python -m nicsim serve`` as a subprocess, the guest's vhost-user backend.

Written against the serve contract: ``--socket SOCK`` (nicsim listens, QEMU connects once the file
exists), ``--port sink,read=on`` for guest TX cells (a sink that reads every frame byte, as DPDK
copies every frame; ``nicsim-count-only`` is the labelled row with the count-only ``sink``;
``nicsim-busy-poll`` the one that polls its core as DPDK does; ``nicsim-mergeable`` guest RX in the peers'
mergeable-buffer mode; ``nicsim-no-lane`` requests through the event loop, its request lane off),
``--port generator,size=N`` for guest RX cells (UDP
frames of N bytes, FCS excluded, to the guest's MAC as fast as the guest takes them), and
``--stats-file FILE``: a JSON snapshot rewritten every second and at exit, whose ``pool.high_water``
is the table's pool column and whose per-queue counters go into the run's JSON and are the backend's
own count the guest's is checked against (odd queues: taken from the guest; even: given to it). SIGINT ends it
cleanly. TCP cells use ``--port tap,netns=NS,ifname=tap0`` (offloads on): the run creates namespace
``NS`` with ``tap0`` (the host address, the guest as a permanent neighbour) and an iperf3 server there,
exactly as the ``qemu-tap`` peer does, and deletes it afterwards; QEMU itself stays in the root
namespace. The backend CPU column is nicsim's; the namespace's kernel and iperf3 share its core
(iperf3's share is the "CPU sender" column). Latency cells use the same tap port and namespace: the
namespace's kernel answers the guest's pings, and a sockperf server there its udp-rr requests, as
behind the ``qemu-tap`` peer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.testvm import VhostUserNic

from .backend import Backend, BenchError, BenchRun, ChildProcess, RunContext, pinned, python_env
from .counts import Carried
from .matrix import Cell, Direction
from .tap import peer_netns, sockperf_missing, start_peer_server

_counter = itertools.count()
TESTPMD_FRAME = "src_ip=198.18.0.1,dst_ip=198.18.0.2,udp_checksum=0"


def serve_port(cell: Cell, netns: str | None = None, *, read: bool = False) -> str:
    """The ``--port`` argument for a cell: a sink for guest TX (``read``: one that reads every byte),
    a sized generator for guest RX, the tap port in ``netns`` for TCP."""
    if cell.direction is Direction.TX:
        return "sink,read=on" if read else "sink"
    if cell.direction is Direction.RX:
        # The same frame testpmd's txonly sends (198.18.0.1 -> 198.18.0.2, UDP checksum 0), so every
        # backend makes the guest do the same work per packet: a frame to the guest's own address with
        # a real checksum costs the guest about twice as much under TCG (verified in software).
        return f"generator,size={cell.frame_len},{TESTPMD_FRAME}"
    if netns is None:
        raise ValueError(f"{cell.direction.value}: the tap port needs a network namespace")
    return f"tap,netns={netns},ifname=tap0,offload=on"


def high_water(stats: dict[str, Any]) -> int | None:
    pool = stats.get("pool")
    value = pool.get("high_water") if isinstance(pool, dict) else None
    return value if isinstance(value, int) else None


def nicsim_carried(stats: dict[str, Any]) -> Carried:
    """nicsim's own count from a stats-file snapshot: packets and bytes it took off the guest's
    transmit rings (odd queues) and put on its receive rings (even queues)."""
    sums = {"tx_packets": 0, "tx_bytes": 0, "rx_packets": 0, "rx_bytes": 0}
    queues = stats.get("queues")
    if not isinstance(queues, list) or not queues:
        return Carried(source="nicsim stats file (no queues)")
    for q in queues:
        if not isinstance(q, dict):
            continue
        side = "tx" if int(q.get("index", 0)) % 2 else "rx"
        sums[f"{side}_packets"] += int(q.get("packets", 0))
        sums[f"{side}_bytes"] += int(q.get("bytes", 0))
    return Carried(source="nicsim stats file, queue counters", **sums)


class NicsimBackend(Backend):
    name = "nicsim"
    #: guest TX into a sink that reads (sums) every frame byte, as DPDK copies every frame into an mbuf
    read_tx: bool = True
    #: appended to the guest-RX generator's port spec (``nicsim bench --ndr``: an offered load)
    generator_options = ""
    stats_file: Path | None = None

    def extra_serve_args(self, ctx: RunContext, n: int) -> list[str]:
        """More ``nicsim serve`` arguments for run ``n`` (none here; ``nicsim.bench.ndr_vm`` adds some)."""
        return []

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("nicsim.cli.serve") is None:
            return "nicsim: the 'nicsim serve' command is not built yet (nicsim/cmd_serve.py)"
        return None

    def unavailable_tcp(self) -> str | None:
        if not Path("/dev/net/tun").exists():
            return "nicsim tcp: /dev/net/tun is missing (load the tun module)"
        return None

    def unsupported(self, cell: Cell) -> str | None:
        if not cell.direction.sizeless:
            return None
        missing = sockperf_missing() if cell.direction is Direction.UDP_RR else None
        return self.unavailable_tcp() or missing

    @contextlib.asynccontextmanager
    async def open_run(self, cell: Cell, ctx: RunContext) -> AsyncIterator[BenchRun]:
        n = next(_counter)
        sock = ctx.workdir / f"nicsim-{n}.sock"
        stats_file = ctx.workdir / f"nicsim-{n}.stats.json"
        run = BenchRun(nic=VhostUserNic(mac=ctx.guest_mac, socket=sock, packed=True if ctx.packed else None))
        server: ChildProcess | None = None  # iperf3 (TCP) or sockperf (udp-rr) in the namespace
        with contextlib.ExitStack() as stack:  # the namespace outlives the processes that use it
            ns = stack.enter_context(peer_netns(ctx)) if cell.direction.sizeless else None
            port = serve_port(cell, None if ns is None else ns.name, read=self.read_tx)
            if cell.direction is Direction.RX and self.generator_options:
                port = f"{port},{self.generator_options}"
            argv = pinned([
                sys.executable, "-m", "nicsim", "serve", "--socket", str(sock),
                "--port", port, "--stats-file", str(stats_file), *self.extra_serve_args(ctx, n),
                *ctx.nicsim_args,
            ], ctx.backend_cpu)  # fmt: skip
            self.stats_file = stats_file  # the run's live stats (nicsim.bench.ndr_vm reads it)
            proc = ChildProcess(argv, ctx.workdir / f"nicsim-{n}.log", env=python_env())
            try:
                if ns is not None:
                    server = await start_peer_server(ns, cell, ctx)
                    run.sender_pid = None if server is None else server.pid
                await proc.start()
                run.pid = proc.pid
                await proc.wait_for_path(sock, ctx.start_timeout)
                yield run
                status = await proc.stop()
                if status != 0:
                    raise BenchError(f"nicsim serve exited with status {status}:\n{proc.output()}")
                try:
                    stats = json.loads(stats_file.read_text())
                except (OSError, ValueError) as err:
                    raise BenchError(f"nicsim serve left no readable stats file {stats_file}: {err}") from err
                run.pool_high_water = high_water(stats)
                run.carried = nicsim_carried(stats)
                run.extra["nicsim"] = stats
            finally:
                await proc.stop()
                if server is not None:
                    await server.stop()
                sock.unlink(missing_ok=True)


class NicsimCountOnlyBackend(NicsimBackend):
    """nicsim's guest TX into the count-only sink (lengths only, no frame byte read): the device's TX
    path alone, not comparable with a backend that copies frames, hence its own, labelled row."""

    name = "nicsim-count-only"
    read_tx = False

    def unsupported(self, cell: Cell) -> str | None:
        if cell.direction is not Direction.TX:
            return "the count-only sink is a guest TX row; other directions are nicsim's rows"
        return None


class NicsimMergeableBackend(NicsimBackend):
    """nicsim's guest RX with mergeable RX buffers offered (``--port generator,mergeable=on``): the
    receive mode DPDK's vhost and QEMU's tap put a Linux guest in, a labelled row beside nicsim's own
    rows (small buffers, which cost the guest less under TCG), so guest RX also compares in one mode."""

    name = "nicsim-mergeable"
    generator_options = "mergeable=on"

    def unsupported(self, cell: Cell) -> str | None:
        if cell.direction is not Direction.RX:
            return "the mergeable-buffer row is a guest RX row; other directions are nicsim's rows"
        return None


class NicsimNoLaneBackend(NicsimBackend):
    """nicsim with its request lane off (``--lane-idle-ms 0``): every request through the event
    loop's pumps, as before the lane. A labelled row, to compare the lane with within one run."""

    name = "nicsim-no-lane"

    def extra_serve_args(self, ctx: RunContext, n: int) -> list[str]:
        return ["--lane-idle-ms", "0"]


BUSY_POLL_US = 20_000  # longer than the latency rows' 10 ms between pings: the core never sleeps


class NicsimBusyPollBackend(NicsimBackend):
    """nicsim busy-polling its rings for ``BUSY_POLL_US`` after the last work (``--poll-us``), as DPDK's
    testpmd polls its core all the time: a labelled row, like for like with DPDK's latency, not
    nicsim's default (which sleeps on the kick and leaves the core free). Its CPU column is a core."""

    name = "nicsim-busy-poll"

    def extra_serve_args(self, ctx: RunContext, n: int) -> list[str]:
        # --poll-rounds bounds the empty rounds too; set it past anything BUSY_POLL_US allows.
        return ["--poll-us", str(BUSY_POLL_US), "--poll-rounds", str(10**9)]

