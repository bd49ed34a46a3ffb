"""``nicsim serve``: run the vhost-user virtio-net backend on one or more sockets until SIGINT/SIGTERM.

This module owns the command-line contract of the backend daemon (the benchmark relies on it): the
options, the port specification (``NAME[,key=value...]``), the periodic stats line for a person, the
JSON stats file rewritten atomically every ``--stats-interval`` seconds and at exit, and the graceful
shutdown (every session closed, so every guest buffer is returned and every pool closed, socket files
removed, exit code 0). The serving itself is :mod:`nicsim.server`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nicsim.cli.capture import Captures, add_capture_arguments, config_from_args, parse_port_captures
from nicsim.cli.priority import check_nice, lower_priority
from nicsim.interrupts import interrupts_kept
from nicsim.ports import (
    PORTS,
    GeneratorConfig,
    GeneratorPort,
    Port,
    ResponderConfig,
    ResponderPort,
    enable_kernels,
)
from nicsim.ports.sink import SinkConfig, SinkPort
from nicsim.ports.switch import DIRECTIONS, Switch
from nicsim.ports.tap import TapConfig, TapPort
from nicsim.ports.vxlan import VxlanConfig, VxlanPort
from nicsim.server import DEFAULT_MAX_QUEUE_SIZE, Server
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.policy import NotifyPolicy, add_policy_arguments, policy_from_args
from rings import kernels
from rings.pool import PacketPool

EPILOG = """\
ports:
  responder   (default) answers ARP, ICMP echo and UDP echo (port 7) as 10.0.2.2 / 52:54:00:00:00:02;
              keys: ip=, mac=, udp_echo_port=
  sink        counts what the guest sends and discards it; read=on also reads (sums) every byte
  generator   sends UDP frames into the guest as fast as it posts buffers;
              keys: size= (frame bytes without FCS, default 64), count=, rate_pps=, dst_mac=, src_mac=,
              src_ip=, dst_ip=, sport=, dport=, udp_checksum=0|1
              (0 sends checksum 0, as DPDK testpmd's txonly does), burst=, offered=on (rate_pps is an
              offered load: frames due with no guest buffer are dropped and counted), hold=on (send
              nothing until SIGUSR1), seq=on (every frame numbered: a 64-bit sequence number leads
              its UDP payload, with the UDP checksum for it; size >= 50), mergeable=on (offer
              mergeable RX buffers even for frames that fit a small buffer: size <= 1514 goes without)
  reflect     sends every frame back to the guest
  switch      joins the guests on all the sockets with a learning L2 switch (one port per socket, named
              after it): it learns source MACs, floods broadcast and unknown unicast, ages entries out,
              and copies a frame once, from the sender's TX buffer into the receiver's RX buffer;
              a guest without room for a frame never holds up the others (the frame is dropped and
              counted on its port, reason no_rx_buffer; a flooded frame never waits in a backlog:
              flood_no_rx_buffer); keys: ageing= (seconds, default 300),
              max_entries= (default 4096), offload=on|off (default on: the guests get checksum and
              TCP segmentation offloads, a 64 KB GSO frame crosses whole to a guest that takes it and
              is segmented for one that does not, a vxlan uplink or an impaired link), pace=on|off
              (default on: a guest whose frames all go to one guest with no buffer left waits in its
              own ring, up to 2 ms, for that guest's next buffers, instead of being taken and
              dropped as fast as it sends; frames for anyone else wait at most as long); impair a port's
              direction with --impair; join a tap or a vxlan tunnel to the switch with --uplink (a
              port like the guests' ones, named uplink0, uplink1... in --uplink order: learned,
              flooded to, counted and impaired the same way)
  tap         forwards to and from a TAP device inside a network namespace (traffic never touches the
              root namespace); keys: netns= (required: the namespace, `ip netns add NAME`), ifname=
              (default tap0: attached if it exists, else created for the session), offload=on|off
              (default on: offer CSUM/GUEST_CSUM/HOST_TSO4/6/GUEST_TSO4/6 when the kernel can honour
              them; the virtio-net header goes through to the kernel with IFF_VNET_HDR), follow_mtu=
              on|off (default on: the TAP's MTU follows the host MTU QEMU gives the guest, host_mtu=),
              queues= (default 1; with --queue-pairs N, queues=N opens the TAP with IFF_MULTI_QUEUE,
              one queue per pair: an existing TAP must be made with `ip tuntap add ... multi_queue`)
  vxlan       tunnels the guest's frames to a remote VXLAN endpoint (RFC 7348, UDP; Linux's `vxlan`
              device interoperates); keys: remote= (required: the other end's IPv4 address), vni=
              (required, 0..16777215), local= (address to bind, default any), port= (UDP port listened
              on and sent to, default 4789; the source port is that same port), netns= (open the socket
              in that namespace); inner MTU is the underlay's minus 50 (1450 over 1500): larger frames
              are dropped (tx_too_big), never fragmented

examples:
  nicsim serve --socket /tmp/nicsim.sock
  nicsim serve --socket /tmp/a.sock --socket /tmp/b.sock --port generator,size=1500 --stats-file s.json
  nicsim serve --socket /tmp/a.sock --socket /tmp/b.sock --socket /tmp/c.sock --port switch \\
      --impair 'a.sock:tx:loss=10% seed=1' --impair 'b.sock:rx:delay=20ms jitter=2ms'
  nicsim serve --socket /tmp/nicsim.sock --queue-pairs 2   (QEMU: -netdev vhost-user,...,queues=2
      and -device virtio-net-pci,...,mq=on; a guest with 2 vCPUs then uses both pairs)
  nicsim serve --socket /tmp/nicsim.sock --pcap nicsim.pcapng; tcpdump -r nicsim.pcapng -nn -e
  ip netns add lab; ip -n lab tuntap add dev tap0 mode tap; ip -n lab addr add 10.0.2.2/24 dev tap0
  ip -n lab link set tap0 up; nicsim serve --socket /tmp/nicsim.sock --port tap,netns=lab,ifname=tap0
  nicsim serve --socket /tmp/nicsim.sock --port vxlan,remote=192.0.2.2,vni=42
  nicsim serve --socket /tmp/a.sock --socket /tmp/b.sock --port switch --uplink tap,netns=lab,ifname=tap0
  guests on two hosts, one switch each, joined by a VXLAN tunnel (host 192.0.2.1 and host 192.0.2.2):
    192.0.2.1$ nicsim serve --socket /tmp/a.sock --port switch --uplink vxlan,remote=192.0.2.2,vni=42
    192.0.2.2$ nicsim serve --socket /tmp/b.sock --port switch --uplink vxlan,remote=192.0.2.1,vni=42

  then start QEMU (under TCG add vectors=0: QEMU 7.2 crashes with vhost-user and MSI-X there):
    qemu-system-x86_64 -accel tcg -m 256 \\
      -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \\
      -chardev socket,id=c0,path=/tmp/nicsim.sock \\
      -netdev vhost-user,id=n0,chardev=c0 \\
      -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,vectors=0 ...
  share=on is required: without it the backend cannot see the guest's memory.
  With --client, QEMU listens instead: -chardev socket,id=c0,path=/tmp/nicsim.sock,server=on,wait=off
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the vhost-user virtio-net backend on one or more sockets",
        description="Serve a virtio-net device to QEMU guests over vhost-user, one device per connection, "
        "until SIGINT or SIGTERM; then shut down cleanly (every guest buffer returned, pools closed).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--socket", action="append", required=True, type=Path, metavar="PATH",
        help="a Unix socket to serve a guest on (repeat for several guests); nicsim listens there "
        "unless --client",
    )  # fmt: skip
    parser.add_argument(
        "--client", action="store_true",
        help="connect to each socket instead (QEMU listens: chardev server=on), retrying until it "
        "appears and again after each disconnect",
    )  # fmt: skip
    parser.add_argument(
        "--port", default="responder", metavar="NAME[,KEY=VALUE...]",
        help=f"what is on the other end of the wire: {', '.join(PORTS)} (default: responder; see below)",
    )
    parser.add_argument(
        "--queue-size", type=int, default=DEFAULT_MAX_QUEUE_SIZE, metavar="N",
        help=f"largest ring size accepted from the frontend (default: {DEFAULT_MAX_QUEUE_SIZE})",
    )
    parser.add_argument(
        "--queue-pairs", type=int, default=1, metavar="N",
        help="queue pairs each device offers (VIRTIO_NET_F_MQ, GET_QUEUE_NUM; default: 1); QEMU's "
        "-netdev vhost-user,queues=N and virtio-net-pci mq=on use up to N, the guest enables as many "
        "as it has vCPUs; every pair it enables is served, and they share the device's packet pool",
    )
    parser.add_argument(
        "--pool-size", type=int, default=4096, metavar="N",
        help="packet pool descriptors per device: guest buffers in flight at once (default: 4096)",
    )
    parser.add_argument(
        "--stats-interval", type=float, default=1.0, metavar="S",
        help="seconds between stats lines and stats-file rewrites (default: 1)",
    )
    parser.add_argument(
        "--stats-file", type=Path, metavar="FILE",
        help="JSON snapshot (pool usage/high_water, per-queue packets, bytes, drops, kicks, interrupts), "
        "rewritten atomically every interval and at exit",
    )
    parser.add_argument(
        "--config-space", action="store_true",
        help="offer VHOST_USER_PROTOCOL_F_CONFIG (GET_CONFIG reads the virtio-net config space) for a "
        "frontend that uses it; off by default: QEMU's virtio-net never does, and warns when offered",
    )  # fmt: skip
    parser.add_argument(
        "--burst-file", type=Path, metavar="FILE",
        help='on SIGUSR1, read {"rate_pps": R, "count": N} from FILE and start a burst of N frames at R '
        "on the generator (without it, SIGUSR1 only releases hold=on); nicsim bench --ndr's trials",
    )  # fmt: skip
    parser.add_argument(
        "--impair", action="append", default=[], metavar="SOCKET:DIR:SPEC",
        help="with --port switch: impair one direction of the port on SOCKET (its path or file name); "
        "DIR is tx (what that guest sends into the switch), rx (what the switch sends it) or both; "
        "SPEC is netem's words, space-separated: loss=10%% [burst model], delay=20ms jitter=2ms, "
        "reorder=, duplicate=, corrupt=, rate=10mbit, limit=1000, seed=1 (same seed, same fate)",
    )  # fmt: skip
    parser.add_argument(
        "--uplink", action="append", default=[], metavar="PORT[,KEY=VALUE...]",
        help="with --port switch: join a port that is not a guest to the switch, as switch port uplinkN "
        "(N counts --uplink options from 0); PORT is tap (tap,netns=NS[,ifname=tap0]: a TAP in that "
        "namespace) or vxlan (vxlan,remote=IP,vni=N[,local=IP,port=4789,netns=NS]: a tunnel to another "
        "host's nicsim switch or Linux vxlan device), with the keys of --port tap / --port vxlan; "
        "repeat for several; --impair names it uplinkN; its stats are in the switch section",
    )  # fmt: skip
    parser.add_argument(
        "--nice", type=int, default=0, metavar="N",
        help="run nicsim at this CPU priority, nice(1)'s 0 to 19, and its own session's autogroup too "
        "when it leads one: on a host with fewer cores than busy guests the guests come first (a guest "
        "flooding one that cannot keep up is then paced by its own ring instead of being taken and "
        "dropped on the other's time), at the cost of latency while every core is busy (default: 0)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no periodic stats lines, warnings only")
    parser.add_argument(
        "--engine", choices=("compiled", "numpy"), default="compiled",
        help="what walks the descriptor chains and tracks them in the pool: compiled (numba kernels "
        "for batches of good chains, numpy for the rest; about a third less CPU per round; falls "
        "back to numpy with a warning when numba is missing) or numpy (the reference path alone) "
        "(default: %(default)s)",
    )  # fmt: skip
    add_capture_arguments(parser)
    add_policy_arguments(parser)
    return parser


