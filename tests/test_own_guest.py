"""The user's own guest: Debian's generic kernel (``linux-image-amd64``, not the cloud kernel) with an
initrd the image builder made for it from that kernel's own modules, booted through ``TestVM``'s
kernel/initrd/disk/command-line options on nicsim's vhost-user backend (``nicsim serve``, whose
default port is the responder), pinging with no loss; ``nicsim vm --kernel-package`` booting it with
a raw disk; and a qcow2 disk (made with ``qemu-img``) on the default guest.

Guest traffic stays between the guest and the backend: no network is touched. The disk image is a
file under ``tmp_path``; the guest writes to it, and the test checks the file is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qemu.testvm import TestVM, VhostUserNic, Workload
from tests.serve_process import nicsim_serve, read_stats

pytestmark = pytest.mark.vm

GENERIC_KERNEL = "linux-image-amd64"
BOOT_TIMEOUT = 180.0  # the generic kernel probes more drivers than the cloud one; a failure guard only
ROOT = Path(__file__).resolve().parent.parent
DISK_MAGIC = b"nicsim-disk-0123"  # 16 bytes: the disk workload reports the first 16 in hex


@pytest.fixture(scope="session")
def generic_image() -> Any:
    """The guest image built for Debian's generic kernel (cached on disk like the default one)."""
    from images.build import build_image

    return build_image(kernel_package=GENERIC_KERNEL)


def make_disk(path: Path) -> str:
    # A whole number of 512-byte sectors: QEMU rounds a raw image's size up to one.
    path.write_bytes(DISK_MAGIC + bytes((1 << 20) - len(DISK_MAGIC)))
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_debians_generic_kernel_boots_with_its_own_initrd_and_pings_nicsim(
    generic_image: Any, tmp_path: Path
) -> None:
    manifest = generic_image.manifest
    assert manifest["kernel_package"] == GENERIC_KERNEL
    assert not manifest["kernel_version"].endswith("-cloud-amd64"), manifest["kernel_version"]
    assert {"virtio_net", "virtio_pci", "virtio_blk"} <= set(manifest["modules"])

    disk = tmp_path / "disk.img"
    before = make_disk(disk)
    async with nicsim_serve(tmp_path) as (proc, sock, stats_path):
        async with TestVM(
            kernel=generic_image.kernel,
            initrd=generic_image.initrd,
            disk=disk,
            extra_append="nicsim_test.marker=own-guest",
            nic=VhostUserNic(socket=sock),
            accel="tcg",
            workloads=[
                Workload("ping", target="10.0.2.2", count=5, interval=0.2),
                Workload("disk", write="written-by-guest"),
            ],
        ) as vm:
            ping, written = await vm.results(BOOT_TIMEOUT)
            argv = vm.argv
        assert ping.ok, ping
        assert ping["transmitted"] == 5 and ping["received"] == 5 and ping["loss_pct"] == 0
        stats = await read_stats(stats_path, lambda s: not s["sockets"][0]["connected"])
        assert stats["port"]["icmp_echo"] == 5
        assert stats["pool"]["usage"] == 0

    # The kernel booted is the generic one, with the caller's words on its command line.
    assert argv[argv.index("-kernel") + 1] == str(generic_image.kernel)
    append = argv[argv.index("-append") + 1]
    assert append.endswith(" nicsim_test.marker=own-guest") and "nicsim.run=ping," in append
    # The guest saw the disk and wrote to it; the file on the host is as it was (snapshot=on).
    assert written.ok, written
    assert written["bytes"] == disk.stat().st_size
    assert bytes.fromhex(written["head"]).startswith(b"written-by-guest")
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    assert proc.returncode == 0


def test_nicsim_vm_boots_the_generic_kernel_package_with_a_disk_it_may_write_but_not_change(
    generic_image: Any, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    before = make_disk(disk)
    done = subprocess.run(
        [sys.executable, "-m", "nicsim", "vm", "--kernel-package", GENERIC_KERNEL, "--nic", "none",
         "--accel", "tcg", "--disk", str(disk), "--append", "nicsim_test.marker=1",
         "--workload", "disk,write=nicsim-vm-wrote"],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = (json.loads(line) for line in done.stdout.splitlines() if line.strip())
    assert result["ok"] and result["dev"] == "vda" and result["bytes"] == disk.stat().st_size, result
    assert bytes.fromhex(result["head"]).startswith(b"nicsim-vm-wrote")
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    # Building for another kernel package is seconds of work, so its progress is always shown.
    assert f"({GENERIC_KERNEL})" in done.stderr or f"for {GENERIC_KERNEL}" in done.stderr


async def test_a_qcow2_disk_on_the_default_guest_takes_the_guests_writes_but_keeps_its_file(
    guest_image: Any, tmp_path: Path
) -> None:
    raw, disk = tmp_path / "disk.img", tmp_path / "disk.qcow2"
    make_disk(raw)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True)
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    async with TestVM(
        kernel=guest_image.kernel, initrd=guest_image.initrd, disk=disk, accel="tcg",
        workloads=[Workload("disk"), Workload("disk", write="qcow2-overlay")],
    ) as vm:  # fmt: skip
        first, second = await vm.results(BOOT_TIMEOUT)
        argv = vm.argv
    assert any(a.endswith(",format=qcow2,snapshot=on") for a in argv), argv  # read from the magic
    assert first.ok and bytes.fromhex(first["head"]) == DISK_MAGIC, first
    assert first["bytes"] == raw.stat().st_size
    assert second.ok and bytes.fromhex(second["head"]).startswith(b"qcow2-overlay"), second
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
