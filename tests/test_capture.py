"""The capture writer, read back by ``tcpdump -r`` and by scapy: formats, snap length, directions,
interfaces, timestamps, rotation under a size limit, and failures (an unwritable path, a full file)."""

from __future__ import annotations

import functools
import json
import os
import resource
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from nicsim.ports.capture import (
    MAX_SNAPLEN,
    CaptureConfig,
    CaptureError,
    CaptureWriter,
    Direction,
    Format,
    rotated_name,
)
from nicsim.ports.capture.records import Scratch, copy_runs, pcap_records, pcapng_records
from nicsim.ports.frames import ip_bytes, mac_bytes, udp_frame
from tests.pcap_read import read_capture, tcpdump

GUEST, PEER = "52:54:00:12:34:56", "52:54:00:00:00:02"
T0 = 1_700_000_000_123_456_789  # a fixed clock, in ns


def frame(n: int, size: int = 60, *, src: str = GUEST, dst: str = PEER) -> bytes:
    """A UDP frame whose source port numbers it (1000 + n)."""
    return udp_frame(dst_mac=mac_bytes(dst), src_mac=mac_bytes(src), src_ip=ip_bytes("10.0.2.15"),
                     dst_ip=ip_bytes("10.0.2.2"), sport=1000 + n, dport=9, size=size)  # fmt: skip


def number(data: bytes) -> int:
    return int.from_bytes(data[34:36], "big") - 1000


def batch(frames: list[bytes], gap: int = 0) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64],
                                                        npt.NDArray[np.uint32]]:  # fmt: skip
    """Frames in one flat buffer, ``gap`` junk bytes before each (as a gathered batch has its headers)."""
    parts, offsets, at = [], [], 0
    for f in frames:
        parts.append(b"\xee" * gap + f)
        offsets.append(at + gap)
        at += gap + len(f)
    data = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
    return data, np.array(offsets, dtype=np.int64), np.array([len(f) for f in frames], dtype=np.uint32)


def writer(path: Path, **kwargs: object) -> CaptureWriter:
    clock = iter(range(T0, T0 + 10**12, 1000))
    return CaptureWriter(CaptureConfig(path=path, **kwargs), clock=lambda: next(clock))  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", list(Format))
def test_every_frame_reads_back_whole_in_order_through_both_readers(tmp_path: Path, fmt: Format) -> None:
    path = tmp_path / f"cap.{fmt}"
    frames = [frame(i, size=60 + 83 * i) for i in range(15)]  # 60..1222 bytes: every copy path below
    with writer(path, format=fmt) as w:
        w.add_interface("guest0")
        w.write(0, Direction.OUTBOUND, *batch(frames[:10], gap=12))
        w.write(0, Direction.OUTBOUND, *batch(frames[10:]))
    got = read_capture(path)
    assert [g.data for g in got] == frames
    assert [g.wirelen for g in got] == [len(f) for f in frames]
    header, dumped = tcpdump(path)
    assert "link-type EN10MB (Ethernet)" in header and f"snapshot length {MAX_SNAPLEN}" in header
    assert [d.length for d in dumped] == [len(f) for f in frames]
    assert {(d.src, d.dst) for d in dumped} == {(GUEST, PEER)}
    assert all(f"10.0.2.15.{1000 + i} > 10.0.2.2.9: UDP" in d.line for i, d in enumerate(dumped))


@pytest.mark.parametrize("fmt", list(Format))
def test_snap_length_keeps_the_first_bytes_and_the_original_length(tmp_path: Path, fmt: Format) -> None:
    path = tmp_path / "cap"
    frames = [frame(0, 60), frame(1, 100), frame(2, 101), frame(3, 1514)]
    with writer(path, format=fmt, snaplen=100) as w:
        w.add_interface("guest0")
        w.write(0, Direction.INBOUND, *batch(frames))
        assert w.stats()["truncated"] == 2
    got = read_capture(path)
    assert [g.data for g in got] == [f[:100] for f in frames]
    assert [g.wirelen for g in got] == [60, 100, 101, 1514]
    header, dumped = tcpdump(path)
    assert "snapshot length 100" in header
    assert [d.length for d in dumped] == [60, 100, 101, 1514]


