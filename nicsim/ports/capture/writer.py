"""A capture file being written: its interfaces, its size limit and rotation, and what it cost.

This module owns :class:`CaptureWriter`, which turns batches of frames into records
(:mod:`nicsim.ports.capture.records`) and writes each batch with one ``write`` to an unbuffered file,
so the file is readable (``tcpdump -r``) while nicsim runs and complete up to the last batch if it is
killed. The writer outlives the ports that feed it: ``nicsim serve`` keeps one for its whole run while
guests connect and disconnect, and each socket's port writes as its own interface.

Rotation (``max_bytes``), in the style of logrotate: when the next record would take ``FILE`` past the
limit, ``FILE.{files-2}`` becomes ``FILE.{files-1}`` (the oldest, ``FILE.{files-1}``, is replaced), ...,
``FILE`` becomes ``FILE.1``, and a fresh ``FILE`` starts with its own file header (and, for pcapng,
every interface's description), so every file reads on its own and ``FILE`` is always the newest.
At most ``files`` files exist. Batches are cut on record boundaries; a single record larger than the
limit gets a file to itself.

A write that fails at run time (a full disk) does not stop the device: capture stops, the error is
logged once, the file is cut back to its last whole record, and the frames of that batch and of every
batch after it are counted as ``not_written``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.errors import LocalError
from nicsim.ports.capture.records import (
    MAX_SNAPLEN,
    Direction,
    Format,
    Records,
    Scratch,
    interface_description,
    pcap_file_header,
    pcap_records,
    pcapng_records,
    repeated,
    section_header,
)

log = logging.getLogger(__name__)


class CaptureError(LocalError, OSError):
    """A capture file that cannot be created or written (also an OSError); ``path`` names it."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True, kw_only=True)
class CaptureConfig:
    """What to capture into: ``path``; ``format`` pcap or pcapng; ``snaplen``, the bytes kept of each
    frame (its original length is recorded too); ``max_bytes`` (0: no limit) and ``files``, the size at
    which ``path`` rotates and how many files are kept; ``nanosecond`` timestamps instead of micro."""

    path: Path
    format: Format = Format.PCAPNG
    snaplen: int = MAX_SNAPLEN
    max_bytes: int = 0
    files: int = 2
    nanosecond: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.snaplen <= MAX_SNAPLEN:
            raise ValueError(f"snap length {self.snaplen}: use 1..{MAX_SNAPLEN}")
        if self.max_bytes < 0:
            raise ValueError(f"size limit {self.max_bytes}: use 0 (none) or a positive number of bytes")
        if self.files < 1:
            raise ValueError(f"files {self.files}: keep at least 1")


def rotated_name(path: Path, k: int) -> Path:
    """``path`` for k = 0, else ``path.k``: the k-th newest file of a rotation."""
    return path if k == 0 else path.with_name(f"{path.name}.{k}")


@dataclass
class _Counters:
    frames: int = 0
    bytes: int = 0          # record bytes written, file headers included
    truncated: int = 0      # frames cut to the snap length
    rotations: int = 0
    not_written: int = 0    # frames offered after a write failed
    busy_ns: int = 0        # time spent building and writing records
    per_interface: list[list[int]] = field(default_factory=list)  # [inbound, outbound] frames


