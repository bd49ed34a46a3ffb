"""Impaired links, on a simulated clock: every impairment's statistics over long runs, exact rate and
delay arithmetic, and reproducibility: the same seed and the same frames give the same result however
the frames are cut into batches.

Frames carry their number (bytes 14..21), so what comes out can be matched with what went in. The
driver offers frames at their times and calls ``due`` exactly at each ``next_deadline``, recording
when each frame left.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from nicsim.ports.impair import Impairment

ID_AT = 14  # the frame number, little-endian uint64, right after the Ethernet header
Out = tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.uint32]]


@dataclass
class Frames:
    data: npt.NDArray[np.uint8]
    offsets: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.uint32]

    def frame(self, i: int) -> bytes:
        return self.data[self.offsets[i]:self.offsets[i] + self.lengths[i]].tobytes()


def make_frames(n: int, size: int | tuple[int, int] = 64, seed: int = 0) -> Frames:
    """``n`` frames of ``size`` bytes (or random sizes in [low, high]), random bytes, numbered, with
    gaps between them in the buffer (as a gathered batch with headers skipped has)."""
    rng = np.random.default_rng(seed)
    sized = np.full(n, size) if isinstance(size, int) else rng.integers(size[0], size[1] + 1, n)
    lengths = sized.astype(np.uint32)
    offsets = np.cumsum(lengths.astype(np.int64) + 3) - lengths - 3 + 5
    data = rng.integers(0, 256, int(offsets[-1] + lengths[-1]) + 5, dtype=np.uint8)
    numbered = lengths >= ID_AT + 8
    ids = np.arange(n, dtype=np.uint64)[numbered].view(np.uint8).reshape(-1, 8)
    data[offsets[numbered, None] + ID_AT + np.arange(8)] = ids
    return Frames(data, offsets, lengths)


@dataclass
class Trace:
    times: npt.NDArray[np.float64]  # when each frame left
    ids: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.uint32]
    payload: bytes

    def same_as(self, other: Trace) -> bool:
        return (
            np.array_equal(self.times, other.times) and np.array_equal(self.ids, other.ids)
            and np.array_equal(self.lengths, other.lengths) and self.payload == other.payload
        )


def drive(
    imp: Impairment, frames: Frames, times: npt.NDArray[np.float64], sizes: Iterator[int] | None = None
) -> Trace:
    """Offer frames at their (non-decreasing) times, in batches of the next of ``sizes`` (default:
    everything offered at one time), serving every deadline on the dot; then drain."""
    out_t: list[npt.NDArray[np.float64]] = []
    out_ids: list[npt.NDArray[np.int64]] = []
    out_len: list[npt.NDArray[np.uint32]] = []
    payload: list[bytes] = []

    def record(t: float, got: Out) -> None:
        data, offsets, lengths = got
        ids = np.full(lengths.size, -1, np.int64)
        numbered = lengths >= ID_AT + 8
        if numbered.any():
            raw = data[offsets[numbered, None] + ID_AT + np.arange(8)]
            ids[numbered] = raw.copy().view(np.uint64).ravel().astype(np.int64)
        out_t.append(np.full(lengths.size, t))
        out_ids.append(ids)
        out_len.append(lengths.copy())
        spans = zip(offsets.tolist(), lengths.tolist(), strict=True)
        payload.extend(data[o:o + n].tobytes() for o, n in spans)

    def drain(until: float) -> None:
        while (deadline := imp.next_deadline()) is not None and deadline <= until:
            got = imp.due(deadline)
            assert got[2].size > 0, "a deadline came and nothing was due"
            record(deadline, got)

    starts = [*np.flatnonzero(np.diff(times, prepend=-np.inf) != 0).tolist(), times.size]
    for i, j in itertools.pairwise(starts):
        t = float(times[i])
        drain(t)
        k = i
        while k < j:
            m = j - k if sizes is None else min(next(sizes), j - k)
            record(t, imp.offer(t, frames.data, frames.offsets[k:k + m], frames.lengths[k:k + m]))
            k += m
    drain(np.inf)
    return Trace(np.concatenate(out_t), np.concatenate(out_ids), np.concatenate(out_len), b"".join(payload))


def ticks(n: int, per_tick: int, dt: float) -> npt.NDArray[np.float64]:
    """Offer times: ``per_tick`` frames every ``dt`` seconds."""
    return (np.arange(n) // per_tick) * dt


def delays_of(trace: Trace, times: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return trace.times - times[trace.ids]


def conserved(imp: Impairment) -> bool:
    s = imp.stats()
    return bool(s["offered"] + s["duplicated"] == s["delivered"] + s["held"] + sum(s["dropped"].values()))


EVERYTHING = (
    "loss=gemodel:3%,30% duplicate=5% corrupt=5% delay=10ms jitter=3ms reorder=10% gap=2 "
    "rate=200mbit burst=16kb limit=300"
)

# -- reproducibility ------------------------------------------------------------------------------


def test_same_seed_same_frames_same_result_and_another_seed_differs() -> None:
    frames = make_frames(5000, size=(60, 1514))
    times = ticks(5000, 40, 0.001)
    runs = [drive(Impairment(f"{EVERYTHING} seed={s}"), frames, times) for s in (42, 42, 43)]
    assert runs[0].same_as(runs[1])
    assert not np.array_equal(runs[0].ids, runs[2].ids)
    stats = [Impairment(f"{EVERYTHING} seed={s}") for s in (42, 42, 43)]
    for imp in stats:
        drive(imp, frames, times)
        assert conserved(imp)
    assert stats[0].stats() == stats[1].stats() != stats[2].stats()
    dropped = stats[0].stats()["dropped"]
    assert dropped["loss"] > 0 and dropped["rate"] + dropped["limit"] > 0  # every path was taken
    assert min(stats[0].counters[k] for k in ("delayed", "reordered", "duplicated", "corrupted")) > 0


def test_links_sharing_a_seed_differ_by_stream() -> None:
    frames, times = make_frames(2000), np.zeros(2000)
    streams: list[tuple[int, ...]] = [(), (0, 0), (0, 1), (0, 1)]
    ids = [drive(Impairment("loss=50% seed=1", stream=s), frames, times).ids for s in streams]
    assert not np.array_equal(ids[1], ids[2]) and not np.array_equal(ids[0], ids[1])
    assert np.array_equal(ids[2], ids[3])


def random_sizes(seed: int) -> Iterator[int]:
    rng = np.random.default_rng(seed)
    while True:
        yield int(rng.integers(1, 40))


def constant(size: int) -> Iterator[int]:
    while True:
        yield size


@pytest.mark.parametrize(
    "config",
    [
        "loss=10%", "loss=gemodel:2%,30%,90%,1%", "delay=5ms jitter=2ms",
        "delay=5ms jitter=1ms distribution=uniform", "delay=5ms jitter=2ms,60%",
        "delay=5ms reorder=30% gap=3", "duplicate=10% corrupt=10%", "rate=20mbit limit=50",
        "rate=20mbit burst=8kb delay=1ms jitter=1ms limit=30", "delay=50ms limit=70", EVERYTHING,
    ],
)
def test_cutting_the_frames_into_other_batches_changes_nothing(config: str) -> None:
    frames = make_frames(3000, size=(60, 1514), seed=1)
    times = ticks(3000, 100, 0.002)
    whole = drive(Impairment(config), frames, times)
    for sizes in (constant(1), constant(7), random_sizes(3)):
        assert drive(Impairment(config), frames, times, sizes).same_as(whole)


def test_turning_one_impairment_on_does_not_change_what_another_picks() -> None:
    frames = make_frames(20_000)
    times = np.zeros(20_000)
    plain = drive(Impairment("loss=10% seed=5"), frames, times)
    more = drive(Impairment("loss=10% duplicate=20% delay=1ms jitter=1ms limit=50000 seed=5"), frames, times)
    assert np.array_equal(np.unique(plain.ids), np.unique(more.ids))  # the same frames were lost


# -- loss -----------------------------------------------------------------------------------------


def test_loss_rate_over_100k_frames() -> None:
    imp = Impairment("loss=10% seed=1")
    trace = drive(imp, make_frames(100_000), ticks(100_000, 256, 0.001))
    lost = 1 - trace.ids.size / 100_000
    assert lost == pytest.approx(0.10, abs=0.005)
    assert imp.dropped["loss"] == 100_000 - trace.ids.size
    assert np.all(np.diff(trace.ids) > 0)  # loss alone keeps the order


@pytest.mark.parametrize("seed", range(10))
def test_loss_10_percent_of_10k_frames_within_the_acceptance_tolerance(seed: int) -> None:
    trace = drive(Impairment(f"loss=10% seed={seed}"), make_frames(10_000), np.zeros(10_000))
    assert 1 - trace.ids.size / 10_000 == pytest.approx(0.10, abs=0.015)


def test_loss_0_and_100_percent() -> None:
    frames, times = make_frames(1000), np.zeros(1000)
    assert drive(Impairment("loss=0%"), frames, times).ids.size == 1000
    assert drive(Impairment("loss=100%"), frames, times).ids.size == 0


def loss_runs(kept_ids: npt.NDArray[np.int64], n: int) -> npt.NDArray[np.int64]:
    lost = np.ones(n, np.bool_)
    lost[kept_ids] = False
    edges = np.diff(np.concatenate([[0], lost.astype(np.int8), [0]]))
    runs: npt.NDArray[np.int64] = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    return runs


def test_gilbert_elliott_loses_in_bursts_of_mean_length_1_over_r() -> None:
    n = 200_000
    trace = drive(Impairment("loss=gemodel:1%,25% seed=3"), make_frames(n), ticks(n, 256, 0.001))
    runs = loss_runs(trace.ids, n)
    assert runs.mean() == pytest.approx(1 / 0.25, abs=0.4)
    assert runs.sum() / n == pytest.approx(0.01 / 0.26, abs=0.005)
    # Independent loss at the same rate has runs of barely more than one frame.
    bernoulli = drive(Impairment("loss=3.85% seed=3"), make_frames(n), ticks(n, 256, 0.001))
    assert loss_runs(bernoulli.ids, n).mean() < 1.1


def test_gilbert_elliott_partial_loss_in_each_state() -> None:
    n = 200_000
    trace = drive(Impairment("loss=gemodel:1%,25%,50%,1% seed=4"), make_frames(n), ticks(n, 256, 0.001))
    bad = 0.01 / 0.26
    assert 1 - trace.ids.size / n == pytest.approx(bad * 0.5 + (1 - bad) * 0.01, abs=0.004)


# -- delay, jitter, reorder -----------------------------------------------------------------------


def test_fixed_delay_is_exact_and_keeps_the_order() -> None:
    times = ticks(10_000, 10, 0.0007)
    trace = drive(Impairment("delay=20ms"), make_frames(10_000), times)
    assert np.all(np.diff(trace.ids) == 1)
    assert np.abs(delays_of(trace, times) - 0.020).max() < 2e-9


@pytest.mark.parametrize(("distribution", "sd"), [("normal", 0.005), ("uniform", 0.005 / np.sqrt(3))])
def test_delay_and_jitter_statistics(distribution: str, sd: float) -> None:
    n = 50_000
    times = ticks(n, 10, 0.001)  # 10 frames/ms and 20 ms of delay: about 200 held, under the limit
    imp = Impairment(f"delay=20ms jitter=5ms distribution={distribution} seed=2")
    trace = drive(imp, make_frames(n), times)
    delays = delays_of(trace, times)
    assert trace.ids.size == n and imp.stats()["dropped"] == {"loss": 0, "limit": 0, "rate": 0}
    assert delays.mean() == pytest.approx(0.020, abs=1e-4)
    assert delays.std() == pytest.approx(sd, abs=1e-4)
    assert delays.min() >= 0
    if distribution == "uniform":
        assert delays.min() >= 0.015 - 1e-9 and delays.max() <= 0.025 + 1e-9
    assert np.all(np.diff(trace.times) >= 0)  # released in time order, so jitter reorders frames
    assert (np.diff(trace.ids) < 0).any()


def test_correlated_jitter_keeps_its_spread_and_follows_the_previous_frame() -> None:
    n = 20_000
    times = ticks(n, 10, 0.001)
    trace = drive(Impairment("delay=20ms jitter=2ms,75% seed=12"), make_frames(n), times)
    delays = delays_of(trace, times)[np.argsort(trace.ids)]  # in offer order
    assert delays.mean() == pytest.approx(0.020, abs=1.5e-4)  # correlated: the mean wanders more
    assert delays.std() == pytest.approx(0.002, abs=1e-4)
    assert np.corrcoef(delays[1:], delays[:-1])[0, 1] == pytest.approx(0.75, abs=0.02)
    independent = drive(Impairment("delay=20ms jitter=2ms seed=12"), make_frames(n), times)
    plain = delays_of(independent, times)[np.argsort(independent.ids)]
    assert abs(np.corrcoef(plain[1:], plain[:-1])[0, 1]) < 0.02


def test_jitter_larger_than_delay_never_releases_a_frame_before_it_was_offered() -> None:
    times = ticks(20_000, 20, 0.001)
    trace = drive(Impairment("delay=1ms jitter=5ms"), make_frames(20_000), times)
    delays = delays_of(trace, times)
    assert delays.min() == 0 and (delays == 0).mean() == pytest.approx(0.42, abs=0.02)  # P(N < -0.2)


def test_reorder_sends_its_share_at_once_ahead_of_the_delayed_frames() -> None:
    n = 40_000
    times = ticks(n, 10, 0.001)
    imp = Impairment("delay=10ms reorder=25% seed=9")
    trace = drive(imp, make_frames(n), times)
    delays = delays_of(trace, times)
    at_once = delays == 0
    assert at_once.mean() == pytest.approx(0.25, abs=0.01)
    assert np.abs(delays[~at_once] - 0.010).max() < 2e-9
    assert imp.counters["reordered"] == at_once.sum()
    assert (np.diff(trace.ids) < 0).any()  # the reordered ones overtook earlier frames


def test_reorder_gap_sends_every_nth_frame_at_once() -> None:
    times = np.zeros(100)
    trace = drive(Impairment("delay=10ms reorder=100% gap=5"), make_frames(100), times, constant(3))
    assert sorted(trace.ids[delays_of(trace, times) == 0].tolist()) == list(range(4, 100, 5))


def test_reorder_gap_keeps_reordered_frames_at_least_gap_apart() -> None:
    times = ticks(20_000, 16, 0.001)
    trace = drive(Impairment("delay=10ms reorder=50% gap=3 seed=4"), make_frames(20_000), times)
    at_once = np.sort(trace.ids[delays_of(trace, times) == 0])
    assert np.diff(at_once).min() >= 3
    assert at_once.size > 20_000 / 6  # with gap 3 and 50 %, a little over one frame in five


# -- duplicate, corrupt ---------------------------------------------------------------------------


def test_duplicates_follow_their_original_identical() -> None:
    n = 50_000
    frames = make_frames(n, size=(60, 300))
    imp = Impairment("duplicate=10% seed=6")
    trace = drive(imp, frames, ticks(n, 64, 0.001))
    extra = trace.ids.size - n
    assert extra / n == pytest.approx(0.10, abs=0.006) and imp.counters["duplicated"] == extra
    twice = np.flatnonzero(np.diff(trace.ids) == 0)
    assert twice.size == extra
    assert np.array_equal(np.unique(trace.ids), np.arange(n))


def corrupted_bits(trace: Trace, frames: Frames, order: npt.NDArray[np.int64]) -> list[list[int]]:
    """For output frame k (input frame ``order[k]``), the bit positions that differ."""
    out: list[list[int]] = []
    pos = 0
    for k, i in enumerate(order.tolist()):
        n = int(trace.lengths[k])
        got = np.frombuffer(trace.payload, np.uint8, n, pos)
        pos += n
        diff = np.unpackbits(got ^ np.frombuffer(frames.frame(i), np.uint8))
        out.append(np.flatnonzero(diff).tolist())
    return out


def test_corruption_flips_one_bit_past_the_ethernet_header_and_leaves_the_input_alone() -> None:
    n = 20_000
    frames = make_frames(n, size=(14, 1514), seed=7)
    before = frames.data.copy()
    imp = Impairment("corrupt=10% seed=7")
    trace = drive(imp, frames, ticks(n, 64, 0.001))
    assert np.array_equal(frames.data, before)
    flips = corrupted_bits(trace, frames, np.arange(n))  # corruption alone keeps order and count
    hit = [i for i, f in enumerate(flips) if f]
    assert all(len(flips[i]) == 1 and 14 * 8 <= flips[i][0] < frames.lengths[i] * 8 for i in hit)
    assert all(frames.lengths[i] > 14 for i in hit)
    assert imp.counters["corrupted"] == len(hit)
    assert len(hit) / (frames.lengths > 14).sum() == pytest.approx(0.10, abs=0.006)
    bits = np.array([flips[i][0] for i in hit]) - 14 * 8
    payload_bits = (frames.lengths[hit].astype(np.int64) - 14) * 8
    assert (bits / payload_bits).mean() == pytest.approx(0.5, abs=0.03)  # anywhere in the payload


def test_held_frames_are_corrupted_the_same_as_frames_sent_at_once() -> None:
    frames = make_frames(5000, size=(60, 600), seed=8)
    times = ticks(5000, 50, 0.001)
    direct = drive(Impairment("corrupt=20% seed=8"), frames, times)
    delayed = drive(Impairment("corrupt=20% delay=3ms seed=8"), frames, times)
    assert direct.payload == delayed.payload  # a fixed delay keeps order; the same bits flipped


def test_a_duplicate_of_a_corrupted_frame_is_clean() -> None:
    frames = make_frames(200, size=(60, 100))
    trace = drive(Impairment("duplicate=100% corrupt=100%"), frames, np.zeros(200))
    flips = corrupted_bits(trace, frames, np.repeat(np.arange(200), 2))
    assert all(len(f) == 1 for f in flips[0::2]) and not any(flips[1::2])


# -- rate -----------------------------------------------------------------------------------------


def test_rate_over_a_long_run_and_drops_past_the_limit() -> None:
    n = 20_000
    times = ticks(n, 2, 0.001)  # 1000-byte frames at 16 Mbit/s into a 10 Mbit/s link
    imp = Impairment("rate=10mbit limit=100")
    trace = drive(imp, make_frames(n, size=1000), times)
    elapsed = trace.times[-1] - trace.times[0]
    rate = (trace.lengths[1:].sum() * 8) / elapsed
    assert rate == pytest.approx(10e6, rel=0.02)
    assert np.allclose(np.diff(trace.times[200:]), 800e-6, atol=1e-9)  # back to back once backlogged
    assert imp.dropped["rate"] == n - trace.ids.size > 0 and imp.dropped["limit"] == 0


def test_rate_fractions_of_a_nanosecond_add_up_exactly() -> None:
    # 512 bits at 3 Mbit/s is 170666.67 ns: frame k leaves when bit 512 (k + 1) is out, to the ns.
    trace = drive(Impairment("rate=3mbit limit=5000"), make_frames(3000), np.zeros(3000), constant(7))
    ns = np.rint(trace.times * 1e9).astype(np.int64)
    assert np.array_equal(ns, (np.arange(1, 3001) * 512 * 10**9) // 3_000_000)


def test_under_its_rate_a_link_adds_only_serialisation() -> None:
    times = ticks(1000, 1, 0.001)  # 1500 bytes each ms: 12 Mbit/s into 100 Mbit/s
    trace = drive(Impairment("rate=100mbit"), make_frames(1000, size=1500), times)
    assert np.allclose(delays_of(trace, times), 120e-6, atol=1e-9)


def test_a_burst_leaves_at_once_then_the_rate_holds() -> None:
    trace = drive(Impairment("rate=10mbit burst=10kb"), make_frames(20, size=1000), np.zeros(20))
    # 10240 bytes of credit: ten 1000-byte frames go at once, the rest 800 us apart.
    assert np.all(trace.times[:10] == 0)
    assert np.allclose(trace.times[10:], 0.0088 - 0.008192 + 0.0008 * np.arange(10), atol=1e-9)


def test_rate_and_delay_add_and_keep_the_order() -> None:
    times = ticks(2000, 4, 0.001)
    trace = drive(Impairment("rate=50mbit delay=10ms jitter=2ms"), make_frames(2000, size=1000), times)
    assert np.all(np.diff(trace.ids) > 0)  # the rate queue is FIFO, as netem's
    assert delays_of(trace, times).min() >= 160e-6 - 1e-9


# -- limit, due, deadlines ------------------------------------------------------------------------


def test_limit_drops_what_the_queue_cannot_hold() -> None:
    frames = make_frames(400)
    imp = Impairment("delay=100ms limit=100")
    assert imp.offer(0.0, frames.data, frames.offsets[:300], frames.lengths[:300])[2].size == 0
    assert imp.held == 100 and imp.dropped["limit"] == 200
    assert imp.offer(0.05, frames.data, frames.offsets[300:350], frames.lengths[300:350])[2].size == 0
    assert imp.dropped["limit"] == 250  # still full
    _, _, lengths = imp.due(0.1)
    assert lengths.size == 100
    assert imp.offer(0.1, frames.data, frames.offsets[350:], frames.lengths[350:])[2].size == 0
    assert imp.held == 50 and conserved(imp)


def test_due_and_next_deadline() -> None:
    frames = make_frames(3)
    imp = Impairment("delay=10ms jitter=5ms seed=1")
    assert imp.next_deadline() is None and imp.due(1.0)[2].size == 0
    imp.offer(1.0, frames.data, frames.offsets, frames.lengths)
    deadline = imp.next_deadline()
    assert deadline is not None and deadline > 1.0
    assert imp.due(deadline - 1e-6)[2].size == 0
    got = imp.due(deadline)[2].size
    assert got >= 1 and imp.held == 3 - got
    assert imp.due(2.0)[2].size == 3 - got and imp.next_deadline() is None


def test_deadlines_work_on_an_epoch_scale_clock() -> None:
    frames = make_frames(500)
    times = 1.7e9 + ticks(500, 5, 0.001)
    trace = drive(Impairment("delay=20ms jitter=5ms seed=3"), frames, times)  # asserts every deadline serves
    assert trace.ids.size == 500


def test_everything_at_once_keeps_the_books_balanced_and_the_bytes_intact() -> None:
    frames = make_frames(4000, size=(60, 1514), seed=11)
    imp = Impairment(EVERYTHING.replace("corrupt=5% ", ""))
    times = ticks(4000, 30, 0.0005)
    trace = drive(imp, frames, times)
    assert conserved(imp) and imp.held == 0
    pos = 0
    for i, n in zip(trace.ids.tolist(), trace.lengths.tolist(), strict=True):
        assert trace.payload[pos:pos + n] == frames.frame(i)
        pos += n


def test_no_impairment_passes_the_callers_buffer_through() -> None:
    frames = make_frames(10)
    imp = Impairment("")
    data, offsets, lengths = imp.offer(0.0, frames.data, frames.offsets, frames.lengths)
    assert data is frames.data and np.array_equal(offsets, frames.offsets) and lengths.size == 10
    assert imp.stats()["delivered"] == 10 and imp.next_deadline() is None


def test_an_empty_batch_only_serves_what_is_due() -> None:
    frames = make_frames(4)
    imp = Impairment(EVERYTHING)
    none = np.zeros(0, np.int64)
    assert imp.offer(0.0, frames.data, none, none.astype(np.uint32))[2].size == 0
    imp.offer(0.0, frames.data, frames.offsets, frames.lengths)
    got = imp.offer(1.0, frames.data, none, none.astype(np.uint32))
    assert got[2].size >= 3 and imp.held == 0 and conserved(imp)


def test_a_clock_stepping_back_is_held_at_the_latest_time_seen() -> None:
    frames = make_frames(2)
    imp = Impairment("delay=10ms")
    imp.offer(1.0, frames.data, frames.offsets[:1], frames.lengths[:1])
    assert imp.due(0.5)[2].size == 0
    imp.offer(0.5, frames.data, frames.offsets[1:], frames.lengths[1:])  # taken as offered at 1.0
    assert imp.next_deadline() == pytest.approx(1.01)
    assert imp.due(1.01)[2].size == 2
