"""``nicsim vm``: boot the test guest with its serial console attached to your terminal.

This module owns the interactive front of ``qemu.testvm``: it turns command-line options into a
``VMSpec`` (console on stdio, no QMP), builds the guest image if none is given (for another Debian
kernel package with ``--kernel-package``), boots the user's own ``--kernel``/``--initrd``/``--disk``
(checked first: a missing or unreadable file is one line naming the option) with ``--append`` added
to the kernel command line, chooses the accelerator (KVM only when the probe shows it boots), and
for ``--nic tap`` creates a throwaway network namespace holding the TAP (10.0.2.2/24 on its end)
which it deletes when QEMU exits. ``--nic`` repeats for a guest with several NICs (eth0, eth1, ...),
each ``KIND[,KEY=VALUE...]`` with its own MAC, address and MTU; ``--forward`` and ``--route`` make
the guest a router.
With a ``shell`` workload the console is the terminal's. Otherwise the run is a script's: the console
is read (and shown only with ``--verbose``), each workload's result goes to stdout as one JSON line,
and the exit code is 0 only if every workload reported and succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from qemu.testvm import (
    DEFAULT_MAC,
    ConsoleStdio,
    InvalidOptionError,
    Netns,
    Nic,
    Route,
    TapNic,
    UserNic,
    VhostUserNic,
    VMSpec,
    Workload,
    WorkloadResult,
    append_words,
    build_cmdline,
    check_file,
    choose_accel,
    disk_format,
    parse_result_line,
)
from qemu.testvm.workload import RESULT_MARKER

QEMU = "qemu-system-x86_64"

EPILOG = """\
examples:
  nicsim vm                                   a shell in the guest, slirp NIC (restrict=on)
  nicsim vm --workload ping,target=10.0.2.2,count=3 --workload shell
                                              ping QEMU's slirp gateway, then a shell
  nicsim vm --nic tap --workload ping,target=10.0.2.2,count=3
                                              TAP in a fresh network namespace (10.0.2.2/24 there)
  nicsim serve --socket /tmp/nicsim.sock &    (in another terminal) then:
  nicsim vm --nic vhost-user --socket /tmp/nicsim.sock
                                              the guest's NIC is served by nicsim over vhost-user
  nicsim vm --nic vhost-user,socket=/tmp/a.sock,ip=10.1.0.1/24 \
            --nic vhost-user,socket=/tmp/b.sock,ip=10.2.0.1/24 --forward
                                              a router: eth0 and eth1 on two nicsim switches
  nicsim vm --route 10.2.0.0/24,via=10.0.2.2 --route default,via=10.0.2.2
                                              static routes, added once the NICs are up
  nicsim vm --kernel-package linux-image-amd64
                                              the built-in guest on Debian's generic kernel (its
                                              initrd built once with that kernel's modules)
  nicsim vm --kernel vmlinuz --initrd initrd.img --disk disk.qcow2 --append "root=/dev/vda1"
                                              your own guest: its kernel, initrd and disk (virtio-blk,
                                              snapshot=on: the guest's writes never reach the file)

In the console: Ctrl-A X quits QEMU, Ctrl-A C toggles QEMU's monitor; Ctrl-C goes to the guest.
The guest powers off (and QEMU exits) after its last workload. Without a shell workload, each
result is printed as one JSON line (stdout) and the console is shown only with --verbose; the exit
code is 0 only if every workload succeeded, 1 otherwise.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "vm",
        help="boot the test guest with its console on this terminal",
        description="Boot the nicsim test guest (kernel + busybox initramfs) under QEMU with its serial "
        "console on this terminal, run the given workloads in it, and power off.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--nic", action="append", metavar="KIND[,KEY=VALUE...]",
        help="a guest NIC, repeatable for several (eth0, eth1, ... in order). KIND: 'user' is QEMU's "
        "slirp with restrict=on (nothing leaves the VM), 'tap' a TAP inside a network namespace created "
        "for this run (one at most), 'vhost-user' a vhost-user backend such as 'nicsim serve', 'none' no "
        "NIC at all. KEYs: mac=, ip= (address/prefix), mtu= (the guest's), and for vhost-user socket=, "
        "server=on; --socket, --server, --mac and --ip are the first NIC's (default: user)",
    )  # fmt: skip
    parser.add_argument(
        "--socket", type=Path,
        help="vhost-user socket path (with --nic vhost-user); QEMU connects to it as a client",
    )  # fmt: skip
    parser.add_argument(
        "--server", action="store_true",
        help="with --nic vhost-user: QEMU listens on --socket and the backend connects",
    )  # fmt: skip
    parser.add_argument(
        "--mac", default=DEFAULT_MAC,
        help=f"the first NIC's MAC address (default: {DEFAULT_MAC}; NIC N's ends in 56+N)",
    )  # fmt: skip
    parser.add_argument(
        "--ip", default="10.0.2.15/24", help="the guest's eth0 address (default: 10.0.2.15/24)"
    )
    parser.add_argument(
        "--forward", action="store_true", help="the guest forwards IPv4 between its NICs (a router)"
    )
    parser.add_argument(
        "--route", action="append", default=[], metavar="NETWORK,via=ADDRESS",
        help="a static route in the guest, repeatable: '10.2.0.0/24,via=10.1.0.1' or 'default,via=...'",
    )  # fmt: skip
    parser.add_argument(
        "--memory", type=int, default=256, metavar="MB", help="guest RAM in MiB, shared memfd (default: 256)"
    )
    parser.add_argument(
        "--workload", action="append", default=[], metavar="NAME[,KEY=VALUE...]",
        help="a guest workload, repeatable, run in order, e.g. 'ping,target=10.0.2.2,count=3', "
        "'iperf3-client,server=10.0.2.2,time=5', 'sleep,seconds=2', 'link' (eth0; 'link,dev=eth1' "
        "another NIC), 'disk' (the --disk as /dev/vda: size and first bytes; 'disk,write=TEXT' writes "
        "TEXT first) (default: shell)",
    )  # fmt: skip
    parser.add_argument(
        "--accel", choices=["auto", "kvm", "tcg"], default="auto",
        help="'auto' uses KVM only if a probe boot under KVM succeeds, else TCG (default: auto)",
    )  # fmt: skip
    own = parser.add_argument_group(
        "your own guest",
        "By default the built-in guest image boots (built once, then cached). These options boot "
        "another kernel, initrd or disk; the nicsim.* parameters stay on the kernel command line for "
        "the built-in /init, and any other init ignores them.",
    )
    own.add_argument(
        "--kernel", type=Path, metavar="FILE",
        help="guest kernel (bzImage/vmlinuz); without --initrd it boots with no initramfs "
        "(default: the built guest image's kernel)",
    )  # fmt: skip
    own.add_argument(
        "--initrd", type=Path, metavar="FILE", help="guest initramfs (default: the built guest image's)"
    )
    own.add_argument(
        "--kernel-package", metavar="PKG",
        help="boot the built-in guest on this Debian kernel package, e.g. linux-image-amd64 (the "
        "generic kernel): its image is built once with that kernel's own modules, then cached "
        "(same as 'nicsim image build --kernel-package PKG')",
    )  # fmt: skip
    own.add_argument(
        "--disk", type=Path, metavar="FILE",
        help="a disk image (raw or qcow2) on virtio-blk, /dev/vda in the guest; opened with "
        "snapshot=on: the guest may write, the file itself is never modified",
    )  # fmt: skip
    own.add_argument(
        "--disk-format", choices=["auto", "raw", "qcow2"], default="auto",
        help="the disk image's format; 'auto' reads the qcow2 magic, else raw (default: auto)",
    )  # fmt: skip
    own.add_argument(
        "--append", action="append", default=[], metavar="PARAMS",
        help="kernel parameters added after nicsim's own, e.g. 'root=/dev/vda1 ro' "
        "(repeatable; split on spaces, so a value cannot contain one)",
    )  # fmt: skip
    return parser


