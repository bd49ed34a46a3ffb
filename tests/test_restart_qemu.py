"""A real guest across backend restarts, guest reboots and link flaps, with every ping accounted for.

QEMU connects with ``reconnect=1`` (QEMU is the socket's client, ``nicsim serve`` listens). The guest
pings the responder continuously (``seqs=1``: it reports every reply's sequence number in arrival
order), and the test checks that ``transmitted = received + lost``, that the lost requests form one
window at the disruption, that the replies after it are exactly the ones the new (or the same) nicsim
counted, and that the link and the ping work again afterwards, without a guest reboot.

What QEMU 7.2 sends a net backend after a backend restart (logged by these tests from the stats file's
``requests``): the whole handshake again (GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_OWNER, GET_FEATURES, SET_VRING_CALL/ERR, SET_VRING_ENABLE) and,
since the guest driver is still running, at once SET_FEATURES, GET/SET_STATUS, ADD_MEM_REG and per
ring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL. It sends no
GET_INFLIGHT_FD / SET_INFLIGHT_FD for a net device (QEMU asks for the inflight buffer only for
vhost-user-blk and -scsi), so nicsim's inflight tracking is not what saves the chains here. What does:
when the backend dies, QEMU's GET_VRING_BASE fails and QEMU (``vhost_virtqueue_stop``) resets each
ring's last avail index to the used index in guest memory; SET_VRING_BASE then hands the new backend
that index, and nicsim starts each ring at the used index it reads from guest memory. So every chain
the dead backend had taken and not returned, and every chain the guest posted meanwhile, is processed
again from the avail ring: no buffer is lost to the guest. A frame can still be lost (a reply the dead
backend had made but not yet written into the RX ring) or, for a TX chain sent but not yet marked
used, sent twice; the guest's ping counts both, and the tests account for them. (In the runs here
nothing was lost at all across a restart: the requests of the restart window wait in the TX ring and
are answered late by the new backend.)

On ``system_reset`` and on ``set_link off`` QEMU 7.2 stops the rings the same way (SET_STATUS,
GET_VRING_BASE per ring, SET_VRING_ENABLE), and on ``set_link on`` or when the rebooted
driver starts it sends SET_FEATURES, GET/SET_STATUS and per ring SET_VRING_NUM, SET_VRING_BASE,
SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL on the same connection (no new handshake).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qemu.testvm import TestVM, VhostUserNic, Workload

pytestmark = pytest.mark.vm

log = logging.getLogger("tests.restart_qemu")

BOOT_TIMEOUT = 120.0  # deadlines for failure on a loaded TCG host, not performance claims
WAIT = 60.0
PINGS, INTERVAL = 120, 0.1


@dataclass
class Nicsim:
    """One ``nicsim serve`` process with its own stats file (a restart is a second instance)."""

    proc: subprocess.Popen[bytes]
    stats_path: Path

    def stats(self) -> dict[str, Any] | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            data: dict[str, Any] = json.loads(self.stats_path.read_text())
            return data
        return None

    async def wait_stats(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while True:
                s = self.stats()
                if s is not None and predicate(s):
                    return s
                assert self.proc.poll() is None, f"nicsim serve exited with {self.proc.returncode}"
                await asyncio.sleep(0.05)

    def stop(self, sig: signal.Signals) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Lab:
    """Starts ``nicsim serve`` instances on one socket path and ends each one it started, by pid."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.sock = tmp_path / "nicsim.sock"
        self.started: list[Nicsim] = []

    async def serve(self) -> Nicsim:
        stats = self.tmp_path / f"stats-{len(self.started)}.json"
        argv = [sys.executable, "-m", "nicsim", "serve", "--socket", str(self.sock), "--stats-file",
                str(stats), "--stats-interval", "0.1", "--quiet"]  # fmt: skip
        n = Nicsim(subprocess.Popen(argv), stats)
        self.started.append(n)
        await n.wait_stats(lambda s: True)  # the first stats file is written after it listens
        return n

    def close(self) -> None:
        for n in self.started:
            n.stop(signal.SIGKILL)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def guest(guest_image: Any, lab: Lab) -> TestVM:
    return TestVM(
        kernel=guest_image.kernel, initrd=guest_image.initrd, accel="tcg",
        nic=VhostUserNic(socket=lab.sock, reconnect=1),
        workloads=[Workload("ping", count=PINGS, interval=INTERVAL, seqs=1), Workload("link")],
    )  # fmt: skip


def echoes(s: dict[str, Any]) -> int:
    """ICMP echo requests the responder answered (0 before the first frontend connects)."""
    return int(s.get("port", {}).get("icmp_echo", 0))


@dataclass(frozen=True)
class PingAccount:
    """The guest's ping, split at the disruption: ``before`` and ``after`` are reply sequence numbers in
    arrival order; ``lost`` the requests never answered (sorted); ``dups`` replies that came twice."""

    before: list[int]
    after: list[int]
    lost: list[int]
    dups: int


