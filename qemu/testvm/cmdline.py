"""Building QEMU command lines for test guests: pure functions from option objects to ``argv``.

This module owns every QEMU option the harness uses, so a command line can be unit-tested without
QEMU: shared memfd guest RAM (a vhost-user backend sees nothing without ``share=on``), the serial
console and QMP chardevs, ``-kernel/-initrd/-append`` with the ARCHITECTURE.md kernel command line
(the caller's own words appended), an optional disk image on virtio-blk opened with ``snapshot=on``
(the guest may write; its writes go to a temporary overlay QEMU deletes at exit, so the image file
is never modified), and virtio-net NICs (one, or several in order: eth0, eth1, ... in the guest),
each backed by vhost-user, a TAP inside a network namespace, or slirp with ``restrict=on``, each with
its own MAC and QEMU ids (``nic0``/``n0`` for the first, ``nic1``/``n1`` next). Under TCG it adds
``vectors=0`` (QEMU 7.2 segfaults in ``msix_set_vector_notifiers`` with vhost-user + MSI-X under TCG)
and an empty ``romfile=`` (skips the iPXE ROM, faster boot).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidOptionError
from .workload import Workload, kernel_params

DEFAULT_MAC = "52:54:00:12:34:56"
DEFAULT_QEMU = "qemu-system-x86_64"
NETDEV_ID = "n0"  # NIC 0's ids; NIC i's are n{i}, nic{i} and (vhost-user) chardev c{i}
NIC_ID = "nic0"
DISK_ID = "disk0"
ACCELS = ("tcg", "kvm")
DISK_FORMATS = ("raw", "qcow2")
# x86 Linux keeps at most 2047 bytes of its command line (COMMAND_LINE_SIZE 2048, NUL included) and
# drops the rest without a word: the nicsim.run= workloads would be cut short.
MAX_CMDLINE = 2047

# virtio-net-pci properties we pass through from `offloads=` (QEMU spells them with '_').
OFFLOADS = frozenset(
    {
        "csum", "guest_csum", "gso", "host_tso4", "host_tso6", "host_ecn", "host_ufo",
        "guest_tso4", "guest_tso6", "guest_ecn", "guest_ufo", "guest_announce", "ctrl_vq",
        "ctrl_rx", "ctrl_vlan", "ctrl_mac_addr", "event_idx", "indirect_desc", "status",
    }
)  # fmt: skip
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _check_path(path: str | Path, what: str) -> str:
    # QEMU's option parser splits on ',' (',,' escapes it); refuse rather than escape, so the path a
    # test names is the path QEMU opens.
    text = str(path)
    if not text or "," in text:
        raise InvalidOptionError(f"{what} path {text!r} is empty or contains a comma")
    return text


@dataclass(frozen=True, kw_only=True)
class NicOptions:
    """What every virtio-net-pci NIC shares, whatever its backend.

    ``guest_ip`` (an address with prefix) and ``guest_mtu`` are what the built-in /init configures on
    this NIC in the guest; on NIC 0, when they are None, the VM's own ``guest_ip`` and ``mtu`` apply
    (the single-NIC API), and on the others nothing is configured but the link.
    """

    mac: str = DEFAULT_MAC
    rx_queue_size: int | None = None
    tx_queue_size: int | None = None
    packed: bool | None = None
    mrg_rxbuf: bool | None = None
    host_mtu: int | None = None  # virtio-net's host_mtu: offers VIRTIO_NET_F_MTU with this MTU
    offloads: Mapping[str, bool] = field(default_factory=dict)
    guest_ip: str | None = None
    guest_mtu: int | None = None

    def device_args(self, *, queues: int, tcg: bool, index: int = 0) -> str:
        if not _MAC_RE.match(self.mac):
            raise InvalidOptionError(f"MAC address {self.mac!r} is not six hex pairs")
        props = [f"virtio-net-pci,id=nic{index},netdev=n{index},mac={self.mac}"]
        for name, size in (("rx_queue_size", self.rx_queue_size), ("tx_queue_size", self.tx_queue_size)):
            if size is None:
                continue
            # virtio-net: a power of two between 256 and 1024 (QEMU refuses anything else).
            if size < 256 or size > 1024 or size & (size - 1):
                raise InvalidOptionError(f"{name}={size}: must be a power of two in 256..1024")
            props.append(f"{name}={size}")
        if queues > 1:
            # 2 vectors per queue pair, plus config and control: QEMU's own rule for mq.
            props.append("mq=on")
            if not tcg:
                props.append(f"vectors={2 * queues + 2}")
        if self.packed is not None:
            props.append(f"packed={_on(self.packed)}")
        if self.mrg_rxbuf is not None:
            props.append(f"mrg_rxbuf={_on(self.mrg_rxbuf)}")
        if self.host_mtu is not None:
            # QEMU's own range for host_mtu (virtio-net-pci refuses anything else).
            if not 68 <= self.host_mtu <= 65535:
                raise InvalidOptionError(f"host_mtu={self.host_mtu}: must be in 68..65535")
            props.append(f"host_mtu={self.host_mtu}")
        for name, flag in sorted(self.offloads.items()):
            if name not in OFFLOADS:
                raise InvalidOptionError(f"unknown virtio-net offload {name!r}; known: {sorted(OFFLOADS)}")
            props.append(f"{name}={_on(flag)}")
        if tcg:
            props.append("vectors=0")
        props.append("romfile=")
        return ",".join(props)


@dataclass(frozen=True, kw_only=True)
class VhostUserNic(NicOptions):
    """A vhost-user NIC: QEMU is the frontend on ``socket`` (client by default; ``server=True`` listens)."""

    socket: str | Path
    server: bool = False
    reconnect: int | None = None
    queues: int = 1

    def args(self, *, tcg: bool, index: int = 0) -> list[str]:
        chardev = f"socket,id=c{index},path={_check_path(self.socket, 'vhost-user socket')}"
        if self.server:
            if self.reconnect is not None:
                raise InvalidOptionError("reconnect= applies only when QEMU is the socket client")
            # QEMU's vhost-user netdev still waits at start-up until the backend connects (whatever
            # wait= says), so QMP answers only then: TestVM's launch_timeout bounds that wait.
            chardev += ",server=on,wait=off"
        elif self.reconnect is not None:
            if self.reconnect < 1:
                raise InvalidOptionError(f"reconnect={self.reconnect}: seconds, at least 1")
            chardev += f",reconnect={self.reconnect}"
        if self.queues < 1:
            raise InvalidOptionError(f"queues={self.queues}: at least 1")
        netdev = f"vhost-user,id=n{index},chardev=c{index}"
        if self.queues > 1:
            netdev += f",queues={self.queues}"
        return [
            "-chardev", chardev,
            "-netdev", netdev,
            "-device", self.device_args(queues=self.queues, tcg=tcg, index=index),
        ]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TapNic(NicOptions):
    """QEMU's own tap backend on ``ifname``; run QEMU inside a network namespace (``ip netns exec``)."""

    ifname: str = "tap0"

    def args(self, *, tcg: bool, index: int = 0) -> list[str]:
        if not _IFNAME_RE.match(self.ifname):
            raise InvalidOptionError(f"interface name {self.ifname!r} is not a Linux interface name")
        # script=no,downscript=no: the namespace's owner configures the TAP, not /etc/qemu-ifup.
        # vhost=off: there is no /dev/vhost-net on these machines.
        netdev = f"tap,id=n{index},ifname={self.ifname},script=no,downscript=no,vhost=off"
        return ["-netdev", netdev, "-device", self.device_args(queues=1, tcg=tcg, index=index)]