_CONFIGS: dict[str, type[Any]] = {
    "generator": GeneratorConfig, "responder": ResponderConfig, "tap": TapConfig, "sink": SinkConfig,
    "vxlan": VxlanConfig,
}  # fmt: skip
_BOOLS = {"on": True, "off": False, "1": True, "0": False, "yes": True, "no": False}


def _port_value(port: str, key: str, value: str, default: Any, known: str) -> Any:
    """One ``key=value`` of a port spec, typed like the key's default; the error names key and keys."""
    if isinstance(default, bool):
        if value not in _BOOLS:
            raise ValueError(f"port {port}: {key}={value!r}: use on or off (keys: {known})")
        return _BOOLS[value]
    if isinstance(default, str):
        return value
    kind = float if key == "rate_pps" else int
    try:
        return kind(value)
    except ValueError:
        what = "a number" if kind is float else "an integer"
        raise ValueError(f"port {port}: {key}={value!r} is not {what} (keys: {known})") from None


def _on_off(value: str) -> bool:
    if value not in _BOOLS:
        raise ValueError(value)
    return _BOOLS[value]


_SWITCH_KEYS: dict[str, Callable[[str], Any]] = {"ageing": float, "max_entries": int, "offload": _on_off,
                                                 "pace": _on_off}  # fmt: skip


