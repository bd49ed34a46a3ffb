"""``nicsim serve --pcap FILE``: the capture options, the files they open, and the closing summary.

This module owns the mapping from sockets and a switch's uplinks to capture files: with pcapng (the
default) one file holds them all, each socket an interface named after its socket file and each
uplink one named after it and its kind (``uplink0 (tap)``); with pcap, which has no interfaces, a
single socket writes ``FILE`` and several captured ports each write their own file, the socket's or
uplink's name inserted before the suffix (``cap.pcap`` -> ``cap-a.pcap`` for ``a.sock``,
``cap-uplink0.pcap``). The writers live for the whole run, across the guests that connect and
disconnect; each device's port and each uplink's port is wrapped by
:func:`nicsim.ports.capture.capturing` (an uplink's directions seen from the network's side, so that
on every interface outbound is into the switch). Without ``--pcap`` nothing here runs and no port is
wrapped.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nicsim.ports import Port
from nicsim.ports.capture import MAX_SNAPLEN, CaptureConfig, CaptureWriter, Direction, Format, capturing

FORMATS = [f.value for f in Format]


def add_capture_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "capture",
        "write every frame each guest sends (outbound) and receives (inbound), and every frame "
        "a switch's --uplink carries, to a file that tcpdump -r and Wireshark read",
    )
    group.add_argument(
        "--pcap",
        type=Path,
        metavar="FILE",
        help="capture into FILE (overwritten); pcapng: one interface per --socket, named after it, and "
        "one per --uplink (uplinkN (tap|vxlan)), each frame's direction from the guest's side or the "
        "network's (outbound: into the switch); pcap: one file per socket and uplink when there are "
        "several (FILE's name plus -SOCKET or -uplinkN), no direction",
    )
    group.add_argument(
        "--pcap-port",
        action="append",
        default=[],
        metavar="PORT=FILE",
        help="capture one port on its own into FILE (repeatable; with or without --pcap): PORT is a "
        "--socket (its path or file name) or uplinkN; one interface, in --pcap-format",
    )
    group.add_argument(
        "--pcap-format", choices=FORMATS, default=Format.PCAPNG.value, help="file format (default: pcapng)"
    )
    group.add_argument(
        "--snaplen",
        type=int,
        default=MAX_SNAPLEN,
        metavar="N",
        help=f"bytes kept of each frame; the original length is recorded too (default: {MAX_SNAPLEN})",
    )
    group.add_argument(
        "--pcap-max-mb",
        type=float,
        default=0.0,
        metavar="N",
        help="rotate when FILE would pass N million bytes: FILE becomes FILE.1, FILE.1 becomes FILE.2, "
        "...; every file starts with its own header (default: 0, no limit)",
    )
    group.add_argument(
        "--pcap-files",
        type=int,
        default=2,
        metavar="K",
        help="with --pcap-max-mb, keep at most K files: FILE and FILE.1 .. FILE.(K-1) (default: 2)",
    )
    group.add_argument("--pcap-ns", action="store_true", help="nanosecond timestamps (default: microseconds)")


def config_from_args(args: argparse.Namespace, path: Path) -> CaptureConfig:
    """The capture settings for ``path``; ValueError says which option is wrong."""
    if args.pcap_max_mb < 0:
        raise ValueError(f"--pcap-max-mb {args.pcap_max_mb:g}: use 0 (no limit) or a positive size")
    if args.pcap_files < 1:
        raise ValueError(f"--pcap-files {args.pcap_files}: keep at least 1 file")
    if not 1 <= args.snaplen <= MAX_SNAPLEN:
        raise ValueError(f"--snaplen {args.snaplen}: use 1..{MAX_SNAPLEN}")
    return CaptureConfig(
        path=path,
        format=Format(args.pcap_format),
        snaplen=args.snaplen,
        max_bytes=int(args.pcap_max_mb * 1e6),
        files=args.pcap_files,
        nanosecond=args.pcap_ns,
    )


def interface_names(sockets: list[Path]) -> list[str]:
    """Each socket's name in a capture: its file name, or its whole path when two file names clash."""
    names = [s.name for s in sockets]
    return names if len(set(names)) == len(names) else [str(s) for s in sockets]


def uplink_interface(name: str, spec: str) -> str:
    """An uplink's interface in a capture: its switch port's name and its kind (``uplink0 (tap)``)."""
    return f"{name} ({spec.split(',', 1)[0]})"


def pcap_paths(path: Path, sockets: Sequence[Path], uplinks: Sequence[str] = ()) -> list[Path]:
    """One pcap file per socket, then per uplink (its name): ``path`` itself for a single one, else the
    socket's stem or the uplink's name inserted (indices if two clash)."""
    stems = [s.stem for s in sockets] + list(uplinks)
    if len(stems) == 1:
        return [path]
    if len(set(stems)) != len(stems):
        stems = [str(i) for i in range(len(stems))]
    return [path.with_name(f"{path.stem}-{stem}{path.suffix}") for stem in stems]