def account(ping: Any, *, replies_after: int, one_window: bool = True) -> PingAccount:
    """Check the guest's ping report and split it: the last ``replies_after`` arrivals came after the
    disruption (the new backend's replies, or the ones after the link came back). ``one_window``: the
    lost requests are consecutive (else they only all come after the last reply before it)."""
    log.info("guest ping: %s; replies after the disruption by nicsim's count: %d", dict(ping.data),
             replies_after)  # fmt: skip
    assert ping.ok, ping
    seqs: list[int] = list(ping["seqs"])
    transmitted = int(ping["transmitted"])
    received = len(set(seqs))
    dups = len(seqs) - received
    assert (ping["received"], ping["duplicates"]) == (received, dups), ping
    assert all(0 <= s < transmitted for s in seqs)
    lost = sorted(set(range(transmitted)) - set(seqs))
    assert transmitted == received + len(lost)
    assert 0 < replies_after <= len(seqs), (replies_after, len(seqs))
    before, after = seqs[: len(seqs) - replies_after], seqs[len(seqs) - replies_after :]
    # Before the disruption every request was answered once, in order.
    assert before == list(range(len(before))), before
    # Every lost request comes after those (and falls in one window)...
    if lost:
        assert lost[0] >= len(before), lost
        assert not one_window or lost == list(range(lost[0], lost[0] + len(lost))), lost
    # ...and every other later request was answered (a reply twice only for a request the disruption
    # caught in flight, answered on both sides of it).
    assert set(after) - set(before) == set(range(len(before), transmitted)) - set(lost)
    assert len(after) - len(set(after) - set(before)) == dups
    return PingAccount(before=before, after=after, lost=lost, dups=dups)


def log_requests(what: str, s: dict[str, Any]) -> list[str]:
    requests: list[str] = s["sockets"][0]["requests"]
    log.info("%s: vhost-user requests: %s", what, " ".join(requests))
    print(f"{what}: vhost-user requests: {' '.join(requests)}")
    return requests


async def _restart(guest_image: Any, lab: Lab, sig: signal.Signals) -> None:
    first = await lab.serve()
    async with guest(guest_image, lab) as vm:
        await first.wait_stats(lambda s: echoes(s) >= 20)
        seen = first.stats()
        assert seen is not None
        assert first.stop(sig) == (-signal.SIGKILL if sig is signal.SIGKILL else 0)
        # What the first backend's file says last: exact after SIGTERM (written at exit), a lower
        # bound after SIGKILL (written every 0.1 s).
        last_a = first.stats()
        assert last_a is not None
        second = await lab.serve()
        results = await vm.results(BOOT_TIMEOUT)
        await vm.wait_exit(WAIT)  # the guest powers off after its workloads
    final_b = await second.wait_stats(lambda s: not s["sockets"][0]["connected"])
    assert second.stop(signal.SIGINT) == 0
    final_b = second.stats() or final_b

    ping, link = results
    b = echoes(final_b)
    acc = account(ping, replies_after=b)
    a = echoes(last_a)
    if sig is signal.SIGKILL:
        # The killed backend answered at least what its last file says, and every reply of its that
        # the guest did not get is in the lost window.
        assert echoes(seen) <= a <= len(acc.before) + len(acc.lost)
    else:
        assert len(acc.before) <= a <= len(acc.before) + len(acc.lost)
        assert last_a["pool"]["usage"] == 0  # a clean stop returned every guest buffer
    log.info("%s restart: %d transmitted, %d before, %d lost %s, %d after, %d dups; A=%d B=%d",
             sig.name, ping["transmitted"], len(acc.before), len(acc.lost), acc.lost, len(acc.after),
             acc.dups, a, b)  # fmt: skip
    assert link.ok and link["carrier"] is True and link["operstate"] == "up", link
    assert final_b["pool"]["usage"] == 0
    assert final_b["sockets"][0]["connections"] == 1  # one QEMU connection per backend instance
    requests = log_requests(f"after {sig.name}, QEMU 7.2 to the restarted backend", final_b)
    assert requests[0] == "GET_FEATURES"
    assert requests.count("SET_VRING_BASE") >= 2 and requests.count("SET_VRING_KICK") >= 2
    log_requests("the first backend", last_a)


async def test_sigkill_mid_ping_restart_resumes_without_a_guest_reboot(guest_image: Any, lab: Lab) -> None:
    await _restart(guest_image, lab, signal.SIGKILL)


async def test_sigterm_mid_ping_restart_resumes_without_a_guest_reboot(guest_image: Any, lab: Lab) -> None:
    await _restart(guest_image, lab, signal.SIGTERM)