UPLINK_PORTS = ("tap", "vxlan")


def parse_switch(spec: str, impairs: Sequence[str] = (), sockets: Sequence[Path] = (),
                 uplinks: Sequence[str] = (), *,
                 wrap_uplink: Callable[[str, Port], Port] | None = None) -> Switch:  # fmt: skip
    """The one :class:`Switch` of ``--port switch[,ageing=S,max_entries=N,offload=on|off,pace=on|off]``,
    its ports named after ``sockets``, its uplinks (``uplink0``... : the ports ``uplinks`` specify,
    opened now, each passed through ``wrap_uplink(name, port)`` first if given: the capture's
    wrapper) joined, and impaired as ``impairs`` (``SOCKET:DIR:SPEC`` each) say; ValueError says what
    is wrong (OSError: an uplink's TAP or socket could not be opened)."""
    _, *items = spec.split(",")
    kwargs: dict[str, Any] = {}
    known = ", ".join(_SWITCH_KEYS)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in _SWITCH_KEYS:
            raise ValueError(f"port switch: bad option {item!r} (known keys: {known})")
        try:
            kwargs[key] = _SWITCH_KEYS[key](value)
        except ValueError:
            what = "on or off" if _SWITCH_KEYS[key] is _on_off else "a number"
            raise ValueError(f"port switch: {key}={value!r} is not {what} (keys: {known})") from None
    for text in uplinks:
        if text.split(",", 1)[0] not in UPLINK_PORTS:
            kinds = " or ".join(UPLINK_PORTS)
            raise ValueError(f"--uplink {text!r}: an uplink is {kinds} (PORT,KEY=VALUE...)")
        if any(kv.startswith("queues=") and kv != "queues=1" for kv in text.split(",")[1:]):
            raise ValueError(f"--uplink {text!r}: an uplink reads one queue (no queues=)")
    switch = Switch(**kwargs)
    for path in sockets:
        switch.slot(str(path))  # ports numbered in --socket order, then the uplinks
    try:
        for i, text in enumerate(uplinks):
            name = f"uplink{i}"
            try:
                port = parse_port(text)
            except ValueError as err:
                raise ValueError(f"--uplink {text!r}: {err}") from None
            switch.uplink(name, port if wrap_uplink is None else wrap_uplink(name, port))
        names = [*map(str, sockets), *switch.uplinks]
        for text in impairs:
            where, _, rest = text.partition(":")
            direction, _, impairment = rest.partition(":")
            matches = [n for n in names if where in (n, Path(n).name)]
            if len(matches) != 1:
                count = "no" if not matches else "more than one"
                raise ValueError(f"--impair {text!r}: {where!r} names {count} --socket or uplink (give a "
                                 "socket's path or file name, or uplink0..., then :tx, :rx or :both, then "
                                 ":SPEC)")  # fmt: skip
            try:
                for way in DIRECTIONS if direction == "both" else (direction,):
                    switch.impair(matches[0], way, impairment)
            except ValueError as err:  # a bad direction or impairment key: say which --impair it was
                raise ValueError(f"--impair {text!r}: {err}") from None
    except BaseException:
        switch.close()  # the uplinks opened so far
        raise
    return switch