def test_pcapng_marks_direction_and_interface_of_each_frame(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcapng"
    with writer(path) as w:
        a = w.add_interface("a.sock")
        w.write(a, Direction.OUTBOUND, *batch([frame(0), frame(1)]))
        b = w.add_interface("b.sock")  # added after packets of another interface: still readable
        w.write(b, Direction.INBOUND, *batch([frame(2, src=PEER, dst=GUEST)]))
        w.write_repeated(a, Direction.INBOUND, np.frombuffer(frame(3, src=PEER, dst=GUEST), np.uint8), 3)
        stats = w.stats()
    got = read_capture(path)
    assert [(number(g.data), g.interface, g.direction) for g in got] == [
        (0, "a.sock", 2), (1, "a.sock", 2), (2, "b.sock", 1), (3, "a.sock", 1), (3, "a.sock", 1),
        (3, "a.sock", 1),
    ]  # fmt: skip
    assert stats["interfaces"] == [{"name": "a.sock", "inbound": 3, "outbound": 2},
                                   {"name": "b.sock", "inbound": 1, "outbound": 0}]  # fmt: skip
    _, dumped = tcpdump(path)
    assert [(d.src, d.dst) for d in dumped] == [(GUEST, PEER)] * 2 + [(PEER, GUEST)] * 4


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("nanosecond", [False, True])
def test_timestamps_are_the_clock_at_the_resolution(tmp_path: Path, fmt: Format, nanosecond: bool) -> None:
    path = tmp_path / "cap"
    with writer(path, format=fmt, nanosecond=nanosecond) as w:
        w.add_interface("guest0")
        w.write(0, Direction.OUTBOUND, *batch([frame(0), frame(1)]))  # one clock reading: T0
        w.write(0, Direction.OUTBOUND, *batch([frame(2)]))  # T0 + 1 us
    expect = [T0, T0, T0 + 1000] if nanosecond else [T0 // 1000 * 1000] * 2 + [(T0 + 1000) // 1000 * 1000]
    assert [g.ts_ns for g in read_capture(path)] == expect
    precision = ("--time-stamp-precision=nano",) if nanosecond else ()
    _, dumped = tcpdump(path, "-tt", *precision)
    stamp = f"{T0 // 10**9}.{T0 % 10**9:09d}" if nanosecond else f"{T0 // 10**9}.{T0 % 10**9 // 1000:06d}"
    assert dumped[0].line.startswith(stamp + " ")


def test_pcap_holds_one_interface(tmp_path: Path) -> None:
    with writer(tmp_path / "cap.pcap", format=Format.PCAP) as w:
        w.add_interface("a")
        with pytest.raises(ValueError, match="one interface"):
            w.add_interface("b")


@pytest.mark.parametrize("fmt", list(Format))
def test_size_limit_rotates_into_a_bounded_set_of_files_each_readable(tmp_path: Path, fmt: Format) -> None:
    path = tmp_path / "cap"
    limit, files = 4000, 3
    sent = 0
    with writer(path, format=fmt, max_bytes=limit, files=files) as w:
        w.add_interface("guest0")
        for size in (60, 600, 1514, 200, 60, 1000, 300, 1514, 80):
            w.write(0, Direction.OUTBOUND, *batch([frame(sent + i, size) for i in range(3)]))
            sent += 3
        rotations = w.stats()["rotations"]
    assert rotations >= files  # enough to have dropped the oldest file at least once
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cap", "cap.1", "cap.2"]
    numbers: list[int] = []
    for k in reversed(range(files)):  # oldest first
        f = rotated_name(path, k)
        assert f.stat().st_size <= limit
        got = read_capture(f)
        assert got, f"{f.name} holds no frame"
        _, dumped = tcpdump(f)
        assert [d.length for d in dumped] == [g.wirelen for g in got]
        numbers += [number(g.data) for g in got]
    # The newest files hold the most recent frames, contiguous and in order, up to the last one sent.
    assert numbers == list(range(sent - len(numbers), sent))


def test_a_frame_larger_than_the_limit_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "cap"
    with writer(path, format=Format.PCAP, max_bytes=500, files=4) as w:
        w.add_interface("guest0")
        w.write(0, Direction.OUTBOUND, *batch([frame(0, 60), frame(1, 1514), frame(2, 60)]))
    assert [number(g.data) for g in read_capture(rotated_name(path, 2))] == [0]
    assert [number(g.data) for g in read_capture(rotated_name(path, 1))] == [1]
    assert [number(g.data) for g in read_capture(path)] == [2]


def test_rotation_repeats_every_interface_description(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcapng"
    with writer(path, max_bytes=1500, files=2) as w:
        w.add_interface("a")
        b = w.add_interface("b")
        for i in range(12):
            w.write(b, Direction.INBOUND, *batch([frame(i, 200)]))
    assert {g.interface for g in read_capture(path)} == {"b"}
    assert {g.interface for g in read_capture(rotated_name(path, 1))} == {"b"}


def test_an_unwritable_path_is_refused_with_its_name(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "cap.pcapng"
    with pytest.raises(CaptureError, match="no-such-dir") as info:
        CaptureWriter(CaptureConfig(path=missing))
    assert info.value.path == missing
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"snaplen": 0}, "snap length"), ({"snaplen": MAX_SNAPLEN + 1}, "snap length"),
    ({"max_bytes": -1}, "size limit"), ({"files": 0}, "at least 1"),
])  # fmt: skip
def test_bad_options_say_which(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CaptureConfig(path=tmp_path / "x", **kwargs)  # type: ignore[arg-type]


def _with_file_size_limit(limit: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()`` in a forked child under a file-size limit (writes past it fail with EFBIG instead of
    raising SIGXFSZ). A child, because the limit is per process and would also fail the test runner's
    own output when that is a file; the result comes back through a pipe, which has no such limit."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest, never write to a file-backed stdout
        os.close(r)
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            out = json.dumps(fn(), default=str)
        except BaseException as err:  # handed to the parent
            out = json.dumps({"child_error": repr(err)})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    assert "child_error" not in result, result
    return result


def test_a_failed_write_stops_capture_and_counts_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    limit = 2000

    def capture_past_the_limit() -> dict[str, Any]:
        with writer(path, format=Format.PCAP) as w:
            w.add_interface("guest0")
            w.write(0, Direction.OUTBOUND, *batch([frame(0, 1000)]))
            w.write(0, Direction.OUTBOUND, *batch([frame(1, 1000), frame(2, 1000)]))  # past the limit
            w.write(0, Direction.OUTBOUND, *batch([frame(3, 60)]))  # capture has stopped
            return dict(w.stats())

    stats = _with_file_size_limit(limit, capture_past_the_limit)
    assert "File too large" in stats["error"]
    assert stats["not_written"] == 3
    assert stats["frames"] == 1
    assert os.path.getsize(path) <= limit
    assert [number(g.data) for g in read_capture(path)] == [0]  # the half-written record was cut off
    assert len(tcpdump(path)[1]) == 1


def test_frames_outside_the_buffer_are_refused(tmp_path: Path) -> None:
    with writer(tmp_path / "cap") as w:
        w.add_interface("guest0")
        data, offsets, lengths = batch([frame(0)])
        with pytest.raises(ValueError, match="outside"):
            w.write(0, Direction.OUTBOUND, data, offsets + 1, lengths)
        with pytest.raises(ValueError, match="never added"):
            w.write(1, Direction.OUTBOUND, data, offsets, lengths)


@pytest.mark.parametrize("gap", [0, 5])
@pytest.mark.parametrize("case", ["regular", "template", "short", "short-in-order", "long", "mixed"])
def test_copy_runs_matches_a_copy_per_run(case: str, gap: int) -> None:
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 50_000, dtype=np.uint8)
    n = 40
    if case == "regular":
        lens = np.full(n, 64)
        src = np.arange(n) * 76 + 12
    elif case == "template":
        lens = np.full(n, 60)
        src = np.zeros(n, dtype=np.int64)
    elif case == "short-in-order":  # a gathered batch: in order, some runs touching the next
        lens = rng.integers(1, 60, n)
        src = np.cumsum(lens + rng.integers(0, 3, n)) - lens
    else:  # anywhere, overlapping or not
        lo, hi = {"short": (1, 60), "long": (400, 1200), "mixed": (1, 1200)}[case]
        lens = rng.integers(lo, hi, n)
        src = rng.integers(0, data.shape[0] - hi, n)
    lens, src = lens.astype(np.int64), src.astype(np.int64)
    dst = np.cumsum(lens + gap) - lens  # gap bytes between runs, left alone
    out = np.zeros(int(dst[-1] + lens[-1]), dtype=np.uint8)
    expect = out.copy()
    for s, d, k in zip(src, dst, lens, strict=True):
        expect[d : d + k] = data[s : s + k]
    copy_runs(out, dst, data, src, lens)
    assert np.array_equal(out, expect)


def test_pcapng_padding_is_zero_even_in_a_reused_buffer() -> None:
    scratch = Scratch()
    scratch.take(4096)[:] = 0xFF  # what an earlier batch left behind
    frames = [frame(0, 61), frame(1, 62), frame(2, 63), frame(3, 64)]
    rec = pcapng_records(*batch(frames), snaplen=MAX_SNAPLEN, ts_ns=T0, nanosecond=False, interface=0,
                         direction=Direction.OUTBOUND, scratch=scratch)  # fmt: skip
    raw = rec.data.tobytes()
    at = 0
    for f in frames:
        size = int.from_bytes(raw[at + 4 : at + 8], "little")
        body = raw[at + 28 : at + 28 + (len(f) + 3) // 4 * 4]
        assert body == f + b"\0" * (-len(f) % 4)
        assert raw[at + size - 4 : at + size] == size.to_bytes(4, "little")
        at += size
    assert at == len(raw)


@pytest.mark.parametrize("fmt", list(Format))
@pytest.mark.parametrize("snaplen", [MAX_SNAPLEN, 61])
def test_a_batch_of_one_is_built_byte_for_byte_as_in_a_bigger_batch(fmt: Format, snaplen: int) -> None:
    frames = [frame(0, 60), frame(1, 61), frame(2, 62), frame(3, 63), frame(4, 1514)]
    build = pcap_records if fmt is Format.PCAP else functools.partial(
        pcapng_records, interface=3, direction=Direction.INBOUND)  # fmt: skip
    whole = build(*batch(frames, gap=12), snaplen=snaplen, ts_ns=T0, nanosecond=True)
    ones = [build(*batch([f], gap=12), snaplen=snaplen, ts_ns=T0, nanosecond=True) for f in frames]
    assert b"".join(one.data.tobytes() for one in ones) == whole.data.tobytes()
    assert [int(one.ends[0]) for one in ones] == np.diff(whole.ends, prepend=0).tolist()
    assert sum(one.truncated for one in ones) == whole.truncated == (3 if snaplen == 61 else 0)
