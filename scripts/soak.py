#!/usr/bin/env python3
"""Soak nicsim: a guest on ``nicsim serve`` with mixed traffic, link flaps and reboots, for a bounded time.

``nicsim serve`` (the responder port) runs as a subprocess with a stats file; a QEMU guest (TCG) on it
runs rounds of a ping to the responder (10.0.2.2, 10 per second) and a pktgen burst (60-byte UDP to
port 9, broadcast MAC, for a few seconds: the responder counts those frames as ``ignored``, so the
burst exercises the TX path at full rate without echo work), long enough that it never runs out before
the next reboot. Every ``--event-interval`` seconds the soak flaps the link (QMP ``set_link`` off,
``--flap-seconds``, on) or resets the guest (``system_reset``; it boots again and restarts its rounds),
alternately. Along the way it samples nicsim's open fd count (``/proc/PID/fd``), RSS (``VmRSS``) and
pool usage (stats file).

The verdict compares the end with the start: both are taken with no guest connected (before QEMU
starts, after it quits), where fd count and pool usage must be equal (pool usage 0). RSS is compared
with a warm sample (the first one after the first disruption, when every code path has run once, so
allocator caches and lazily imported modules are in) and may grow by at most ``--rss-slack-mib``.
Traffic must also have resumed after the last disruption. It prints a table, then one JSON line
(``"ok"`` and every number), and exits 0 when the verdict holds, 1 when it does not, 2 on a failure
to run at all.

Usage: ``python scripts/soak.py [--duration SECONDS] [--event-interval S] [--json-only]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qemu.testvm import TestVM, VhostUserNic, Workload, parse_results  # noqa: E402

BOOT_TIMEOUT = 120.0  # deadlines for failure on a loaded TCG host
WAIT = 60.0
PING_COUNT, PING_INTERVAL, PKTGEN_SECONDS = 50, 0.1, 3


@dataclass
class Sample:
    t: float
    event: str
    connected: bool
    connections: int
    fds: int
    rss_kib: int
    pool_usage: int
    pool_high: int
    icmp_echo: int
    tx_packets: int


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.sock = work / "nicsim.sock"
        self.stats_path = work / "stats.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.t0 = time.monotonic()
        self.samples: list[Sample] = []
        self.reboots = 0
        self.flaps = 0

    def say(self, text: str) -> None:
        if not self.args.json_only:
            print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    # -- nicsim ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any] | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            data: dict[str, Any] = json.loads(self.stats_path.read_text())
            return data
        return None

    async def wait_stats(self, predicate: Any, timeout: float = WAIT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                s = self.stats()
                if s is not None and predicate(s):
                    return s
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nicsim serve exited with {self.proc.returncode}")
                await asyncio.sleep(0.1)

    async def start_nicsim(self) -> None:
        argv = [sys.executable, "-m", "nicsim", "serve", "--socket", str(self.sock), "--stats-file",
                str(self.stats_path), "--stats-interval", "0.2", "--quiet"]  # fmt: skip
        self.proc = subprocess.Popen(argv, cwd=ROOT)
        await self.wait_stats(lambda s: True)

    def stop_nicsim(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def sample(self, event: str) -> Sample:
        assert self.proc is not None
        s = self.stats() or {}
        sock = (s.get("sockets") or [{}])[0]
        queues = s.get("queues") or []
        pool = s.get("pool", {})
        smp = Sample(
            t=round(time.monotonic() - self.t0, 1), event=event, connected=bool(sock.get("connected")),
            connections=int(sock.get("connections", 0)), fds=fd_count(self.proc.pid),
            rss_kib=rss_kib(self.proc.pid), pool_usage=int(pool.get("usage", 0)),
            pool_high=int(pool.get("high_water", 0)),
            icmp_echo=int(s.get("port", {}).get("icmp_echo", 0)),
            tx_packets=int(queues[1]["packets"]) if len(queues) > 1 else 0,
        )  # fmt: skip
        self.samples.append(smp)
        return smp

    # -- the guest -------------------------------------------------------------------------------

    def workloads(self) -> list[Workload]:
        # Enough rounds to outlast two event intervals: the guest must never finish (it would power off).
        per_round = PING_COUNT * PING_INTERVAL + PKTGEN_SECONDS + 1
        rounds = int(2 * self.args.event_interval / per_round) + 2
        out: list[Workload] = []
        for _ in range(rounds):
            out.append(Workload("ping", count=PING_COUNT, interval=PING_INTERVAL))
            out.append(Workload("pktgen-tx", duration=PKTGEN_SECONDS, size=60))
        return out

    async def run(self) -> dict[str, Any]:
        from images.build import build_image

        image = build_image()
        await self.start_nicsim()
        start = self.sample("start (idle)")
        self.say(f"nicsim pid {self.proc.pid if self.proc else '?'}: {start}")
        vm = TestVM(kernel=image.kernel, initrd=image.initrd, accel="tcg", name="soak",
                    nic=VhostUserNic(socket=self.sock, reconnect=1), workloads=self.workloads())  # fmt: skip
        warm: Sample | None = None
        resumed = False
        async with vm:
            await vm.wait_for("NICSIM-READY", BOOT_TIMEOUT)
            self.sample("guest up")
            deadline = self.t0 + self.args.duration
            next_event = time.monotonic() + self.args.event_interval
            next_sample = time.monotonic() + self.args.sample_interval
            kind = 0
            while time.monotonic() < deadline:
                now = time.monotonic()
                if now >= next_event:
                    if kind % 2 == 0:
                        await self.flap(vm)
                    else:
                        await self.reboot(vm)
                    kind += 1
                    next_event = time.monotonic() + self.args.event_interval
                    next_sample = time.monotonic() + self.args.sample_interval
                    if warm is None:
                        warm = self.sample("warm (after the first disruption)")
                elif now >= next_sample:
                    self.sample("periodic")
                    next_sample = now + self.args.sample_interval
                await asyncio.sleep(min(0.5, max(0.0, min(next_event, next_sample, deadline) - now)))
            # Traffic resumed after the last disruption: the responder answers more pings.
            before = self.sample("end of traffic").icmp_echo
            with contextlib.suppress(TimeoutError):
                await self.wait_stats(lambda s: s.get("port", {}).get("icmp_echo", 0) >= before + 5)
                resumed = True
            console = vm.console_text
            await vm.quit()
        await self.wait_stats(lambda s: not s["sockets"][0]["connected"])
        await asyncio.sleep(0.5)  # one more stats rewrite after the session closed
        end = self.sample("end (idle)")
        code = self.stop_nicsim()
        return self.verdict(start, warm, end, resumed, code, console)

    async def flap(self, vm: TestVM) -> None:
        await vm.set_link(False)
        self.sample("link off")
        await asyncio.sleep(self.args.flap_seconds)
        await vm.set_link(True)
        self.flaps += 1
        self.sample("link on")

    async def reboot(self, vm: TestVM) -> None:
        mark = len(vm.console_text)
        await vm.system_reset()
        await vm.wait_for("NICSIM-READY", BOOT_TIMEOUT, since=mark)
        self.reboots += 1
        self.sample("rebooted")

    def verdict(self, start: Sample, warm: Sample | None, end: Sample, resumed: bool, code: int | None,
                console: str) -> dict[str, Any]:  # fmt: skip
        problems: list[str] = []
        if end.fds != start.fds:
            problems.append(f"fd count {start.fds} at the start, {end.fds} at the end")
        if end.pool_usage != start.pool_usage or end.pool_usage != 0:
            problems.append(f"pool usage {start.pool_usage} at the start, {end.pool_usage} at the end")
        base = warm or start
        growth = end.rss_kib - base.rss_kib
        if growth > self.args.rss_slack_mib * 1024:
            problems.append(f"RSS grew by {growth} KiB since the warm sample (bound "
                            f"{self.args.rss_slack_mib} MiB)")  # fmt: skip
        if not resumed:
            problems.append("no ping answered after the last disruption")
        if code != 0:
            problems.append(f"nicsim serve exit code {code} (0 expected on SIGINT)")
        if self.reboots + self.flaps == 0:
            problems.append("the run was too short for any link flap or reboot")
        pings = [r for r in parse_results(console) if r.workload == "ping"]
        bursts = [r for r in parse_results(console) if r.workload == "pktgen-tx" and r.ok]
        return {
            "ok": not problems,
            "problems": problems,
            "duration_s": round(time.monotonic() - self.t0, 1),
            "flaps": self.flaps,
            "reboots": self.reboots,
            "start": asdict(start),
            "warm": asdict(warm) if warm else None,
            "end": asdict(end),
            "rss_growth_kib": growth,
            "rss_max_kib": max(s.rss_kib for s in self.samples),
            "fds_max": max(s.fds for s in self.samples),
            "pool_usage_max": max(s.pool_usage for s in self.samples),
            "icmp_echo_total": max(s.icmp_echo for s in self.samples),
            "guest_pings": {
                "runs": len(pings),
                "failed": sum(not r.ok for r in pings),
                "transmitted": sum(int(r.get("transmitted") or 0) for r in pings),
                "received": sum(int(r.get("received") or 0) for r in pings),
            },
            "guest_pktgen": {"bursts": len(bursts), "packets": sum(int(r["packets"]) for r in bursts)},
            "samples": len(self.samples),
        }

    def table(self) -> str:
        head = f"{'t(s)':>7} {'event':<34} {'conn':>4} {'fds':>4} {'rss KiB':>8} {'pool':>5} {'high':>5} " \
               f"{'echoes':>7} {'tx pkts':>9}"  # fmt: skip
        rows = [head]
        for s in self.samples:
            rows.append(f"{s.t:>7.1f} {s.event:<34} {('up' if s.connected else '-'):>4} {s.fds:>4} "
                        f"{s.rss_kib:>8} {s.pool_usage:>5} {s.pool_high:>5} {s.icmp_echo:>7} "
                        f"{s.tx_packets:>9}")  # fmt: skip
        return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=600.0, metavar="SECONDS",
                    help="traffic time (default 600); boot and teardown come on top")  # fmt: skip
    ap.add_argument("--event-interval", type=float, default=15.0, metavar="S",
                    help="seconds between disruptions, alternately a link flap and a reboot "
                    "(default 15: each kind every ~30 s)")  # fmt: skip
    ap.add_argument("--flap-seconds", type=float, default=2.0, metavar="S", help="link down time (default 2)")
    ap.add_argument("--sample-interval", type=float, default=5.0, metavar="S", help="default 5")
    ap.add_argument("--rss-slack-mib", type=float, default=8.0, metavar="MIB",
                    help="allowed RSS growth since the warm sample (default 8)")  # fmt: skip
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.event_interval <= 0 or args.sample_interval <= 0:
        ap.error("--duration, --event-interval and --sample-interval must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nicsim-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            result = asyncio.run(soak.run())
        except Exception as err:  # a failure to run is reported (exit 2), not a verdict
            soak.stop_nicsim()
            print(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}), flush=True)
            return 2
        finally:
            if soak.proc is not None and soak.proc.poll() is None:
                soak.proc.kill()
                soak.proc.wait()
    if not args.json_only:
        print(soak.table())
        for p in result["problems"]:
            print(f"PROBLEM: {p}")
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