def parse_port(spec: str) -> Port:
    """Build a port from ``NAME[,key=value...]``; ValueError says what is wrong."""
    name, *items = spec.split(",")
    if name == "switch":
        return parse_switch(spec).port("check")
    if name not in PORTS:
        raise ValueError(f"unknown port {name!r}; built-in ports: {', '.join(PORTS)}")
    kwargs: dict[str, Any] = {}
    config_cls = _CONFIGS.get(name)
    fields = {f.name: f for f in dataclasses.fields(config_cls)} if config_cls else {}
    for item in items:
        key, sep, value = item.partition("=")
        if key == "rate":
            key = "rate_pps"
        if not sep or key not in fields:
            known = ", ".join(fields) or "none"
            raise ValueError(f"port {name}: bad option {item!r} (known keys: {known})")
        kwargs[key] = _port_value(name, key, value, fields[key].default, ", ".join(fields))
    if name == "generator":
        cfg = GeneratorConfig(**kwargs)
        if not 14 <= cfg.size <= 1514 + 4:
            raise ValueError(f"generator size={cfg.size}: a frame needs 14..1518 bytes")
        return GeneratorPort(cfg)
    if name == "responder":
        return ResponderPort(ResponderConfig(**kwargs))
    if name == "sink":
        return SinkPort(SinkConfig(**kwargs))
    if name == "tap":
        return TapPort(TapConfig(**kwargs))  # opens the TAP: TapError (an OSError) says why not
    if name == "vxlan":
        return VxlanPort(VxlanConfig(**kwargs))  # binds the socket: VxlanError (an OSError) says why not
    return PORTS[name]()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write then rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _summary(snap: dict[str, Any]) -> str:
    parts = []
    for q in snap.get("queues", []):
        parts.append(f"q{q['index']} {q['packets']}p/{q['kicks']}k/{q['interrupts']}i")
    pool = snap.get("pool", {})
    drops = snap.get("drops_total", 0)
    return f"{' '.join(parts) or 'no queues'} drops={drops} pool={pool.get('usage')}/{pool.get('high_water')}"


