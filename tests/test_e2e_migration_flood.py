"""End to end: a guest live-migrated while nicsim streams numbered UDP frames into it; the proof that
the dirty log is complete is that the destination guest reads every frame whole.

``nicsim serve --port generator,seq=on`` serves two sockets: the source QEMU runs the guest on one,
the destination waits (``-incoming unix:...``) on the other. Every frame is ``SIZE`` bytes with its own
64-bit number and a UDP checksum valid for it. The guest's rx-count workload takes eth0 down first
(``stall``): its RX buffers stay posted, nicsim keeps filling them while the migration's first pass
(bandwidth-limited to seconds) copies guest RAM, and the guest reads none of them until eth0 is up
again on the destination. Without the dirty log those frames are read from pages the destination got
before nicsim wrote them. The guest verifies every UDP checksum (nicsim offers no GUEST_CSUM).

What a missed page looked like here (logging turned off in ``QueueSet.logging``: every run failed, 5
with mergeable buffers, 3 with small ones): never a checksum error, since a stale buffer held a whole
older frame or zeros rather than half of each; with mergeable buffers a stale virtio-net header's
``num_buffers`` made the driver merge ~500 buffers into longer "frames" (rx bytes != packets * SIZE,
a drop); with small buffers ~250 frames were dropped by the driver. An earlier form of this test, a
guest reading steadily (no stall) at 1,000 to 140,000 frames/s, passed with logging off in 12 runs of
12: few frames are in flight at the switch-over, and (a reading, not verified) their buffers' pages
were written by the guest itself within the last iteration, so QEMU copied them again anyway.
So the test asserts all of it: no checksum or IP header error, every frame SIZE bytes, no drop, every
frame eth0 counted parsed by UDP, and the frames the source held read on the destination. What it
does not check: the numbers themselves (the guest kernel does not read them; a whole stale frame
with a valid checksum would pass); the guest's announcement after a migration is checked in
``tests/test_e2e_migration.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from qemu.testvm import TestVM, VhostUserNic, Workload
from tests.serve_process import nicsim_serve, read_stats
from tests.test_e2e_migration import migration_status

pytestmark = pytest.mark.vm

SIZE = 1400              # bytes per frame, no FCS: most RX buffers then span two pages
RATE = 150.0             # frames/s: the stalled guest's ring fills over the migration's first pass
QUEUE = 1024             # RX buffers the guest posts (rx_queue_size)
BANDWIDTH = 16 << 20     # migration bytes/s: the first pass takes seconds
STALL = 15               # seconds eth0 is down: longer than the migration
WINDOW = 4               # seconds the destination guest counts on after eth0 is up again


@pytest.mark.parametrize("mergeable", [True, False], ids=["mrg_rxbuf", "small_buffers"])
async def test_frames_held_in_a_stalled_guest_through_a_migration_are_read_whole_on_the_destination(
    guest_image: Any, tmp_path: Path, mergeable: bool
) -> None:
    mig = tmp_path / "migrate.sock"
    workloads = (Workload("rx-count", duration=WINDOW, stall=STALL),)
    # The generator's small frames fit small buffers, so it offers mergeable ones only when asked.
    port = f"generator,seq=on,size={SIZE},rate={RATE:g}" + (",mergeable=on" if mergeable else "")
    serving = nicsim_serve(tmp_path, "--port", port, more_sockets=["dst.sock"])
    async with serving as (proc, sock, stats):

        def vm(name: str, socket: Path, *extra: str) -> TestVM:
            return TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, accel="tcg",
                          workloads=workloads, nic=VhostUserNic(socket=socket, rx_queue_size=QUEUE,
                                                 mrg_rxbuf=mergeable),
                          name=name, log_dir=tmp_path / name, extra_args=extra)  # fmt: skip

        src, dst = vm("src", sock), vm("dst", tmp_path / "dst.sock", "-incoming", f"unix:{mig}")
        async with src, dst:
            await src.wait_for("rx-count: stalled", 120)  # eth0 is down, its buffers stay posted
            before = (await read_stats(stats, lambda s: True))["sockets"][0]["port"]["sent"]
            await src.qmp("migrate-set-parameters", {"max-bandwidth": BANDWIDTH})
            await src.qmp("migrate", {"uri": f"unix:{mig}"})
            info = await migration_status(src)
            assert info["status"] == "completed", info
            state = cast(dict[str, Any], await src.qmp("query-status"))
            assert state["status"] == "postmigrate", state  # the source handed over and stopped
            # The source's session gave every buffer back once QEMU stopped its rings.
            await read_stats(stats, lambda s: s["sockets"][0]["pool"]["usage"] == 0)
            held = (await read_stats(stats, lambda s: True))["sockets"][0]["port"]["sent"]
            await dst.wait_for("rx-count: receiving", STALL + 60)  # eth0 came up on the destination
            (counted,) = await dst.wait_results(1, WINDOW + 60)
            after = await read_stats(stats, lambda s: True)
        assert counted.ok, counted
        sent = [e["port"]["sent"] for e in after["sockets"]]
        parsed = counted["udp_no_ports"] + counted["udp_in_datagrams"] + counted["udp_in_csum_errors"]
        print(f"migration: {info.get('total-time')} ms, downtime {info.get('downtime')} ms, "
              f"{info.get('ram', {}).get('dirty-sync-count')} dirty syncs; generator sent {sent} "
              f"({held} by the source, {held - before} into the stalled guest); guest: {dict(counted.data)}; "
              f"not parsed {counted['stack_rx_packets'] - parsed}")  # fmt: skip
        assert counted["udp_in_csum_errors"] == 0 and counted["ip_in_hdr_errors"] == 0, counted
        # Every frame is SIZE bytes: a stale virtio-net header (num_buffers) makes the driver merge
        # buffers into one longer "frame", or drop it. (The counters are read one after the other
        # while frames arrive: a frame or two of slack.)
        assert abs(counted["stack_rx_bytes"] - SIZE * counted["stack_rx_packets"]) <= 2 * SIZE, counted
        assert counted["stack_rx_dropped"] == 0 and counted["dropped"] == 0, counted
        # Every frame eth0 counted reached UDP whole (a port with no socket: NoPorts): a frame read
        # from a page of zeros would not.
        assert abs(counted["stack_rx_packets"] - parsed) <= 10, counted
        # The source filled most of the stalled guest's buffers, and the destination read them all
        # (the stats file is 0.2 s old at most: a few frames of slack).
        assert held - before >= QUEUE // 2, (before, held)
        assert counted["stack_rx_packets"] >= held - before - RATE * 0.3, (before, held, counted)
        assert sent[1] > 0, after  # the destination's session streamed frames into the guest
        done = await read_stats(stats, lambda s: not any(e["connected"] for e in s["sockets"]))
        assert proc.poll() is None
        assert [e["pool"]["usage"] for e in done["sockets"]] == [0, 0]