@dataclass(frozen=True, kw_only=True)
class UserNic(NicOptions):
    """Slirp, always with ``restrict=on``: the guest can reach QEMU's gateway and nothing beyond it."""

    def args(self, *, tcg: bool, index: int = 0) -> list[str]:
        netdev = f"user,id=n{index},restrict=on"
        return ["-netdev", netdev, "-device", self.device_args(queues=1, tcg=tcg, index=index)]


Nic = VhostUserNic | TapNic | UserNic


def nic_list(nic: Nic | None, nics: Sequence[Nic]) -> tuple[Nic, ...]:
    """The VM's NICs in order (``nic=`` is the one-NIC spelling of ``nics=``); two MACs may not clash."""
    if nic is not None and nics:
        raise InvalidOptionError("give nic= (one NIC) or nics= (several), not both")
    out = (nic,) if nic is not None else tuple(nics)
    seen: dict[str, int] = {}
    for i, n in enumerate(out):
        first = seen.setdefault(n.mac.lower(), i)
        if first != i:
            raise InvalidOptionError(f"NICs {first} and {i} both have MAC {n.mac}: give each its own mac=")
    return out


@dataclass(frozen=True, kw_only=True)
class Route:
    """A static IPv4 route the built-in /init adds once the NICs are up: ``to`` a network with its prefix
    (or ``default``) ``via`` a gateway on one of the guest's own networks."""

    to: str
    via: str

    def __post_init__(self) -> None:
        try:
            if self.to != "default":
                ipaddress.IPv4Network(self.to)
            ipaddress.IPv4Address(self.via)
        except ValueError as err:
            raise InvalidOptionError(
                f"route {self.render()!r}: {err} (a route is NETWORK/PREFIX or default, via=ADDRESS)"
            ) from None

    @classmethod
    def parse(cls, text: str) -> Route:
        """The command-line form ``10.2.0.0/24,via=10.1.0.1`` (as ``nicsim vm --route`` takes it)."""
        to, sep, via = text.partition(",via=")
        if not sep or not to or "," in via:
            raise InvalidOptionError(
                f"route {text!r}: write it NETWORK/PREFIX,via=ADDRESS or default,via=ADDRESS"
            )
        return cls(to=to, via=via)

    def render(self) -> str:
        return f"{self.to},via={self.via}"