async def serve(args: argparse.Namespace, policy: NotifyPolicy) -> int:
    parse_port(args.port).close()  # refuse a bad --port before listening

    generators: list[GeneratorPort] = []
    # Opened before listening, so an unwritable capture file stops serve before any guest connects;
    # before the switch too, whose uplinks it wraps as they join.
    uplinks = args.uplink if _is_switch(args.port) else []
    want_capture = args.pcap is not None or bool(args.pcap_port)
    captures = Captures(args, list(args.socket), uplinks) if want_capture else None
    # One switch for every socket: each connection's device gets its own port on it.
    try:
        switch = (parse_switch(args.port, args.impair, args.socket, uplinks,
                               wrap_uplink=captures.wrap_uplink if captures is not None else None)
                  if _is_switch(args.port) else None)  # fmt: skip
    except BaseException:
        if captures is not None:
            captures.close()
        raise

    def make_device(socket: Path | None = None) -> VirtioNetDevice:
        if switch is not None:
            assert socket is not None, "each endpoint's factory is given its socket below"
            port: Port = switch.port(str(socket))
        else:
            port = parse_port(args.port)
        if isinstance(port, GeneratorPort):
            generators.append(port)
        if captures is not None:
            assert socket is not None, "each endpoint's factory is given its socket below"
            port = captures.wrap(port, socket)
        return VirtioNetDevice(port=port, pairs=args.queue_pairs, policy=policy,
                               pool=PacketPool(args.pool_size, name="virtio-net"))

    def start_generators() -> None:
        # SIGUSR1 releases a generator's hold (hold=on), or starts the burst --burst-file describes:
        # a benchmark trial's burst starts now.
        burst: dict[str, Any] = {}
        if args.burst_file is not None:
            try:
                burst = json.loads(args.burst_file.read_text())
                rate, count = float(burst["rate_pps"]), int(burst["count"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                print(f"nicsim serve: --burst-file {args.burst_file}: {err}; no burst", file=sys.stderr)
                return
            for gen in generators:
                gen.start(rate_pps=rate, count=count)
            return
        for gen in generators:
            gen.start()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, start_generators)
    server = Server(args.socket, make_device, client=args.client, max_queue_size=args.queue_size,
                    config_space=args.config_space)  # fmt: skip
    for ep in server.endpoints:  # each socket's devices know their socket: its capture interface
        ep.make_device = functools.partial(make_device, ep.path)
    try:
        await server.start()
        if switch is not None:
            switch.start_io(loop)  # the uplinks are read from now on, guest or no guest
        where = ", ".join(str(p) for p in args.socket)
        print(f"nicsim serve: {'connecting to' if args.client else 'listening on'} {where}; port {args.port}",
              file=sys.stderr, flush=True)  # fmt: skip
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.stats_interval)
            snap = _snapshot(server, captures, switch)
            if args.stats_file is not None:
                write_json_atomic(args.stats_file, snap)
            if not args.quiet and not stop.is_set():
                for ep in snap["sockets"]:
                    state = "up" if ep["connected"] else "idle"
                    print(f"{Path(ep['path']).name} [{state}] {_summary(ep)}", file=sys.stderr, flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        await server.close()
        if switch is not None:
            switch.close()
        if captures is not None:
            captures.close()
        if args.stats_file is not None:
            write_json_atomic(args.stats_file, _snapshot(server, captures, switch))
    if not args.quiet:
        if captures is not None:
            print(f"nicsim serve: capture: {captures.summary()}", file=sys.stderr, flush=True)
        print("nicsim serve: stopped", file=sys.stderr, flush=True)
    return 0


def _snapshot(server: Server, captures: Captures | None, switch: Switch | None) -> dict[str, Any]:
    snap = server.snapshot()
    snap["engine"] = kernels.engine()
    if captures is not None:
        snap["capture"] = captures.stats()
    if switch is not None:  # every port's counters, joined or not, and the forwarding table's
        snap["switch"] = switch.stats()
    return snap


def _is_switch(spec: str) -> bool:
    return spec.split(",", 1)[0] == "switch"


DEFAULT_LOG_LEVEL = logging.INFO  # connections and disconnections are what a person watches for


def run(args: argparse.Namespace) -> int:
    if args.quiet:
        logging.getLogger().setLevel(logging.WARNING)
    if args.stats_interval <= 0:
        print("nicsim serve: --stats-interval must be positive", file=sys.stderr)
        return 2
    if not 1 <= args.queue_pairs <= 128:  # vhost-user numbers rings 0..255
        print(f"nicsim serve: --queue-pairs {args.queue_pairs}: use 1..128", file=sys.stderr)
        return 2
    try:
        check_nice(args.nice)
        policy = policy_from_args(args)
        probe = parse_port(args.port)
        probe.close()
        tap_queues = probe.config.queues if isinstance(probe, TapPort) else 1
        if tap_queues > args.queue_pairs:
            # The kernel would steer flows to TAP queues no pair ever reads.
            raise ValueError(f"--port {args.port}: queues={tap_queues} needs --queue-pairs {tap_queues}")
        if _is_switch(args.port):
            parse_switch(args.port, args.impair, args.socket, args.uplink).close()
        elif args.impair or args.uplink:
            raise ValueError(f"{'--impair' if args.impair else '--uplink'} needs --port switch")
        if args.pcap is not None:
            config_from_args(args, args.pcap)
        uplink_names = [f"uplink{i}" for i in range(len(args.uplink))]
        for _, path in parse_port_captures(args.pcap_port, list(args.socket), uplink_names):
            config_from_args(args, path)
    except ValueError as err:
        print(f"nicsim serve: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the tap port's namespace or TAP cannot be opened
        print(f"nicsim serve: {err}", file=sys.stderr)
        return 1
    lowered = lower_priority(args.nice)
    if lowered and not args.quiet:
        print(f"nicsim serve: running at {' and '.join(lowered)}", file=sys.stderr)
    if args.engine == "compiled" and not _enable_kernels():
        print(f"nicsim serve: warning: {kernels.engine()}; slower, same results", file=sys.stderr)
    try:
        return asyncio.run(serve(args, policy))
    except (FileExistsError, OSError) as err:
        print(f"nicsim serve: {err}", file=sys.stderr)
        return 1


COMPILE_NOTICE_S = 3.0  # loading cached kernels takes about a second; much longer means numba compiles them


def _enable_kernels() -> bool:
    """``nicsim.ports.enable_kernels()`` (``rings``' kernels, the tap's rounds, the switch's
    forward), saying so when it takes long: numba compiles the kernels once after an install or a
    change to their sources (about 20 s here), and the socket appears only after it."""
    notice = threading.Timer(COMPILE_NOTICE_S, lambda: print(
        "nicsim serve: compiling the kernels (about 20 s, once after an install or a change; "
        "`./run setup` does it ahead)", file=sys.stderr, flush=True))  # fmt: skip
    notice.daemon = True
    notice.start()
    try:
        with interrupts_kept():
            return enable_kernels()
    finally:
        notice.cancel()
