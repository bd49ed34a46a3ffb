"""The paced sender of --ndr's qemu-tap trials: exactly ``count`` frames on a clock schedule, a refused
send counted as an offered frame lost, and the frame every other backend sends the guest."""

from __future__ import annotations

import errno

from nicsim.bench import blaster
from nicsim.bench.paced import BURST, paced


class Clock:
    """A fake monotonic clock that ``sleep`` advances, so pacing is checked without timing anything."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sends: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


def test_paced_sender_offers_exactly_count_frames_on_the_clock_schedule() -> None:
    clock = Clock()
    out = paced(lambda: clock.sends.append(clock.now), 2000.0, 100,
                sleep=clock.sleep, monotonic=clock.monotonic)  # fmt: skip
    assert out["offered"] == out["sent"] == len(clock.sends) == 100 and out["errors"] == 0
    # Burst k is due at k * BURST / pps: frames 0..31 at 0, 32..63 at 16 ms, ...
    starts = [clock.sends[i] for i in range(0, 100, BURST)]
    assert starts == [k * BURST / 2000.0 for k in range(len(starts))]
    assert out["achieved_pps"] == round(100 / (96 / 2000.0), 1)


def test_a_refused_send_is_an_offered_frame_lost() -> None:
    clock = Clock()
    calls = [0]

    def send() -> None:
        calls[0] += 1
        if calls[0] % 10 == 0:
            raise OSError(errno.ENOBUFS, "No buffer space available")

    out = paced(send, 1000.0, 40, sleep=clock.sleep, monotonic=clock.monotonic)
    assert out == {**out, "offered": 40, "sent": 36, "errors": 4}


def test_the_paced_frame_is_the_one_every_backend_sends() -> None:
    frame = blaster.frame_for(60, "52:54:00:12:34:56")
    assert len(frame) == 60 and frame[:6] == bytes.fromhex("525400123456")
    assert frame[30:34] == bytes([198, 18, 0, 2]) and frame[40:42] == b"\0\0"  # dst IP, UDP checksum 0
