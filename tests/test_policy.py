"""The notification policy: its knobs, its pure decisions, and how the device applies them to a ring
driven by the driver model (interrupts by used_event, kicks re-armed for a batch)."""

from __future__ import annotations

import pytest

from nicsim.ports import SinkPort
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from nicsim.virtio.policy import (
    FLOW_BYTES,
    PLAIN_FRAME,
    POLICY_OPTIONS,
    STREAM_WINDOW_US,
    NotifyPolicy,
    PollAction,
    chase_tx,
    is_request,
    keep_warm,
    policy_from_options,
    poll_action,
    poll_ahead,
    should_interrupt,
    streaming,
)
from rings.driver import DriverQueue, GuestDriver

V1 = 1 << VIRTIO_F_VERSION_1
EVT = 1 << VIRTIO_F_EVENT_IDX
FRAME = bytes(60)


def _tx_device(features: int, policy: NotifyPolicy | None = None) -> tuple[DriverQueue, VirtioNetDevice]:
    drv = GuestDriver()
    rx = drv.add_queue(0, 256, event_idx=bool(features & EVT))
    tx = drv.add_queue(1, 256, event_idx=bool(features & EVT))
    dev = VirtioNetDevice(port=SinkPort(), policy=policy)
    dev.set_features(features)
    dev.set_memory(drv.memory)
    dev.start_queue(0, rx.device_queue())
    dev.start_queue(1, tx.device_queue())
    return tx, dev