NIC_KEYS = {"user": ("mac", "ip", "mtu"), "tap": ("mac", "ip", "mtu"),
            "vhost-user": ("mac", "ip", "mtu", "socket", "server"), "none": ()}  # fmt: skip


def nic_mac(index: int) -> str:
    """NIC ``index``'s default MAC: the default one, its last byte counting up."""
    head, last = DEFAULT_MAC.rsplit(":", 1)
    return f"{head}:{(int(last, 16) + index) % 256:02x}"


def _nic(text: str, index: int, args: argparse.Namespace) -> Nic:
    kind, *items = text.split(",")
    if kind not in NIC_KEYS or kind == "none":
        raise InvalidOptionError(f"--nic {text!r}: the kind is one of {', '.join(NIC_KEYS)}")
    keys: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in NIC_KEYS[kind]:
            raise InvalidOptionError(
                f"--nic {text!r}: {item!r} is not KEY=VALUE with a KEY of {', '.join(NIC_KEYS[kind])}"
            )
        keys[key] = value
    first = index == 0  # the one-NIC flags are the first NIC's
    mac = keys.get("mac", args.mac if first else nic_mac(index))
    mtu = keys.get("mtu")
    if mtu is not None and not mtu.isdigit():
        raise InvalidOptionError(f"--nic {text!r}: mtu={mtu} is not a number")
    common: dict[str, Any] = {"mac": mac, "guest_ip": keys.get("ip"), "guest_mtu": int(mtu) if mtu else None}
    if kind == "user":
        return UserNic(**common)
    if kind == "tap":
        return TapNic(ifname="tap0", **common)
    socket = keys.get("socket") or (args.socket if first else None)
    if socket is None:
        raise InvalidOptionError(f"--nic {text!r} needs socket=PATH (or --socket PATH, for the first NIC)")
    server = keys.get("server", "on" if first and args.server else "off")
    if server not in ("on", "off"):
        raise InvalidOptionError(f"--nic {text!r}: server=on or server=off")
    return VhostUserNic(socket=socket, server=server == "on", **common)


