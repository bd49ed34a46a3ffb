"""``nicsim serve --pcap FILE``: the capture options, the files they open, and the closing summary.

This module owns the mapping from sockets to capture files: with pcapng (the default) one file holds
every socket, each socket an interface named after its socket file; with pcap, which has no
interfaces, a single socket writes ``FILE`` and several sockets each write their own file, the
socket's name inserted before the suffix (``cap.pcap`` -> ``cap-a.pcap`` for ``a.sock``). The writers
live for the whole run, across the guests that connect and disconnect; each device's port is wrapped
by :func:`nicsim.ports.capture.capturing`. Without ``--pcap`` nothing here runs and no port is wrapped.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nicsim.ports import Port
from nicsim.ports.capture import MAX_SNAPLEN, CaptureConfig, CaptureWriter, Format, capturing

FORMATS = [f.value for f in Format]


def add_capture_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "capture", "write every frame each guest sends (outbound) and receives (inbound) to a file that "
        "tcpdump -r and Wireshark read",
    )  # fmt: skip
    group.add_argument(
        "--pcap", type=Path, metavar="FILE",
        help="capture into FILE (overwritten); pcapng: one interface per --socket, named after it, and "
        "each frame's direction from the guest's side; pcap: one file per socket when there are several "
        "(FILE's name plus -SOCKET), no direction",
    )  # fmt: skip
    group.add_argument("--pcap-format", choices=FORMATS, default=Format.PCAPNG.value,
                       help="file format (default: pcapng)")  # fmt: skip
    group.add_argument(
        "--snaplen", type=int, default=MAX_SNAPLEN, metavar="N",
        help=f"bytes kept of each frame; the original length is recorded too (default: {MAX_SNAPLEN})",
    )
    group.add_argument(
        "--pcap-max-mb", type=float, default=0.0, metavar="N",
        help="rotate when FILE would pass N million bytes: FILE becomes FILE.1, FILE.1 becomes FILE.2, "
        "...; every file starts with its own header (default: 0, no limit)",
    )  # fmt: skip
    group.add_argument(
        "--pcap-files", type=int, default=2, metavar="K",
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
    return CaptureConfig(path=path, format=Format(args.pcap_format), snaplen=args.snaplen,
                         max_bytes=int(args.pcap_max_mb * 1e6), files=args.pcap_files,
                         nanosecond=args.pcap_ns)  # fmt: skip


def interface_names(sockets: list[Path]) -> list[str]:
    """Each socket's name in a capture: its file name, or its whole path when two file names clash."""
    names = [s.name for s in sockets]
    return names if len(set(names)) == len(names) else [str(s) for s in sockets]


def pcap_paths(path: Path, sockets: list[Path]) -> list[Path]:
    """One pcap file per socket: ``path`` itself for one socket, else the socket's stem inserted."""
    if len(sockets) == 1:
        return [path]
    stems = [s.stem for s in sockets]
    if len(set(stems)) != len(stems):
        stems = [str(i) for i in range(len(sockets))]
    return [path.with_name(f"{path.stem}-{stem}{path.suffix}") for stem in stems]


class Captures:
    """The capture files of one ``nicsim serve`` run: the writer and interface of each socket."""

    def __init__(self, args: argparse.Namespace, sockets: list[Path]) -> None:
        self.writers: list[CaptureWriter] = []
        self._by_socket: dict[Path, tuple[CaptureWriter, int]] = {}
        names = interface_names(sockets)
        try:
            if args.pcap_format == Format.PCAP.value:
                for sock, name, path in zip(sockets, names, pcap_paths(args.pcap, sockets), strict=True):
                    writer = CaptureWriter(config_from_args(args, path))
                    self.writers.append(writer)
                    self._by_socket[sock] = (writer, writer.add_interface(name))
            else:
                writer = CaptureWriter(config_from_args(args, args.pcap))
                self.writers.append(writer)
                for sock, name in zip(sockets, names, strict=True):
                    self._by_socket[sock] = (writer, writer.add_interface(name))
        except BaseException:
            self.close()
            raise

    def wrap(self, port: Port, socket: Path) -> Port:
        writer, interface = self._by_socket[socket]
        return capturing(port, writer, interface)

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