# -- knobs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tx_batch", "rx_batch", "irq_coalesce", "rx_backlog", "rounds_per_call"])
def test_counts_that_must_be_positive_are_refused_at_zero(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        NotifyPolicy(**{name: 0})


@pytest.mark.parametrize("name", ["kick_batch", "rx_kick_batch", "flow_batch", "poll_us", "batch_wait_us",
                                  "warm_tick_us", "warm_for_ms", "poll_ahead_us"])
def test_negative_knobs_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        NotifyPolicy(**{name: -1})


def test_options_build_a_policy_and_none_keeps_the_default() -> None:
    p = policy_from_options({"poll_us": "25", "irq_coalesce": 8, "kick_batch": None})
    assert p.poll_us == 25.0 and p.irq_coalesce == 8 and p.kick_batch == NotifyPolicy().kick_batch
    assert set(POLICY_OPTIONS) <= {f for f in NotifyPolicy.__dataclass_fields__}
    with pytest.raises(ValueError, match="unknown"):
        policy_from_options({"poll_ms": 1})
    with pytest.raises(ValueError, match="poll_us"):
        policy_from_options({"poll_us": -5})


# -- interrupts ---------------------------------------------------------------------------------------


def test_with_event_idx_the_guests_request_is_followed_at_once_whatever_the_coalescing() -> None:
    p = NotifyPolicy(irq_coalesce=64)
    assert should_interrupt(p, unsignalled=1, idle=False, ring_wants=True, event_idx=True)
    assert not should_interrupt(p, unsignalled=100, idle=True, ring_wants=False, event_idx=True)


def test_without_event_idx_interrupts_are_spaced_while_work_flows() -> None:
    p = NotifyPolicy(irq_coalesce=64)
    assert not should_interrupt(p, unsignalled=63, idle=False, ring_wants=True)
    assert should_interrupt(p, unsignalled=64, idle=False, ring_wants=True)
    assert should_interrupt(p, unsignalled=1, idle=True, ring_wants=True)
    assert not should_interrupt(NotifyPolicy(irq_on_idle=False), unsignalled=1, idle=True, ring_wants=True)


def test_device_signals_a_tx_round_that_passes_used_event_even_with_work_left() -> None:
    # Linux TX asks for an interrupt at 3/4 of its outstanding buffers (virtqueue_enable_cb_delayed).
    tx, dev = _tx_device(V1 | EVT, NotifyPolicy(tx_batch=16, irq_coalesce=64))
    for _ in range(64):
        tx.post_tx(FRAME)
    tx.enable_interrupts(after=47)
    results = []
    while True:
        res = dev.process_tx(1)
        results.append(res)
        if not res.more:
            break
    assert [r.interrupt for r in results] == [False, False, True, False]
    assert results[2].more  # work was left, and the interrupt still went out in that round


# -- kicks --------------------------------------------------------------------------------------------


def test_kick_target_is_zero_for_sparse_traffic_and_half_the_ring_at_most() -> None:
    p = NotifyPolicy(kick_batch=512, rx_kick_batch=64, flow_batch=8)
    assert p.kick_target(queue_size=256, moved=7, tx=True) == 0
    assert p.kick_target(queue_size=256, moved=8, tx=True) == 128
    assert p.kick_target(queue_size=256, moved=200, tx=False) == 64
    assert p.kick_target(queue_size=64, moved=200, tx=False) == 32
    assert NotifyPolicy(kick_batch=0).kick_target(queue_size=256, moved=200, tx=True) == 0


def test_kick_target_is_zero_after_a_wakeup_of_gso_frames() -> None:
    # A TCP stream's GSO frames: TCP small queues stop the socket after a few, so no batch comes.
    p = NotifyPolicy(kick_batch=128, flow_batch=8)
    assert p.kick_target(queue_size=256, moved=10, tx=True, nbytes=10 * 64_000) == 0
    assert p.kick_target(queue_size=256, moved=10, tx=True, nbytes=10 * 1514) == 128
    # RX buffers have no frame bytes of the guest's; the rule is TX's.
    assert p.kick_target(queue_size=256, moved=100, tx=False, nbytes=100 * 64_000) == 64


def test_rearm_for_a_batch_lets_the_guest_post_that_many_without_kicking() -> None:
    tx, dev = _tx_device(V1 | EVT)
    dev.suppress_kicks(1)
    assert dev.rearm_kicks(1, after=4) is True
    kicks = []
    for _ in range(6):
        tx.post_tx(FRAME)
        kicks.append(tx.should_kick())
    assert kicks == [False, False, False, False, True, False]  # the 5th passes avail_event


def test_rearm_for_a_batch_already_passed_says_process_now() -> None:
    tx, dev = _tx_device(V1 | EVT)
    dev.suppress_kicks(1)
    for _ in range(5):
        tx.post_tx(FRAME)
    assert not tx.should_kick()
    assert dev.rearm_kicks(1, after=4) is False  # the guest will not kick for a crossing it made
    assert dev.rearm_kicks(1, after=5) is True  # exactly at the mark: the next post kicks
    tx.post_tx(FRAME)
    assert tx.should_kick()


def test_without_event_idx_a_batch_cannot_be_asked_for() -> None:
    tx, dev = _tx_device(V1)
    dev.suppress_kicks(1)
    assert dev.rearm_kicks(1, after=4) is True
    tx.post_tx(FRAME)
    assert tx.should_kick()  # the flag is all or nothing: the first post kicks


# -- polling ------------------------------------------------------------------------------------------


def test_a_flood_leaves_a_few_chains_for_the_next_batch_and_everything_else_is_chased() -> None:
    p = NotifyPolicy(kick_batch=128, min_round=32)
    flood = {"moved": 150, "processed": 150, "nbytes": 150 * 60}
    assert not chase_tx(p, pending=31, **flood)  # a packet flood's trickle waits for the batch's kick
    assert chase_tx(p, pending=32, **flood)  # a round's worth left: run it now
    assert not chase_tx(p, pending=0, **flood)  # nothing left
    assert chase_tx(p, pending=5, moved=127, processed=127, nbytes=127 * 60)  # no whole batch moved yet
    gso = {"moved": 150, "processed": 2, "nbytes": 2 * PLAIN_FRAME + 1}
    assert chase_tx(p, pending=5, **gso)  # GSO frames (TCP): never wait
    assert not chase_tx(p, pending=5, moved=150, processed=2, nbytes=2 * PLAIN_FRAME)
    assert chase_tx(NotifyPolicy(kick_batch=128, min_round=0), pending=1, **flood)  # off: always chase
    assert chase_tx(NotifyPolicy(kick_batch=0, min_round=32), pending=1, **flood)  # no batching: chase


def test_poll_action() -> None:
    p = NotifyPolicy(poll_rounds=3, poll_us=100.0)
    assert poll_action(p, more=True, empty_rounds=99, idle_us=1e9) is PollAction.PROCESS
    assert poll_action(p, more=False, empty_rounds=2, idle_us=50.0) is PollAction.POLL
    assert poll_action(p, more=False, empty_rounds=3, idle_us=50.0) is PollAction.REARM
    assert poll_action(p, more=False, empty_rounds=0, idle_us=100.0) is PollAction.REARM
    assert poll_action(NotifyPolicy(), more=False, empty_rounds=0, idle_us=0.0) is PollAction.REARM


def test_busy_polling_skips_a_ring_with_nothing_it_would_not_be_woken_for() -> None:
    p = NotifyPolicy(poll_rounds=3, poll_us=100.0, full_poll_us=50.0, rr_poll_us=2000.0)
    assert poll_action(p, more=False, empty_rounds=0, idle_us=1.0, pollable=False) is PollAction.REARM
    assert poll_action(p, more=True, empty_rounds=0, idle_us=1.0, pollable=False) is PollAction.PROCESS
    # The other reasons to poll are the policy's own, not poll_us's: they still hold.
    idle = {"more": False, "empty_rounds": 9, "idle_us": 1.0, "pollable": False}
    assert poll_action(p, full=True, **idle) is PollAction.POLL
    assert poll_action(p, rr=True, **idle) is PollAction.POLL


def test_a_ring_whose_last_round_was_full_is_polled_for_a_while_before_it_sleeps() -> None:
    p = NotifyPolicy(full_poll_us=50.0)
    assert poll_action(p, more=False, empty_rounds=40, idle_us=49.0, full=True) is PollAction.POLL
    assert poll_action(p, more=False, empty_rounds=40, idle_us=50.0, full=True) is PollAction.REARM
    assert poll_action(p, more=False, empty_rounds=0, idle_us=1.0, full=False) is PollAction.REARM
    off = NotifyPolicy(full_poll_us=0.0)
    assert poll_action(off, more=False, empty_rounds=0, idle_us=0.0, full=True) is PollAction.REARM


def test_a_ring_streams_while_its_recent_rounds_move_batches_or_gso_frames() -> None:
    p = NotifyPolicy(flow_batch=8)
    assert streaming(p, last_batch=8, last_bytes=8 * 60, idle_us=10.0)  # a batch of frames
    assert streaming(p, last_batch=2, last_bytes=FLOW_BYTES, idle_us=10.0)  # a TCP stream's GSO frames
    assert not streaming(p, last_batch=1, last_bytes=98, idle_us=10.0)  # a reply: request/response
    assert not streaming(p, last_batch=64, last_bytes=64 * 60, idle_us=STREAM_WINDOW_US)  # over: idle


def test_a_request_keeps_the_core_warm_and_a_stream_does_not() -> None:
    p = NotifyPolicy(flow_batch=8)
    assert keep_warm(p, processed=1, nbytes=98)  # a ping
    assert not keep_warm(p, processed=8, nbytes=8 * 60)  # a batch: traffic flows
    assert not keep_warm(p, processed=1, nbytes=FLOW_BYTES)  # a GSO frame: a stream
    assert not keep_warm(NotifyPolicy(warm_tick_us=0), processed=1, nbytes=98)  # off


def test_requests_at_a_steady_pace_get_a_window_around_the_next_ones_expected_time() -> None:
    p = NotifyPolicy(rr_poll_us=2000.0, poll_ahead_us=300.0, warm_for_ms=1000.0)
    assert poll_ahead(p, [10_400.0, 10_500.0]) == (10_100.0, 10_800.0)  # a ping every 10 ms
    assert poll_ahead(p, [10_500.0]) is None  # one gap says nothing of a pace
    assert poll_ahead(p, [10_000.0, 11_300.0]) is None  # two more than 4 * 300 us apart
    # A pace that jitters is polled for across its jitter...
    assert poll_ahead(p, [10_400.0, 10_900.0, 10_600.0]) == (10_100.0, 10_900.0)
    # ...and the gap farthest from the median (a late request) is left out, one only.
    assert poll_ahead(p, [10_500.0, 10_600.0, 13_900.0, 10_550.0]) == (10_200.0, 10_900.0)
    assert poll_ahead(p, [7_100.0, 10_500.0, 10_600.0, 10_550.0]) == (10_200.0, 10_900.0)
    assert poll_ahead(p, [10_500.0, 12_600.0, 13_900.0, 10_550.0]) is None
    assert poll_ahead(p, [1500.0, 1500.0]) is None  # rr_poll_us polls those anyway
    no_rr = NotifyPolicy(rr_poll_us=0.0, poll_ahead_us=300.0)
    assert poll_ahead(no_rr, [500.0, 500.0]) is None  # a window would start at once
    assert poll_ahead(no_rr, [700.0, 650.0]) == (350.0, 1000.0)
    assert poll_ahead(p, [2e6, 2e6]) is None  # past warm_for_ms: not worth a timer
    assert poll_ahead(NotifyPolicy(poll_ahead_us=0.0), [10_450.0, 10_450.0]) is None


def test_a_ring_inside_its_poll_ahead_window_polls_and_outside_it_sleeps() -> None:
    p = NotifyPolicy()
    assert poll_action(p, more=False, empty_rounds=50, idle_us=10_200.0, ahead=True) is PollAction.POLL
    assert poll_action(p, more=False, empty_rounds=50, idle_us=10_200.0, ahead=False) is PollAction.REARM


def test_a_request_is_a_round_of_a_few_frames_and_no_gso_frame() -> None:
    p = NotifyPolicy(flow_batch=8)
    assert is_request(p, processed=1, nbytes=98)
    assert not is_request(p, processed=8, nbytes=8 * 60)
    assert not is_request(p, processed=1, nbytes=FLOW_BYTES)