def nics_of(args: argparse.Namespace) -> list[Nic]:
    """The guest's NICs from the repeated ``--nic`` (none given: one slirp NIC; ``none``: no NIC)."""
    texts: list[str] = args.nic or ["user"]
    if texts == ["none"]:
        return []
    if "none" in texts:
        raise InvalidOptionError("--nic none means no NIC at all: give it alone")
    nics = [_nic(text, i, args) for i, text in enumerate(texts)]
    if sum(isinstance(n, TapNic) for n in nics) > 1:
        raise InvalidOptionError("one --nic tap at most (its namespace holds one TAP, 10.0.2.2/24)")
    return nics


def run_workloads(argv: list[str], workloads: list[Workload], *, verbose: bool) -> int:
    """Run QEMU with its console read here: results to stdout as JSON lines; 0 only if all succeeded."""
    results: list[WorkloadResult] = []
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as qemu:  # fmt: skip
        assert qemu.stdout is not None
        tail: list[str] = []
        try:
            for line in qemu.stdout:
                tail = [*tail[-19:], line]
                if verbose:
                    sys.stderr.write(line)
                if RESULT_MARKER in line:
                    result = parse_result_line(line)
                    results.append(result)
                    print(json.dumps(dict(result.data)), flush=True)
        except BaseException:
            # Ctrl-C reaches QEMU too (the terminal signals the whole process group); SIGTERM to
            # nicsim alone does not, and Popen's exit would wait for QEMU forever.
            qemu.kill()
            raise
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"nicsim vm: workload {r.workload} failed: {r.error}", file=sys.stderr)
    if len(results) < len(workloads):
        missing = ", ".join(w.name for w in workloads[len(results) :])
        print(f"nicsim vm: no result from {missing} (QEMU exited with {qemu.returncode}); "
              "the console ends:", file=sys.stderr)  # fmt: skip
        if not verbose:
            sys.stderr.write("".join(tail))
        return 1
    return 1 if failed or qemu.returncode != 0 else 0


