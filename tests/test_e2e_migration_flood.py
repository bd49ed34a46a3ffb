"""End to end: a guest live-migrated while nicsim floods it with numbered UDP frames; the proof that
the dirty log is complete is that the destination guest counted no corrupt frame.

``nicsim serve --port generator,seq=on`` serves two sockets: the source QEMU runs the guest on one,
the destination waits (``-incoming unix:...``) on the other. The generator writes frames of
``SIZE`` bytes, each with its own 64-bit number and a UDP checksum valid for it, into the guest's
RX buffers all through the migration. The guest verifies every UDP checksum (nicsim offers no
GUEST_CSUM) and counts bad ones in ``Udp: InCsumErrors``; its rx-count workload reports the delta
over a window that spans the migration, and prints it on the destination.

Why this finds a page nicsim wrote and did not log: QEMU copies guest RAM while the guest runs and
once more, with the vCPUs stopped, for every page dirtied since; nicsim's writes are invisible to
QEMU except through the dirty log. A frame whose buffer straddles a page boundary (frames of 1400
bytes in the guest's ~1.5 KB buffers, carved out of larger page fragments: many do) and whose pages
were copied at different times reaches the destination half new, half stale: its checksum fails.
A buffer wholly stale holds an older frame with a valid checksum, and a stale used ring hands the
destination's driver entries it never posted; those show as missing or repeated frames, or as an
RX queue that stops, which the frame count catches. The migration's bandwidth is limited so that it
runs several dirty-page iterations (seconds) while the frames stream in.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, cast

import pytest

from qemu.testvm import TestVM, VhostUserNic, Workload
from tests.serve_process import nicsim_serve, read_stats
from tests.test_e2e_migration import migration_status

pytestmark = pytest.mark.vm

SIZE = int(os.environ.get("NICSIM_FLOOD_SIZE", "1400"))          # bytes per frame, no FCS
RATE = float(os.environ.get("NICSIM_FLOOD_RATE", "4000"))        # frames/s offered
BANDWIDTH = int(os.environ.get("NICSIM_FLOOD_BANDWIDTH", str(16 << 20)))  # migration bytes/s
WINDOW = 20  # seconds the guest counts; the migration falls inside it


async def test_a_guest_flooded_with_numbered_frames_through_a_migration_sees_no_corrupt_frame(
    guest_image: Any, tmp_path: Path
) -> None:
    mig = tmp_path / "migrate.sock"
    workloads = (Workload("rx-count", duration=WINDOW),)
    port = f"generator,seq=on,size={SIZE},rate={RATE:g}"
    serving = nicsim_serve(tmp_path, "--port", port, more_sockets=["dst.sock"])
    async with serving as (proc, sock, stats):

        def vm(name: str, socket: Path, *extra: str) -> TestVM:
            return TestVM(kernel=guest_image.kernel, initrd=guest_image.initrd, accel="tcg",
                          workloads=workloads, nic=VhostUserNic(socket=socket), name=name,
                          log_dir=tmp_path / name, extra_args=extra)  # fmt: skip

        src, dst = vm("src", sock), vm("dst", tmp_path / "dst.sock", "-incoming", f"unix:{mig}")
        async with src, dst:
            await src.wait_for("rx-count: counting", 120)
            await asyncio.sleep(2.0)  # the flood is on
            await src.qmp("migrate-set-parameters", {"max-bandwidth": BANDWIDTH})
            await src.qmp("migrate", {"uri": f"unix:{mig}"})
            info = await migration_status(src)
            assert info["status"] == "completed", info
            state = cast(dict[str, Any], await src.qmp("query-status"))
            assert state["status"] == "postmigrate", state  # the source handed over and stopped
            # The source's session gave every buffer back once QEMU stopped its rings.
            await read_stats(stats, lambda s: s["sockets"][0]["pool"]["usage"] == 0)
            (counted,) = await dst.wait_results(1, WINDOW + 120)  # the window ends on the destination
            after = await read_stats(stats, lambda s: True)
        assert counted.ok, counted
        sent = [e.get("port", {}).get("sent", 0) for e in after["sockets"]]
        print(f"migration: {info.get('total-time')} ms, downtime {info.get('downtime')} ms, "
              f"{info.get('ram', {}).get('dirty-sync-count')} dirty syncs; generator sent {sent}; "
              f"guest: {dict(counted.data)}")  # fmt: skip
        assert counted["udp_in_csum_errors"] == 0 and counted["ip_in_hdr_errors"] == 0, counted
        assert sent[1] > 0, after  # the destination's session streamed frames into the guest
        # Every frame the window saw reached UDP whole (a port with no socket: NoPorts), none lost
        # in the guest's stack; nicsim drops none either (an offered rate within what it posts).
        assert counted["udp_no_ports"] + counted["udp_in_datagrams"] >= counted["packets"] - 10, counted
        done = await read_stats(stats, lambda s: not any(e["connected"] for e in s["sockets"]))
        assert proc.poll() is None
        assert [e["pool"]["usage"] for e in done["sockets"]] == [0, 0]