class Captures:
    """The capture files of one ``nicsim serve`` run: the writer and interface of each socket, and of
    each uplink (``uplinks``: the ``--uplink`` specs, switch ports ``uplink0``... in that order)."""

    def __init__(self, args: argparse.Namespace, sockets: list[Path], uplinks: Sequence[str] = ()) -> None:
        self.writers: list[CaptureWriter] = []
        self._by_port: dict[Path | str, list[tuple[CaptureWriter, int]]] = {}
        uplink_names = [f"uplink{i}" for i in range(len(uplinks))]
        keys: list[Path | str] = [*sockets, *uplink_names]
        names = interface_names(sockets) + [
            uplink_interface(n, u) for n, u in zip(uplink_names, uplinks, strict=True)
        ]
        own = parse_port_captures(args.pcap_port, sockets, uplink_names)  # before any file is opened
        try:
            self._open_shared(args, keys, names, uplink_names, sockets)
            for key, path in own:
                writer = CaptureWriter(config_from_args(args, path))
                self.writers.append(writer)
                self._add(key, writer, writer.add_interface(names[keys.index(key)]))
        except BaseException:
            self.close()
            raise

    def _add(self, key: Path | str, writer: CaptureWriter, interface: int) -> None:
        self._by_port.setdefault(key, []).append((writer, interface))

    def _open_shared(
        self,
        args: argparse.Namespace,
        keys: list[Path | str],
        names: list[str],
        uplink_names: list[str],
        sockets: list[Path],
    ) -> None:
        """``--pcap``: every port, in one pcapng or a pcap file each."""
        if args.pcap is None:
            return
        if args.pcap_format == Format.PCAP.value:
            paths = pcap_paths(args.pcap, sockets, uplink_names)
            for key, name, path in zip(keys, names, paths, strict=True):
                writer = CaptureWriter(config_from_args(args, path))
                self.writers.append(writer)
                self._add(key, writer, writer.add_interface(name))
        else:
            writer = CaptureWriter(config_from_args(args, args.pcap))
            self.writers.append(writer)
            for key, name in zip(keys, names, strict=True):
                self._add(key, writer, writer.add_interface(name))

    def wrap(self, port: Port, socket: Path) -> Port:
        """A guest's port on ``socket``, captured from the guest's side (once per file it goes to)."""
        for writer, interface in self._by_port.get(socket, ()):
            port = capturing(port, writer, interface)
        return port

    def wrap_uplink(self, name: str, port: Port) -> Port:
        """The port of uplink ``name`` (``uplink0``...), captured from the network's side: what the
        switch sends out of it is inbound, what comes in outbound (into the switch, as for a guest)."""
        for writer, interface in self._by_port.get(name, ()):
            port = capturing(port, writer, interface, transmit_as=Direction.INBOUND)
        return port

    def stats(self) -> list[dict[str, Any]]:
        return [w.stats() for w in self.writers]

    def summary(self) -> str:
        """The closing note: what was captured where, and what it cost."""
        parts = []
        for s in self.stats():
            line = f"{s['frames']} frames in {s['path']} ({s['format']}"
            if s["truncated"]:
                line += f", {s['truncated']} cut to the snap length"
            if s["rotations"]:
                line += f", {s['rotations']} rotations"
            line += f"), {s['busy_ms']:.1f} ms spent capturing"
            if "error" in s:
                line += f"; stopped: {s['error']} ({s['not_written']} frames not written)"
            parts.append(line)
        return "; ".join(parts)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def parse_port_captures(
    specs: Sequence[str], sockets: Sequence[Path], uplinks: Sequence[str]
) -> list[tuple[Path | str, Path]]:
    """``--pcap-port PORT=FILE`` options as (socket or uplink name, file); ValueError names the bad one."""
    out: list[tuple[Path | str, Path]] = []
    for spec in specs:
        where, sep, file = spec.rpartition("=")
        if not sep or not where or not file:
            raise ValueError(f"--pcap-port {spec!r}: give PORT=FILE (a --socket or uplinkN, then the file)")
        key: Path | str | None = where if where in uplinks else None
        if key is None:
            found = [s for s in sockets if str(s) == where or s.name == where]
            if len(found) != 1:
                known = ", ".join([*(s.name for s in sockets), *uplinks])
                raise ValueError(
                    f"--pcap-port {spec!r}: {where!r} names {len(found)} ports; the ports: {known}"
                )
            key = found[0]
        out.append((key, Path(file)))
    return out