def _rings_stopped_since_start(s: dict[str, Any]) -> bool:
    """QEMU stopped the rings (GET_VRING_BASE) and has not started them again (SET_VRING_KICK)."""
    req: list[str] = s["sockets"][0]["requests"]
    if "GET_VRING_BASE" not in req:
        return False
    last_stop = len(req) - 1 - req[::-1].index("GET_VRING_BASE")
    return "SET_VRING_KICK" not in req[last_stop:]


async def test_guest_reboot_returns_every_buffer_and_traffic_resumes(guest_image: Any, lab: Lab) -> None:
    nic = await lab.serve()
    async with guest(guest_image, lab) as vm:
        await nic.wait_stats(lambda s: echoes(s) >= 10)
        mark = len(vm.console_text)
        await vm.system_reset()
        # While the rebooting guest has no driver, nicsim holds no guest buffer at all.
        stopped = await nic.wait_stats(_rings_stopped_since_start)
        assert stopped["pool"]["usage"] == 0
        assert [q["inflight"] for q in stopped["queues"]] == [0, 0]
        log_requests("QEMU 7.2 on system_reset", stopped)
        # The guest boots again and reruns its workloads: the second ping is all new traffic.
        ping, link = await vm.results(BOOT_TIMEOUT, since=mark)
        await vm.wait_exit(WAIT)
    final = await nic.wait_stats(lambda s: not s["sockets"][0]["connected"])
    assert nic.stop(signal.SIGINT) == 0
    final = nic.stats() or final
    acc = account(ping, replies_after=echoes(final) - echoes(stopped))
    assert acc.before == [] and acc.lost == [] and acc.dups == 0  # a quiet reboot loses nothing
    assert link.ok and link["carrier"] is True, link
    assert final["sockets"][0]["connections"] == 1  # the same connection across the reboot
    assert final["pool"]["usage"] == 0


async def test_link_off_stops_traffic_and_link_on_resumes_it(guest_image: Any, lab: Lab) -> None:
    """QEMU 7.2 answers ``set_link off`` on a vhost-user NIC by stopping the backend's rings
    (GET_VRING_BASE) and telling the guest the carrier is off; ``on`` starts the rings again. The
    Linux guest stops its TX queues meanwhile and sends what it queued once the link is back, so the
    requests of the off period are answered late, in a burst (busybox ping's small socket buffer,
    about 14 KiB, may drop some of those replies: the guest's ICMP counters show they arrived) — or,
    seen in other runs, the guest drops them with its queues when the carrier-off takes effect. Both
    are losses the guest counts; the backend loses nothing and answers nothing while the link is off."""
    nic = await lab.serve()
    async with guest(guest_image, lab) as vm:
        await nic.wait_stats(lambda s: echoes(s) >= 20)
        await vm.set_link(False)
        off = await nic.wait_stats(_rings_stopped_since_start)
        await asyncio.sleep(2.0)  # pacing: ~20 ping intervals with the link down
        at_on = await nic.wait_stats(lambda s: True)
        await vm.set_link(True)
        ping, link = await vm.results(BOOT_TIMEOUT)
        await vm.wait_exit(WAIT)
    final = await nic.wait_stats(lambda s: not s["sockets"][0]["connected"])
    assert nic.stop(signal.SIGINT) == 0
    final = nic.stats() or final
    total = echoes(final)
    log.info("link flap: nicsim answered %d when the rings stopped, %d at link on, %d in all", echoes(off),
             echoes(at_on), total)  # fmt: skip
    log_requests("QEMU 7.2 on set_link off, on and quit", final)
    # Nothing flowed while the link was off: the rings stayed stopped and nicsim answered nothing.
    assert _rings_stopped_since_start(at_on) and echoes(at_on) == echoes(off)
    # Not one window: a request can be dropped as the carrier goes off while later ones are held.
    acc = account(ping, replies_after=total - echoes(at_on), one_window=False)
    # Every reply nicsim made reached the guest's stack; what ping missed, its socket dropped.
    assert ping["icmp_in_echo_reps"] == total and ping["rx_dropped"] == 0
    # A lost request either never left the guest (dropped with its queues while the carrier was off)
    # or was answered and its reply dropped by ping's socket; nothing was lost in between.
    lost_out = ping["transmitted"] + acc.dups - total
    lost_in = ping["icmp_in_echo_reps"] - len(ping["seqs"])
    assert lost_out >= 0 and lost_in >= 0 and lost_out + lost_in == len(acc.lost), (lost_out, lost_in)
    log.info("link flap: ping lost %d %s: %d never sent by the guest, %d replies dropped by its "
             "socket; %d answered after link on", len(acc.lost), acc.lost, lost_out, lost_in,
             len(acc.after))  # fmt: skip
    assert max(acc.after) == ping["transmitted"] - 1  # traffic resumed to the last request
    assert link.ok and link["carrier"] is True, link
    assert final["pool"]["usage"] == 0 and final["sockets"][0]["connections"] == 1