def check_own_guest(args: argparse.Namespace) -> str | None:
    """The user's own files checked before anything is built or started; the disk's format."""
    if args.kernel_package is not None and (args.kernel is not None or args.initrd is not None):
        raise InvalidOptionError(
            "--kernel-package boots the built-in guest's image for that kernel: give it alone, or "
            "--kernel/--initrd alone"
        )
    if args.kernel is not None:
        check_file(args.kernel, "--kernel", "give the path of a kernel image (bzImage/vmlinuz), "
                   "or leave --kernel out to boot the built-in guest image")  # fmt: skip
    if args.initrd is not None:
        check_file(args.initrd, "--initrd", "give an initramfs image, or leave --initrd out")
    append_words(" ".join(args.append))
    if args.disk is None:
        return None
    check_file(args.disk, "--disk", "give a raw or qcow2 disk image, or leave --disk out")
    return disk_format(args.disk, args.disk_format)


def run(args: argparse.Namespace) -> int:
    try:
        workloads = [Workload.parse(w) for w in args.workload] or [Workload("shell")]
        nics = nics_of(args)
        routes = [Route.parse(r) for r in args.route]
        fmt = check_own_guest(args)
    except InvalidOptionError as err:
        print(f"nicsim vm: {err}", file=sys.stderr)
        return 2
    if shutil.which(QEMU) is None:
        print(f"nicsim vm: {QEMU} not found: install it with 'apt-get install qemu-system-x86'",
              file=sys.stderr)  # fmt: skip
        return 1
    kernel, initrd = args.kernel, args.initrd
    if kernel is None:
        from images.build import build_image  # only when no kernel was given

        # Building for another kernel package downloads and unpacks it (seconds): always say so.
        loud = bool(args.verbose) or args.kernel_package is not None

        def progress(line: str) -> None:
            if loud:
                print(f"image: {line}", file=sys.stderr, flush=True)

        image = build_image(progress=progress, kernel_package=args.kernel_package)
        kernel, initrd = image.kernel, initrd or image.initrd
    accel = asyncio.run(choose_accel(args.accel, kernel))
    interactive = any(w.name == "shell" for w in workloads)
    if interactive:
        print(f"nicsim vm: accelerator {accel}; Ctrl-A X quits", file=sys.stderr)
        if args.disk is not None:
            print(f"nicsim vm: {args.disk} ({fmt}) is /dev/vda, snapshot=on: the guest's writes are "
                  "dropped when QEMU exits and the file is not modified", file=sys.stderr)  # fmt: skip
    spec = VMSpec(
        kernel=kernel, initrd=initrd, memory_mb=args.memory, accel=accel, nics=nics, guest_ip=args.ip,
        forward=args.forward, routes=routes,
        workloads=workloads, console=ConsoleStdio(), extra_append=" ".join(args.append),
        disk=args.disk, disk_format=fmt or "raw",
    )  # fmt: skip
    try:
        argv = build_cmdline(spec)
    except InvalidOptionError as err:
        print(f"nicsim vm: {err}", file=sys.stderr)
        return 2

    def boot(argv: list[str]) -> int:
        if interactive:
            return subprocess.run(argv).returncode
        return run_workloads(argv, workloads, verbose=bool(args.verbose))

    if not any(isinstance(n, TapNic) for n in nics):
        return boot(argv)
    # A failed `ip` (no root: "Operation not permitted") is a NetnsError, one line by nicsim.cli.failures.
    with Netns.create("nicsim-vm") as ns:
        ns.add_tap("tap0", "10.0.2.2/24")
        if interactive or args.verbose:
            print(f"nicsim vm: TAP tap0 (10.0.2.2/24) in network namespace {ns.name}", file=sys.stderr)
        return boot(ns.exec_argv(argv))