@dataclass(frozen=True, kw_only=True)
class ConsoleFile:
    """Serial console written to ``path`` by QEMU (read it back by polling)."""

    path: str | Path


@dataclass(frozen=True, kw_only=True)
class ConsoleFd:
    """Serial console on an inherited connected socket ``fd`` (read live), also logged to ``logfile``."""

    fd: int
    logfile: str | Path | None = None


@dataclass(frozen=True, kw_only=True)
class ConsoleStdio:
    """Serial console on QEMU's stdio for a person; Ctrl-A X quits, Ctrl-A C is QEMU's monitor."""

    logfile: str | Path | None = None


Console = ConsoleFile | ConsoleFd | ConsoleStdio


@dataclass(frozen=True, kw_only=True)
class QmpPath:
    """QMP on a Unix socket path; ``server=True`` makes QEMU listen there (without waiting)."""

    path: str | Path
    server: bool = True


@dataclass(frozen=True, kw_only=True)
class QmpFd:
    """QMP on an inherited connected Unix socket ``fd`` (one end of a socketpair)."""

    fd: int


Qmp = QmpPath | QmpFd


def console_args(console: Console) -> list[str]:
    if isinstance(console, ConsoleFile):
        return ["-chardev", f"file,id=ser0,path={_check_path(console.path, 'console log')}",
                "-serial", "chardev:ser0"]  # fmt: skip
    if isinstance(console, ConsoleFd):
        chardev = f"socket,id=ser0,fd={console.fd}"
    else:
        # mux=on lets Ctrl-A C reach the HMP monitor; signal=off hands Ctrl-C to the guest's shell.
        chardev = "stdio,id=ser0,mux=on,signal=off"
    if console.logfile is not None:
        chardev += f",logfile={_check_path(console.logfile, 'console log')},logappend=off"
    args = ["-chardev", chardev, "-serial", "chardev:ser0"]
    if isinstance(console, ConsoleStdio):
        args += ["-mon", "chardev=ser0,mode=readline"]
    return args


def qmp_args(qmp: Qmp) -> list[str]:
    if isinstance(qmp, QmpFd):
        chardev = f"socket,id=qmp,fd={qmp.fd}"
    else:
        chardev = f"socket,id=qmp,path={_check_path(qmp.path, 'QMP socket')}"
        if qmp.server:
            chardev += ",server=on,wait=off"
    return ["-chardev", chardev, "-mon", "chardev=qmp,mode=control"]


def append_words(extra: str | Sequence[str]) -> list[str]:
    """The caller's own kernel parameters as words: a string is split on whitespace, a sequence is
    taken word by word (each must be one non-empty word). Control characters are refused."""
    words = extra.split() if isinstance(extra, str) else list(extra)
    for word in words:
        if not word or any(c.isspace() for c in word):
            raise InvalidOptionError(f"extra kernel parameter {word!r} is empty or contains whitespace")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in word):
            raise InvalidOptionError(f"extra kernel parameter {word!r} contains a control character")
    return words


def kernel_cmdline(
    *,
    nic: Nic | None = None,
    guest_ip: str | None,
    workloads: Sequence[Workload],
    mtu: int | None = 1500,
    extra: str | Sequence[str] = (),
    nics: Sequence[Nic] = (),
    forward: bool = False,
    routes: Sequence[Route] = (),
) -> str:
    """The ``-append`` string: ``console=ttyS0 panic=-1`` then the ``nicsim.*`` contract, then ``extra``
    (the caller's words come last, so where the kernel takes the last value, e.g. ``console=``, theirs
    wins; the built-in ``/init`` reads the ``nicsim.*`` words, any other init ignores them).

    NIC 0 is ``nicsim.mac/ip/mtu`` (its own ``guest_ip``/``guest_mtu``, else ``guest_ip``/``mtu``);
    NIC i is ``nicsim.ethI.mac/ip/mtu``; then ``nicsim.forward=1`` and one ``nicsim.route=`` per route."""
    all_nics = nic_list(nic, nics)
    words = append_words(extra)
    more: list[tuple[str, object]] = []
    for i, n in enumerate(all_nics[1:], 1):
        more += [(f"eth{i}.{k}", v) for k, v in (("mac", n.mac), ("ip", n.guest_ip), ("mtu", n.guest_mtu))]
    if forward:
        more.append(("forward", 1))
    more += [("route", r.render()) for r in routes]
    first = all_nics[0] if all_nics else None
    params = kernel_params(
        mac=first.mac if first else None,
        ip=(first.guest_ip or guest_ip) if first else None,
        mtu=(first.guest_mtu or mtu) if first else None,
        workloads=workloads,
        more=more,
    )
    line = " ".join(["console=ttyS0", "panic=-1", *params, *words])
    if len(line.encode()) > MAX_CMDLINE:
        raise InvalidOptionError(
            f"the kernel command line is {len(line.encode())} bytes; Linux keeps only {MAX_CMDLINE} "
            "(fewer or shorter workloads or extra parameters)"
        )
    return line


