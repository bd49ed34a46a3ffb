"""vhost-user "Ring states" and what a broken ring tells the frontend.

A started ring that is disabled (SET_VRING_ENABLE 0) is still processed without side effects: its TX
chains are taken and discarded (returned with len 0, counted as ``ring_disabled``), and its RX queue
fills no buffer (frames pushed for it are dropped as ``ring_disabled``). A ring the guest corrupts stops,
writes its err eventfd (SET_VRING_ERR) and sets DEVICE_NEEDS_RESET in the status GET_STATUS reports
(virtio 1.2 §2.1.2) until the driver resets the device. Checked on the device with the driver model,
on the backend core replaying QEMU 7.2's recorded boot, and through the server with the Python
frontend.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from nicsim.ports import ReflectPort, SinkPort
from nicsim.vhost import features as vf
from nicsim.vhost import payloads as p
from nicsim.vhost.actions import StartPump, StopPump
from nicsim.vhost.backend_core import BackendCore
from nicsim.vhost.frontend_codec import FrontendConnection
from nicsim.vhost.protocol import Request
from nicsim.virtio.device import DEVICE_NEEDS_RESET, VirtioNetDevice
from nicsim.virtio.policy import NotifyPolicy
from rings.errors import GuestError
from tests.hardening import finish, open_fds, start_rig
from tests.hardening import frame as udp
from tests.test_backend_core import HEADER, Shell, no_inflight, recorded, u64
from tests.test_device import HoldingPort, frame, make

# -- the device, driven by the driver model -----------------------------------------------------------


def test_a_disabled_tx_ring_takes_every_chain_and_discards_it() -> None:
    sink = SinkPort()
    _, _, tx, dev = make(sink)
    dev.set_enabled(1, False)
    for i in range(40):
        tx.post_tx(frame(80, i))
    res = dev.process_tx(1)
    assert (res.processed, res.dropped, res.more) == (40, 40, False)
    assert sink.packets == 0  # the port saw nothing
    done = tx.reap()
    assert len(done) == 40 and {c.len for c in done} == {0}  # every buffer back, unread
    assert dev.stats.drops[1, dev.stats.reason("ring_disabled")] == 40
    assert dev.pool.usage == 0 and int(dev.stats.inflight[1]) == 0
    assert res.interrupt  # the guest is told its buffers are back, as for any used entry
    # Enabled again: frames reach the port as before.
    dev.set_enabled(1, True)
    tx.post_tx(frame(80, 99))
    assert dev.process_tx(1).processed == 1 and sink.packets == 1
    assert dev.stats.drops_total() == 40


def test_a_disabled_tx_ring_discards_in_batches_of_tx_batch() -> None:
    _, _, tx, dev = make(SinkPort(), policy=NotifyPolicy(tx_batch=32))
    dev.set_enabled(1, False)
    for i in range(37):
        tx.post_tx(frame(60, i))
    first = dev.process_tx(1)
    assert first.processed == 32 and first.more
    second = dev.process_tx(1)
    assert second.processed == 5 and not second.more


def test_an_asynchronous_ports_batches_complete_after_the_ring_is_disabled() -> None:
    port = HoldingPort()
    _, _, tx, dev = make(port)
    for i in range(4):
        tx.post_tx(frame(70, i))
    dev.process_tx(1)
    dev.set_enabled(1, False)
    port.held[0].complete()
    assert len(tx.reap()) == 4 and dev.pool.usage == 0
    assert dev.stats.drops_total() == 0  # those frames were sent before the ring was disabled


def test_a_disabled_rx_ring_fills_no_buffer_and_drops_what_is_pushed_for_it() -> None:
    _, rx, tx, dev = make(ReflectPort())
    rx.post_rx(count=8)
    dev.set_enabled(0, False)
    assert dev.rx_space(0) == 0  # the guest's buffers are not offered to a port
    for i in range(3):
        tx.post_tx(frame(80, i))
    dev.process_tx(1)  # the reflect port pushes each frame back: the RX ring is disabled
    assert dev.stats.drops[0, dev.stats.reason("ring_disabled")] == 3
    assert dev.snapshot()["rx_backlog"] == [0]
    res = dev.deliver_rx(0)
    assert res.processed == 0 and rx.used_pending() == 0  # no used entry on a disabled RX ring
    # Enabled again: the next frames land in the buffers still posted.
    dev.set_enabled(0, True)
    tx.post_tx(frame(80, 7))
    dev.process_tx(1)
    assert dev.deliver_rx(0).processed == 1 and len(rx.reap()) == 1


def test_frames_waiting_when_the_rx_ring_is_disabled_wait_for_it_to_be_enabled() -> None:
    _, rx, tx, dev = make(ReflectPort())
    for i in range(2):
        tx.post_tx(frame(80, i))
    dev.process_tx(1)  # no RX buffer yet: both frames wait in the backlog
    dev.set_enabled(0, False)
    rx.post_rx(count=4)
    assert dev.deliver_rx(0).processed == 0 and dev.snapshot()["rx_backlog"] == [2]
    dev.set_enabled(0, True)
    assert dev.deliver_rx(0).processed == 2 and dev.stats.drops_total() == 0


def test_a_stopped_rx_queue_keeps_backlogging_whatever_its_enable_state() -> None:
    # Only a *started* ring that is disabled refuses frames; before the queue starts they wait as ever.
    dev = VirtioNetDevice(port=ReflectPort())
    dev.set_enabled(0, False)
    assert dev.push(frame(80, 0)) and dev.rx_backlog(0) == 1
    assert dev.stats.drops_total() == 0
    dev.shutdown()


# -- the backend core, replaying QEMU 7.2's boot ------------------------------------------------------


def _booted_core() -> tuple[BackendCore, Shell]:
    messages = recorded()
    core = BackendCore(VirtioNetDevice(port=SinkPort()), create_inflight=no_inflight)
    shell = Shell(core, chunked=True)
    stop_at = next(i for i, m in enumerate(messages) if m.request is Request.GET_VRING_BASE)
    for msg in messages[:stop_at]:
        shell.feed(msg)
    return core, shell


def test_set_vring_enable_0_keeps_a_started_tx_rings_pump_and_stops_the_rx_rings() -> None:
    core, shell = _booted_core()
    fe = FrontendConnection()
    assert shell.pumps == {0: True, 1: True}
    for index in (0, 1):
        shell.carry_out(core.receive_data(fe.set_vring_enable(index, False).data))
    # TX: still processed (its chains are taken and discarded); RX: supplies nothing, its pump sleeps.
    assert shell.pumps == {0: False, 1: True}
    assert not core.device.enabled(0) and not core.device.enabled(1)
    actions = core.receive_data(fe.set_vring_enable(0, True).data)
    assert [type(a) for a in actions] == [StartPump] and actions[0].index == 0
    shell.carry_out(actions)
    assert core.device.enabled(0)
    assert core.errors == []
    shell.close()


def test_a_disabled_ring_that_stops_and_starts_again_stays_disabled() -> None:
    core, shell = _booted_core()
    fe = FrontendConnection()
    shell.carry_out(core.receive_data(fe.set_vring_enable(0, False).data))
    shell.carry_out(core.receive_data(fe.get_vring_base(0).data))
    assert shell.pumps[0] is False and core.device.queue(0) is None
    assert not core.device.enabled(0)  # the enable state is tracked while stopped (spec)
    acts = core.receive_data(fe.set_vring_kick(0, None).data)
    assert [type(a) for a in acts][-1] is StopPump  # started again, still disabled: RX sleeps
    shell.carry_out(acts)
    shell.close()


# -- through the server, with the Python frontend -----------------------------------------------------


async def test_tx_on_a_disabled_ring_comes_back_unread_and_is_counted(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)  # a reflect port: a frame that reached it would come back on RX
    fe = await rig.frontend()
    session = await rig.session()
    await fe.call(fe.conn.set_vring_enable(1, False, need_reply=True))
    fe.post_rx(8)
    fe.transmit([udp(i) for i in range(8)])
    done = await fe.wait_used(1, 8)
    assert [c.len for c in done] == [0] * 8
    snap = session.snapshot()
    assert snap["queues"][1]["drops"] == {"ring_disabled": 8}
    # The port runs inside the round that returned the chains: had a frame reached it, it would be
    # on the RX ring or in the backlog by now.
    assert snap["port"]["reflected"] == 0 and snap["rx_backlog"] == [0] and snap["queues"][0]["packets"] == 0
    assert fe.queues[0].used_pending() == 0
    await fe.call(fe.conn.set_vring_enable(1, True, need_reply=True))
    await finish(rig, fe, before)  # traffic flows both ways again, nothing leaked


# -- a broken ring ---------------------------------------------------------------------------------------


def test_a_broken_ring_sets_needs_reset_until_the_driver_resets_the_device() -> None:
    _, _, tx, dev = make(SinkPort())
    assert not dev.needs_reset
    tx.overrun_avail_idx()
    res = dev.process_tx(1)
    assert res.error is not None and dev.needs_reset
    # The error is kept (and logged) without the frames it was raised through: they hold views of
    # guest memory, which would otherwise stay mapped after the table is replaced.
    assert res.error.__traceback__ is None
    dev.ring_failed(1, res.error)  # the pump reports what the round returned: still counted once
    assert dev.stats.drops[1, dev.stats.reason("ring_error")] == 1
    dev.driver_reset()
    assert not dev.needs_reset
    assert dev.process_tx(1).error is res.error  # the queue stays broken until it is stopped


def test_an_error_raised_outside_a_round_breaks_the_ring_too() -> None:
    # rearm_kicks re-reads avail.idx and raises; the caller (the pump) reports it to the device.
    _, _, tx, dev = make(SinkPort())
    tx.overrun_avail_idx()
    with pytest.raises(GuestError) as info:
        dev.rearm_kicks(1)
    dev.ring_failed(1, info.value)
    assert dev.needs_reset and dev.process_tx(1).error is info.value
    assert dev.stats.drops[1, dev.stats.reason("ring_error")] == 1


def _status(core: BackendCore, fe: FrontendConnection) -> int:
    assert core.receive_data(fe.get_status().data) == []
    (reply,) = core.data_to_send()
    return u64(reply.data)


def test_get_status_reports_needs_reset_after_a_ring_broke_until_set_status_0() -> None:
    core, shell = _booted_core()
    fe = FrontendConnection()
    # The recording's SET_STATUS 0 (QEMU quitting) came before its first GET_VRING_BASE: be the running
    # driver again (ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK).
    shell.carry_out(core.receive_data(fe.set_status(0x0F).data))
    assert _status(core, fe) == 0x0F
    q, mem = core.device.queue(1), core.memory
    assert q is not None and mem is not None
    avail_idx = mem.view_as(q.avail_addr + 2, np.dtype("<u2"), 1)
    avail_idx[0] = (q.last_avail_idx + q.size + 1) & 0xFFFF  # the guest corrupts the TX ring
    assert core.device.process_tx(1).error is not None
    assert _status(core, fe) == 0x0F | DEVICE_NEEDS_RESET
    # QEMU's reset: SET_STATUS 0, then GET_VRING_BASE per ring; the device reads 0 again.
    shell.carry_out(core.receive_data(fe.set_status(0).data))
    assert _status(core, fe) == 0
    for index in (0, 1):
        shell.carry_out(core.receive_data(fe.get_vring_base(index).data))
    bases = [p.VringState.decode(r.data[HEADER.size :]) for r in core.data_to_send()]
    assert [b.index for b in bases] == [0, 1] and bases[1].num == q.last_avail_idx  # nothing taken
    assert core.device.queue(1) is None and core.device.pool.usage == 0
    shell.close()


async def test_a_broken_ring_writes_its_err_eventfd_and_get_status_says_needs_reset(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend(start=False)
    # The frontend takes VHOST_USER_PROTOCOL_F_STATUS too (QEMU 7.2 does), and an err eventfd per ring.
    status = fe.protocol_features | vf.bit(vf.VHOST_USER_PROTOCOL_F_STATUS)
    await fe.call(fe.conn.set_protocol_features(status))
    fe.protocol_features = status
    err_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    loop = asyncio.get_running_loop()
    fired = loop.create_future()
    try:
        for index, efd in enumerate(err_fds):
            await fe.call(fe.conn.set_vring_err(index, efd, need_reply=True))
            loop.add_reader(efd, lambda i=index: fired.done() or fired.set_result(i))
        await fe.start()
        await fe.call(fe.conn.set_status(0x0F, need_reply=True))
        fe.queues[1].overrun_avail_idx()
        fe.kick(1, force=True)
        assert await asyncio.wait_for(fired, 10) == 1  # the TX ring's err fd, and only after the break
        assert os.read(err_fds[1], 8) == (1).to_bytes(8, "little")
        with pytest.raises(BlockingIOError):
            os.read(err_fds[0], 8)  # the RX ring is fine: its err fd stays quiet
        reply = await fe.call(fe.conn.get_status())
        assert reply is not None and reply.value == 0x0F | DEVICE_NEEDS_RESET
        session = await rig.session()
        assert session.snapshot()["queues"][1]["drops"] == {"ring_error": 1}
        # The driver resets the device (QEMU: SET_STATUS 0, GET_VRING_BASE, then the rings again).
        await fe.call(fe.conn.set_status(0, need_reply=True))
        reply = await fe.call(fe.conn.get_status())
        assert reply is not None and reply.value == 0
        for index in (0, 1):
            await fe.stop_ring(index)
        fe.queues[1].overrun_avail_idx(0)  # the guest's driver starts over with a sane ring
        for index in (0, 1):
            await fe.start_ring(index, base=fe.used_idx(index))
    finally:
        for efd in err_fds:
            loop.remove_reader(efd)
            os.close(efd)  # the backend holds its own copies until the session closes
    await finish(rig, fe, before)  # traffic flows again; nothing leaked