class CaptureWriter:
    """Writes frames of one or more interfaces into one capture file (pcapng; pcap has exactly one
    interface). Not thread-safe: the event loop's thread calls it. Close it when done (idempotent)."""

    def __init__(self, config: CaptureConfig, *, clock: Callable[[], int] = time.time_ns,
                 application: str = "nicsim") -> None:  # fmt: skip
        self.config = config
        self._clock = clock
        self._application = application
        self._interfaces: list[str] = []
        self._counters = _Counters()
        self._file_bytes = 0
        self._file_records = 0
        self._failed: str | None = None
        self._scratch = Scratch()
        self._repeat_scratch = Scratch()  # a repeated record is copied out of _scratch into this
        self._fh = self._open()

    # -- interfaces -----------------------------------------------------------------------------------

    @property
    def interfaces(self) -> tuple[str, ...]:
        return tuple(self._interfaces)

    def add_interface(self, name: str) -> int:
        """Describe one more interface (a port); returns its index for :meth:`write`."""
        if self.config.format is Format.PCAP and self._interfaces:
            have = self._interfaces[0]
            raise ValueError(f"a pcap file holds one interface; {self.config.path} has {have!r}")
        self._interfaces.append(name)
        self._counters.per_interface.append([0, 0])
        if self.config.format is Format.PCAPNG:
            # An IDB may follow packets of other interfaces: a reader only needs it before its own.
            cfg = self.config
            self._write_raw(interface_description(name, cfg.snaplen, nanosecond=cfg.nanosecond))
        return len(self._interfaces) - 1

    # -- frames ---------------------------------------------------------------------------------------

    def write(self, interface: int, direction: Direction, data: npt.NDArray[np.uint8],
              offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.uint32]) -> None:  # fmt: skip
        """Capture frames ``data[offsets[i]:][:lengths[i]]``, all seen now, in this order."""
        self._write(interface, direction, data, offsets, lengths, repeat=1)

    def write_repeated(self, interface: int, direction: Direction, frame: npt.NDArray[np.uint8],
                       count: int) -> None:  # fmt: skip
        """Capture ``frame`` ``count`` times (a template delivered to ``count`` buffers): one record,
        repeated, since every copy has the same bytes and the batch's one timestamp."""
        if count <= 0:
            return
        one = np.zeros(1, dtype=np.int64)
        length = np.array([frame.shape[0]], dtype=np.uint32)
        self._write(interface, direction, frame, one, length, repeat=count)

    def _write(self, interface: int, direction: Direction, data: npt.NDArray[np.uint8],
               offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.uint32], *,
               repeat: int) -> None:  # fmt: skip
        n = int(lengths.shape[0]) * repeat
        if n == 0:
            return
        if interface < 0 or interface >= len(self._interfaces):
            raise ValueError(f"interface {interface} was never added ({len(self._interfaces)} are)")
        if self._failed is not None:
            self._counters.not_written += n
            return
        began = time.perf_counter_ns()
        cfg = self.config
        if cfg.format is Format.PCAPNG:
            records = pcapng_records(
                data, offsets, lengths, snaplen=cfg.snaplen, ts_ns=self._clock(),
                nanosecond=cfg.nanosecond, interface=interface, direction=direction, scratch=self._scratch,
            )  # fmt: skip
        else:
            records = pcap_records(data, offsets, lengths, snaplen=cfg.snaplen, ts_ns=self._clock(),
                                   nanosecond=cfg.nanosecond, scratch=self._scratch)  # fmt: skip
        if repeat > 1:
            records = repeated(records, repeat, self._repeat_scratch)
        c = self._counters
        if not self._write_records(records):
            c.not_written += n
            return
        c.frames += n
        c.truncated += records.truncated * repeat
        c.per_interface[interface][0 if direction is Direction.INBOUND else 1] += n
        c.busy_ns += time.perf_counter_ns() - began

    # -- files ----------------------------------------------------------------------------------------

    def _file_header(self) -> bytes:
        cfg = self.config
        if cfg.format is Format.PCAP:
            return pcap_file_header(cfg.snaplen, nanosecond=cfg.nanosecond)
        idbs = b"".join(interface_description(name, cfg.snaplen, nanosecond=cfg.nanosecond)
                        for name in self._interfaces)  # fmt: skip
        return section_header(self._application) + idbs

    def _open(self) -> Any:
        path = self.config.path
        try:
            fh = open(path, "wb", buffering=0)  # noqa: SIM115 - held open until close()
        except OSError as err:
            raise CaptureError(f"capture file {path}: {err.strerror or err}", path=path) from err
        self._file_bytes = self._file_records = 0
        try:
            self._write_to(fh, self._file_header())
        except OSError as err:
            fh.close()
            raise CaptureError(f"capture file {path}: {err.strerror or err}", path=path) from err
        return fh

    def _rotate(self) -> None:
        self._fh.close()
        path = self.config.path
        for k in range(self.config.files - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(rotated_name(path, k - 1), rotated_name(path, k))
        self._counters.rotations += 1
        self._fh = self._open()

    def _write_to(self, fh: Any, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view.nbytes:
            done = fh.write(view)
            view = view[done:]
        self._file_bytes += len(data)
        self._counters.bytes += len(data)

    def _write_raw(self, data: bytes) -> None:
        if self._failed is None:
            try:
                self._write_to(self._fh, data)
            except OSError as err:
                self._fail(err)

    def _write_records(self, records: Records) -> bool:
        """Write the batch (rotating as the limit says); False if a write failed and capture stopped."""
        limit = self.config.max_bytes
        buf, ends = records.data, records.ends
        try:
            if not limit or self._file_bytes + buf.shape[0] <= limit:
                self._write_to(self._fh, memoryview(buf.data))
                self._file_records += ends.shape[0]
                return True
            done = 0  # records of this batch written so far
            while done < ends.shape[0]:
                base = int(ends[done - 1]) if done else 0
                room = limit - self._file_bytes
                # How many of the remaining records fit in the room left in this file.
                fit = int(np.searchsorted(ends[done:] - base, room, side="right"))
                if fit == 0:
                    if self._file_records:
                        self._rotate()
                        continue
                    fit = 1  # a record bigger than the limit: alone in its file
                stop = int(ends[done + fit - 1])
                self._write_to(self._fh, memoryview(buf[base:stop].data))
                self._file_records += fit
                done += fit
        except (OSError, CaptureError) as err:
            self._fail(err)
            return False
        return True

    def _fail(self, err: OSError) -> None:
        self._failed = str(err)
        # Cut a half-written record off, so the file still reads to its end.
        with contextlib.suppress(OSError, ValueError):
            self._fh.truncate(self._file_bytes)
        log.warning("capture stopped: %s: %s", self.config.path, err)

    # -- lifecycle ------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        c = self._counters
        out: dict[str, Any] = {
            "path": str(self.config.path), "format": str(self.config.format), "frames": c.frames,
            "bytes": c.bytes, "truncated": c.truncated, "rotations": c.rotations,
            "busy_ms": round(c.busy_ns / 1e6, 3),
            "interfaces": [{"name": name, "inbound": io[0], "outbound": io[1]}
                           for name, io in zip(self._interfaces, c.per_interface, strict=True)],
        }  # fmt: skip
        if self._failed is not None:
            out["error"] = self._failed
            out["not_written"] = c.not_written
        return out

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