def disk_args(path: str | Path, fmt: str = "raw") -> list[str]:
    """A disk image on virtio-blk, ``snapshot=on``: the guest's writes never reach the file."""
    if fmt not in DISK_FORMATS:
        raise InvalidOptionError(f"disk format {fmt!r}: choose one of {DISK_FORMATS} (resolve 'auto' first)")
    drive = f"file={_check_path(path, 'disk image')},if=none,id={DISK_ID},format={fmt},snapshot=on"
    return ["-drive", drive, "-device", f"virtio-blk-pci,drive={DISK_ID}"]


@dataclass(frozen=True, kw_only=True)
class VMSpec:
    """Everything one QEMU command line is made of."""

    kernel: str | Path
    initrd: str | Path | None = None
    memory_mb: int = 256
    cpus: int = 1
    accel: str = "tcg"
    nic: Nic | None = None
    nics: Sequence[Nic] = ()  # several NICs, in order (instead of nic)
    guest_ip: str | None = "10.0.2.15/24"
    mtu: int | None = 1500
    forward: bool = False  # the guest forwards IPv4 between its NICs (a router)
    routes: Sequence[Route] = ()
    workloads: Sequence[Workload] = ()
    extra_append: str | Sequence[str] = ()
    disk: str | Path | None = None
    disk_format: str = "raw"
    console: Console = field(default_factory=lambda: ConsoleStdio())
    qmp: Qmp | None = None
    qemu: str = DEFAULT_QEMU
    extra_args: Sequence[str] = ()


def build_cmdline(spec: VMSpec) -> list[str]:
    """The complete ``argv`` (binary first) for ``spec``; raises InvalidOptionError on a bad option."""
    if spec.accel not in ACCELS:
        raise InvalidOptionError(f"accel={spec.accel!r}: choose one of {ACCELS} (resolve 'auto' first)")
    if spec.memory_mb < 16:
        raise InvalidOptionError(f"memory_mb={spec.memory_mb}: at least 16")
    if spec.cpus < 1:
        raise InvalidOptionError(f"cpus={spec.cpus}: at least 1")
    tcg = spec.accel == "tcg"
    argv = [
        spec.qemu,
        "-accel", spec.accel,
        # -nodefaults: no default NIC, VGA, monitor or serial; we add exactly what we use.
        "-nodefaults", "-display", "none", "-no-reboot",
        "-m", f"{spec.memory_mb}M",
        "-smp", str(spec.cpus),
        # share=on is what lets a vhost-user backend map the guest's RAM at all.
        "-object", f"memory-backend-memfd,id=mem,size={spec.memory_mb}M,share=on",
        "-machine", "memory-backend=mem",
    ]  # fmt: skip
    if not tcg:
        argv += ["-cpu", "host"]
    argv += console_args(spec.console)
    if spec.qmp is not None:
        argv += qmp_args(spec.qmp)
    argv += ["-kernel", _check_path(spec.kernel, "kernel")]
    if spec.initrd is not None:
        argv += ["-initrd", _check_path(spec.initrd, "initrd")]
    argv += [
        "-append",
        kernel_cmdline(
            nic=spec.nic, nics=spec.nics, guest_ip=spec.guest_ip, workloads=spec.workloads, mtu=spec.mtu,
            extra=spec.extra_append, forward=spec.forward, routes=spec.routes,
        ),
    ]  # fmt: skip
    if spec.disk is not None:
        argv += disk_args(spec.disk, spec.disk_format)
    for index, nic in enumerate(nic_list(spec.nic, spec.nics)):
        argv += nic.args(tcg=tcg, index=index)
    argv += list(spec.extra_args)
    return argv


def in_netns(argv: Sequence[str], netns: str | None) -> list[str]:
    """``argv`` run inside network namespace ``netns`` (``ip netns exec`` execs, so the pid is QEMU's)."""
    if netns is None:
        return list(argv)
    if not _NETNS_RE.match(netns):
        raise InvalidOptionError(f"network namespace name {netns!r} is not a plain name")
    return ["ip", "netns", "exec", netns, *argv]
