"""One real guest on ``nicsim serve --port switch --uplink ...`` and a host behind the uplink, pinging each
other: the shared body of the end-to-end uplink tests (``test_e2e_switch_uplink``: VXLAN,
``test_e2e_switch_tap_uplink``: TAP).

The guest (QEMU, TCG) pings the peer five times, then sleeps while the peer's namespace pings it back
five times (busybox ping); then the guest quits and the test waits until the stats file says its
socket is idle again. :meth:`UplinkPings.assert_both_ways` checks what every such test needs: no
ping lost either way, the guest's pool back to 0, serve stopped cleanly; each test adds its own.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.testvm import Netns, TestVM, VhostUserNic, Workload, WorkloadResult, parse_result_line
from tests.serve_process import nicsim_serve, read_stats

BOOT_TIMEOUT = 120.0  # a deadline for failure on a loaded TCG host, not a performance claim
COUNT = 5


@dataclass(frozen=True)
class UplinkPings:
    there: WorkloadResult  # the guest's ping of the peer
    back_rc: int           # busybox ping's exit status, from the peer's namespace
    back: str              # and its output
    stats: dict[str, Any]  # the stats file once the guest left
    returncode: int | None  # nicsim serve's exit status

    @property
    def uplink(self) -> dict[str, Any]:
        """The switch's row for port ``uplink0``."""
        row: dict[str, Any] = self.stats["switch"]["ports"]["uplink0"]
        return row

    def assert_both_ways(self) -> None:
        assert self.returncode == 0, "nicsim serve shuts down cleanly"
        ping = self.there
        assert ping.ok, ping
        assert (ping["transmitted"], ping["received"], ping["loss_pct"]) == (COUNT, COUNT, 0), ping
        assert self.back_rc == 0, self.back
        assert re.search(rf"{COUNT} packets transmitted, {COUNT} (packets )?received, 0% packet loss",
                         self.back), self.back  # fmt: skip
        assert self.stats["sockets"][0]["pool"]["usage"] == 0, "the guest's buffers all came back"


async def ping_both_ways(
    guest_image: Any, tmp_path: Path, uplink: str, *, guest_ip: str, peer_ip: str, peer: Netns,
    mtu: int = 1500, serve_args: tuple[str, ...] = (),
) -> UplinkPings:  # fmt: skip
    """The guest at ``guest_ip`` (a CIDR) on a switch whose ``--uplink`` is ``uplink`` pings ``peer_ip``;
    then ``peer`` (the namespace holding ``peer_ip``) pings the guest. ``serve_args``: more options."""
    workloads = [Workload("ping", target=peer_ip, count=COUNT, interval=0.2), Workload("sleep", seconds=40)]
    guest_addr = guest_ip.split("/")[0]
    async with nicsim_serve(tmp_path, "--port", "switch", "--uplink", uplink, *serve_args) as (
        proc, sock, stats_path,
    ):  # fmt: skip
        async with TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, nic=VhostUserNic(socket=sock),
                          accel="tcg", guest_ip=guest_ip, mtu=mtu, workloads=workloads) as vm:  # fmt: skip
            line = await vm.wait_for(r'(?m)^NICSIM-RESULT \{"workload": "ping".*\}\r?$', BOOT_TIMEOUT)
            there = parse_result_line(line.group(0))
            # The guest sleeps now: the other way round, from the peer's namespace.
            back = await asyncio.create_subprocess_exec(
                *peer.exec_argv(["busybox", "ping", "-c", str(COUNT), "-i", "0.2", "-W", "5", guest_addr]),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(back.communicate(), 60)
        stats = await read_stats(
            stats_path, lambda s: not s["sockets"][0]["connected"] and s["sockets"][0]["connections"] == 1
        )
    return UplinkPings(there, back.returncode if back.returncode is not None else -1, out.decode(), stats,
                       proc.returncode)  # fmt: skip
