"""The guest image: content addressing, the manifest, atomic builds, and real boots under QEMU (TCG).

The boots use QEMU directly (not ``qemu.testvm``), with the guest's NIC on a TAP device inside a
network namespace each test creates and deletes, so no traffic leaves that namespace.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from images import apt, build, cpio, kmod
from images.apt import ImageBuildError, Package
from images.build import GuestImage, build_image, builder_inputs, image_key
from qemu.testvm import parse_result_line

GUEST_IP, PEER_IP = "10.0.2.15", "10.0.2.2"
BOOT_GUARD_S = 90  # kills a wedged QEMU so the suite cannot hang; not an assertion on speed


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image(progress=_quiet)


@pytest.fixture
def scratch_cache(tmp_path: Path, image: GuestImage) -> Path:
    """An empty image cache that shares the downloaded packages and resolution of the default one."""
    default = build.default_cache_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "debs").symlink_to(default / "debs")
    shutil.copyfile(default / "resolved.json", cache / "resolved.json")
    return cache


# ------------------------------------------------------------------ content addressing and manifest

PKGS = [
    Package(name="libc6", version="2.36-9", arch="amd64", sha256="a" * 64, size=1),
    Package(name="busybox-static", version="1:1.35.0-4", arch="amd64", sha256="b" * 64, size=1),
]


def test_key_changes_when_the_init_script_changes(tmp_path: Path) -> None:
    edited = tmp_path / "init.sh"
    edited.write_bytes(build.INIT_SCRIPT.read_bytes() + b"\n# one more line\n")
    assert image_key(PKGS, builder_inputs()) != image_key(PKGS, builder_inputs(edited))


def test_key_changes_when_a_package_version_changes() -> None:
    bumped = [
        PKGS[0],
        Package(name="busybox-static", version="1:1.36.1-1", arch="amd64", sha256="b" * 64, size=1),
    ]
    assert image_key(PKGS, builder_inputs()) != image_key(bumped, builder_inputs())


def test_key_is_stable_and_ignores_package_order() -> None:
    assert image_key(PKGS, builder_inputs()) == image_key(list(reversed(PKGS)), builder_inputs())


def test_builder_inputs_cover_init_script_and_build_code() -> None:
    assert {"init.sh", "build.py", "apt.py", "cpio.py", "kmod.py"} <= set(builder_inputs())


def test_asking_for_another_package_resolves_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The resolution record is reused while APT's lists are unchanged; a tool added to the image
    # (sockperf, say) must not be answered from a record made without it.
    before = build._lists_fingerprint()
    monkeypatch.setattr(build, "TOOLS", build.TOOLS[:1])
    assert build._lists_fingerprint() != before


def test_warm_build_returns_same_paths_and_does_no_work(
    image: GuestImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p: p.stat().st_mtime_ns for p in (image.kernel, image.initrd)}

    def no_work(*_: object, **__: object) -> Any:
        raise AssertionError("a warm build must not resolve, download or unpack")

    for name in ("show", "download", "extract"):
        monkeypatch.setattr(apt, name, no_work)
    monkeypatch.setattr(build, "_initramfs_entries", no_work)
    said: list[str] = []
    again = build_image(progress=said.append)
    assert (again.kernel, again.initrd, again.key) == (image.kernel, image.initrd, image.key)
    assert {p: p.stat().st_mtime_ns for p in (again.kernel, again.initrd)} == before
    assert any("up to date" in line for line in said)


def test_manifest_records_versions_and_file_hashes(image: GuestImage) -> None:
    manifest = json.loads((image.kernel.parent / "manifest.json").read_text())
    assert manifest == image.manifest
    assert image.kernel.parent.name == manifest["key"]
    names = {p["name"]: p["version"] for p in manifest["packages"]}
    assert {"busybox-static", "iperf3", "libiperf0", "libc6", "libssl3"} <= set(names)
    assert {"sockperf", "libstdc++6", "libgcc-s1"} <= set(names)
    assert {"libstdc++.so.6", "libgcc_s.so.1", "libiperf.so.0"} <= set(manifest["libraries"])
    assert any(n.startswith("linux-image-") and n.endswith("-cloud-amd64") for n in names)
    assert all(names.values())
    for name, path in (("vmlinuz", image.kernel), ("initrd.img", image.initrd)):
        assert manifest["files"][name]["sha256"] == apt.sha256_file(path)


def test_module_order_puts_dependencies_first(image: GuestImage) -> None:
    order = image.manifest["modules"]
    assert {"virtio_net", "virtio_pci", "pktgen", "failover", "net_failover"} <= set(order)
    for before, after in [
        ("virtio_ring", "virtio"),
        ("virtio", "virtio_pci"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
    ]:
        assert order.index(before) < order.index(after)


def test_interrupted_build_leaves_no_image(scratch_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*_: object, **__: object) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_initramfs_entries", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_image(scratch_cache, progress=_quiet)
    assert sorted(p.name for p in scratch_cache.iterdir()) == ["debs", "resolved.json"]


def test_edited_init_script_builds_a_separate_image(
    scratch_cache: Path, tmp_path: Path, image: GuestImage
) -> None:
    edited = tmp_path / "init.sh"
    edited.write_bytes(build.INIT_SCRIPT.read_bytes() + b"\n# edited\n")
    first = build_image(scratch_cache, progress=_quiet)
    second = build_image(scratch_cache, progress=_quiet, init_script=edited)
    assert first.key == image.key  # same inputs, same address, even in another cache
    assert second.key != first.key
    assert first.kernel.exists() and second.initrd.exists()


def test_stale_apt_lists_as_non_root_say_which_command_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ImageBuildError, match="sudo apt-get update"):
        apt.show(["nicsim-no-such-package"], _quiet)


def test_cpio_archive_lists_with_cpio_and_keeps_device_nodes(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    entries = [
        cpio.regular("init", b"#!/bin/sh\n", 0o755),
        cpio.char_device("dev/console", 5, 1),
        cpio.directory("dev"),
        cpio.symlink("bin/sh", "/bin/busybox"),
        cpio.directory("bin"),
    ]
    with archive.open("wb") as f:
        cpio.write_archive(f, entries)
    listing = subprocess.run(
        ["cpio", "-itv"], stdin=archive.open("rb"), capture_output=True, text=True, check=True
    )
    lines = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line
        for line in listing.stdout.splitlines()
    }
    assert set(lines) == {"init", "dev/console", "dev", "bin/sh", "bin"}
    assert lines["dev/console"].startswith("c") and lines["bin/sh"].startswith("l")
    assert lines["init"].startswith("-rwxr-xr-x")


def test_cpio_refuses_duplicate_paths(tmp_path: Path) -> None:
    with (tmp_path / "a.cpio").open("wb") as f, pytest.raises(ValueError, match="duplicate"):
        cpio.write_archive(f, [cpio.directory("bin"), cpio.directory("bin")])


def test_depmod_orders_real_modules_and_compressed_ones_are_stored_decompressed(
    image: GuestImage, tmp_path: Path
) -> None:
    # Unpack the built initramfs with the system cpio: its modules are the kernel package's, decompressed.
    unpacked = tmp_path / "initrd"
    unpacked.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], stdin=image.initrd.open("rb"), cwd=unpacked, check=True)
    assert stat.S_ISCHR((unpacked / "dev" / "console").lstat().st_mode)
    version = next((unpacked / "lib" / "modules").iterdir()).name
    originals = {
        ko.name[:-3]: ko.read_bytes() for ko in (unpacked / "lib" / "modules" / version).glob("*.ko")
    }
    # A kernel tree as a distribution with compressed modules ships it (xz, which Debian's depmod reads),
    # beside plain ones.
    kernel_dir = tmp_path / "root" / "lib" / "modules" / version / "kernel"
    for sub in ("net", "virtio"):
        (kernel_dir / sub).mkdir(parents=True)
    for name, data in originals.items():
        if name in ("virtio_net", "failover"):
            (kernel_dir / "net" / f"{name}.ko.xz").write_bytes(lzma.compress(data))
        else:
            (kernel_dir / "virtio" / f"{name}.ko").write_bytes(data)
    moddir = kmod.run_depmod(tmp_path / "root", version)
    order = kmod.load_order(("virtio_net",), moddir)
    names = [name for name, _ in order]
    assert names[-1] == "virtio_net"
    assert {"virtio", "virtio_ring", "failover", "net_failover"} <= set(names)
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")
    assert names.index("virtio_ring") < names.index("virtio")
    paths = dict(order)
    assert paths["virtio_net"].name == "virtio_net.ko.xz" and paths["failover"].name == "failover.ko.xz"
    for name, path in order:
        assert kmod.module_bytes(path) == originals[name]


def test_a_module_missing_from_modules_dep_names_it(tmp_path: Path) -> None:
    moddir = tmp_path / "lib" / "modules" / "6.1.0-test"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(
        "kernel/a/virtio.ko: kernel/a/virtio_ring.ko\nkernel/a/virtio_ring.ko:\n"
    )
    assert [n for n, _ in kmod.load_order(("virtio",), moddir)] == ["virtio_ring", "virtio"]
    with pytest.raises(ImageBuildError, match="virtio_net"):
        kmod.load_order(("virtio_net",), moddir)


# ------------------------------------------------------------------ real boots


@dataclass
class Boot:
    lines: list[str] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    returncode: int | None = None
    tap_rx_packets: int = 0  # frames the namespace's TAP received during the boot
    peer_ping_status: int | None = None  # exit status of the namespace's ping into the guest

    @property
    def ready(self) -> bool:
        return any("NICSIM-READY" in ln for ln in self.lines)

    @property
    def done(self) -> bool:
        return any("NICSIM-DONE" in ln for ln in self.lines)

    def result(self, workload: str) -> dict[str, Any]:
        return next(r for r in self.results if r["workload"] == workload)


def boot(
    image: GuestImage,
    run: str,
    *,
    netns: str | None = None,
    on_line: tuple[str, Callable[[], None]] | None = None,
) -> Boot:
    append = (
        f"console=ttyS0 panic=-1 quiet nicsim.mac=52:54:00:12:34:56 nicsim.ip={GUEST_IP}/24 "
        f"nicsim.mtu=1500 nicsim.run={run}"
    )
    cmd = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        "256",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        append,
    ]
    if netns is not None:
        cmd = [
            "ip",
            "netns",
            "exec",
            netns,
            *cmd,
            "-device",
            "virtio-net-pci,netdev=n0,vectors=0,romfile=",
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no",
        ]
    result = Boot()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    guard = threading.Timer(BOOT_GUARD_S, proc.kill)
    guard.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            result.lines.append(line)
            if on_line is not None and on_line[0] in line:
                on_line[1]()
            if "NICSIM-RESULT " in line:
                result.results.append(dict(parse_result_line(line).data))  # the host reads iperf3 -J
        result.returncode = proc.wait()
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return result


def _tap_stat(netns: str, name: str) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", f"/sys/class/net/tap0/statistics/{name}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


@pytest.fixture(scope="module")
def nic_boot(image: GuestImage) -> Boot:
    """One boot with a NIC, shared by the checks below (each boot costs seconds under TCG)."""
    name = f"nicsim-img-{os.getpid()}-m"
    subprocess.run(["ip", "netns", "add", name], check=True)
    started: list[subprocess.Popen[bytes]] = []
    pinger: list[subprocess.Popen[bytes]] = []
    try:
        ns = ["ip", "netns", "exec", name]
        subprocess.run([*ns, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap"], check=True)
        subprocess.run([*ns, "ip", "addr", "add", f"{PEER_IP}/24", "dev", "tap0"], check=True)
        subprocess.run([*ns, "ip", "link", "set", "tap0", "up"], check=True)
        started.append(
            subprocess.Popen(
                [*ns, "iperf3", "-s", "-1", "-B", PEER_IP],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        tx_before = _tap_stat(name, "rx_packets")

        def ping_the_guest() -> None:
            # Ten echo requests into the guest while its rx-count workload (the first one) counts.
            # busybox's ping: the host has busybox-static, not necessarily iputils.
            pinger.append(
                subprocess.Popen(
                    [*ns, "busybox", "ping", "-c", "10", "-i", "0.1", "-W", "5", GUEST_IP],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

        run = (
            f"rx-count,duration=4;link;ping,target={PEER_IP},count=3,interval=0.2,rtts=1;no-such-workload;"
            f"pktgen-tx,size=60,count=5000,dst={PEER_IP};iperf3-client,server={PEER_IP},time=1"
        )
        result = boot(image, run, netns=name, on_line=("rx-count: counting", ping_the_guest))
        result.tap_rx_packets = _tap_stat(name, "rx_packets") - tx_before
        result.peer_ping_status = pinger[0].wait() if pinger else None
        return result
    finally:
        for proc in started + pinger:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.vm
def test_boot_reaches_ready_runs_every_workload_and_powers_off(nic_boot: Boot) -> None:
    assert nic_boot.ready and nic_boot.done, "\n".join(nic_boot.lines[-30:])
    assert [r["workload"] for r in nic_boot.results] == [
        "rx-count",
        "link",
        "ping",
        "no-such-workload",
        "pktgen-tx",
        "iperf3-client",
    ]
    assert nic_boot.returncode == 0


@pytest.mark.vm
def test_link_reports_carrier_and_virtio_features(nic_boot: Boot) -> None:
    link = nic_boot.result("link")
    assert link["ok"] is True and link["carrier"] is True
    assert link["mac"] == "52:54:00:12:34:56" and link["mtu"] == 1500
    assert len(link["features"]) == 64 and set(link["features"]) <= {"0", "1"}
    assert "VERSION_1" in link["feature_names"] and 32 in link["feature_bits"]


@pytest.mark.vm
def test_ping_to_the_namespace_peer_loses_nothing(nic_boot: Boot) -> None:
    ping = nic_boot.result("ping")
    assert ping["ok"] is True, ping
    assert (ping["transmitted"], ping["received"], ping["loss_pct"]) == (3, 3, 0)
    assert 0 < ping["rtt_min_ms"] <= ping["rtt_avg_ms"] <= ping["rtt_max_ms"]
    # rtts=1: every reply's RTT, raw, for the host to compute percentiles from (nicsim bench --latency)
    assert len(ping["rtt_ms"]) == 3
    assert (min(ping["rtt_ms"]), max(ping["rtt_ms"])) == (ping["rtt_min_ms"], ping["rtt_max_ms"])


@pytest.mark.vm
def test_unknown_workload_fails_without_stopping_the_run(nic_boot: Boot) -> None:
    unknown = nic_boot.result("no-such-workload")
    assert unknown["ok"] is False and "unknown workload" in unknown["error"]
    assert nic_boot.results[-1]["workload"] == "iperf3-client" and nic_boot.done


@pytest.mark.vm
def test_pktgen_sends_the_requested_frames(nic_boot: Boot) -> None:
    pktgen = nic_boot.result("pktgen-tx")
    assert pktgen["ok"] is True, pktgen
    assert (pktgen["packets"], pktgen["size"], pktgen["bytes"]) == (5000, 60, 300000)
    assert pktgen["pps"] > 0
    assert nic_boot.tap_rx_packets >= 5000  # all of them arrived on the namespace's TAP


@pytest.mark.vm
def test_rx_count_counts_what_the_peer_sent(nic_boot: Boot) -> None:
    assert nic_boot.peer_ping_status == 0  # the peer did send (and got replies)
    rx = nic_boot.result("rx-count")
    assert rx["ok"] is True and rx["packets"] >= 10 and rx["bytes"] >= 10 * 98


@pytest.mark.vm
def test_iperf3_client_reports_throughput(nic_boot: Boot) -> None:
    iperf = nic_boot.result("iperf3-client")
    assert iperf["ok"] is True, iperf
    assert iperf["sent_bps"] > 0 and iperf["received_bps"] > 0 and iperf["retransmits"] >= 0


@pytest.mark.vm
def test_without_a_nic_workloads_still_run_and_a_stuck_one_is_killed(image: GuestImage) -> None:
    result = boot(image, "iperf3-server,timeout=2;sleep,seconds=0;link")
    assert result.ready and result.done, "\n".join(result.lines[-30:])
    server, sleep, link = result.results
    assert server["ok"] is False and "timed out" in server["error"]
    assert sleep == {"workload": "sleep", "ok": True, "seconds": 0}
    assert link["ok"] is False and "no eth0" in link["error"]
