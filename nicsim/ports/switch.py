"""A learning L2 switch joining several guests of one nicsim process, one :class:`SwitchPort` each.

This module owns :class:`Switch` (the forwarding table, per-port counters, per-direction impairments
and the one timer that releases delayed frames) and :class:`SwitchPort`, the :class:`Port` a guest's
device is wired to. A port has a fixed number (its slot) for its name, the socket it serves: a guest
that leaves (its session ends, :meth:`SwitchPort.close`) frees the slot and its MAC addresses are
forgotten; the next guest on that socket joins again with the same number and counters.

A batch the guest sends is switched while the sender's pool descriptors still hold its TX buffers:
its addresses are learned and looked up a batch at a time
(:class:`~nicsim.ports.fdb.ForwardingTable`), and each destination's RX sink is handed views of the
sender's frames (``push_views``), which it copies once, straight into the buffers its guest has
posted. Nothing in the switch waits on a destination: frames it has no buffer for go to its bounded backlog
(a second copy), and what the backlog cannot take is dropped and counted on that destination's port
(``no_rx_buffer``; the device's own stats say more precisely why). Flooded frames (broadcast,
unknown unicast) go only into posted buffers, never into a backlog (``flood_no_rx_buffer``): a guest
flooding the switch cannot take the backlog room of the frames addressed to the others. An impaired
direction copies the frames it handles into a flat batch first (the delay line keeps copies, and
releases them as frames that may wait); a frame split across TX descriptors is gathered.

A compiled round (the sender's device took it with the compiled take) is first offered to the
compiled forward (:mod:`nicsim.ports.switch_kernel`): one call per run of frames for one guest takes
them from the sender's chains straight into that guest's buffers, backlog or drop count, while each
is a frame the steps above would pass on unchanged to a learned station; the rest of the round goes
through those steps. ``stats()["compiled"]`` says how many went which way.

One sender is held back, for a bounded time: a guest whose whole round went to one guest and left it
no buffer is paced by that guest (:meth:`Switch.tx_budget`, ``pace=`` on by default). Its next
rounds take only as many of its chains as the receiver has buffers posted, and while it has none
its frames wait in its own ring, at most ``PACE_MAX_S``, rather than being taken and dropped on the
cores both guests share; a round that goes anywhere else ends it (``stats()["pacing"]``).

Impairments (:class:`~nicsim.ports.impair.Impairment`) apply per port and direction, named from the
guest's side: ``tx`` is what the guest sends into the switch, ``rx`` what the switch sends to the
guest. Delayed frames wait in the impairment's delay line; one timer on the event loop, armed for the
earliest :meth:`~nicsim.ports.impair.Impairment.next_deadline` of all of them, releases them.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from nicsim.ports import switch_kernel
from nicsim.ports.base import Port, TxFrames
from nicsim.ports.fd_kernels import allowed
from nicsim.ports.fdb import DEFAULT_AGEING, FILTER, FLOOD, ForwardingTable, fan_out, mac_keys
from nicsim.ports.gso import finish
from nicsim.ports.impair import Impairment
from nicsim.ports.port_counters import PortCounters
from nicsim.ports.uplink import Uplink
from nicsim.ports.vnet_hdr import (
    BAD_GSO_FRAME,
    F_NEEDS_CSUM,
    GSO_NONE,
    HDR_FIELDS,
    NONE,
    OFFLOADS,
    OK,
    REASONS,
    Headers,
    Offloads,
    check,
    check_one,
    fields,
    split_frames,
    tcp_layout,
)  # fmt: skip
from nicsim.virtio.features import VIRTIO_NET_F_MQ
from nicsim.virtio.port import HDR_LEN_V1, vnet_hdr_len
from nicsim.virtio.queues import GSO_TYPE_OFFSET
from nicsim.virtio.tx import TxBatch

__all__ = ["DIRECTIONS", "Switch", "SwitchPort", "Uplink"]

DIRECTIONS: Final = ("tx", "rx")  # from the guest's side: tx into the switch, rx out of it

Frame = npt.NDArray[np.uint8]
_Frames = tuple[list[Frame], npt.NDArray[np.uint32], Headers]  # frames, their lengths and headers
_ZERO_HEADERS = np.zeros((256, HDR_FIELDS), np.uint8)  # what frames without a header carry (read only)
_ZERO_HEADERS.flags.writeable = False
# A paced sender's frames wait in its own ring at most this long for their receiver's next buffer;
# then its round is taken whole, and what finds no room is dropped (a receiver that stopped). At 1 ms
# a busy receiver's refills (a NAPI poll's worth, when its vCPU gets the core) came too late a few
# hundred times in a flood's 14 s (165 waits ran out, 13.5k frames dropped); at 2 ms, 73 and 2.8k.
PACE_MAX_S: Final = 0.002
_FEW: Final = 4  # a batch of at most this many frames is switched with plain ints
_NONE, _MIXED = -2, -1  # a round's destination so far: none yet, or more than one port (or none known)


def _views(data: Frame, offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.uint32]) -> list[Frame]:
    return [data[o : o + n] for o, n in zip(offsets.tolist(), lengths.tolist(), strict=True)]


def _flat(views: list[Frame], lengths: npt.NDArray[np.uint32]) -> tuple[Frame, npt.NDArray[np.int64]]:
    """Frames copied back to back (an impairment's input): (bytes, start offsets)."""
    starts = np.cumsum(lengths, dtype=np.int64) - lengths
    return (np.concatenate(views) if views else np.zeros(0, np.uint8)), starts


class Switch:
    """The switch all :class:`SwitchPort` objects of one process share."""

    def __init__(
        self, *, ageing: float = DEFAULT_AGEING, max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic, offload: bool = True, pace: bool = True,
    ) -> None:  # fmt: skip
        """``offload``: the ports offer checksum and TCP segmentation offloads to their guests, and a
        frame's virtio-net header travels with it (off: bare frames, complete checksums, MTU-sized).
        ``pace``: a guest streaming to one guest that has no buffer left is paced by it
        (:meth:`tx_budget`; off: its frames are taken and dropped as fast as it sends them)."""
        self.offload = offload
        self.pace = pace
        self.fdb = ForwardingTable(ageing=ageing, max_entries=max_entries)
        self.counters = PortCounters()
        self._clock = clock
        self._slots: dict[str, int] = {}  # port name -> number, for good
        self._live: dict[int, SwitchPort | Uplink] = {}  # number -> the guest's port or uplink joined now
        self._uplinks: dict[str, Uplink] = {}
        self._impair: dict[tuple[int, str], Impairment] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # Where each port's last unicast frames went: the compiled forward's destination to try.
        self._dest_hint: dict[int, int] = {}
        self._head = np.zeros(switch_kernel.HEAD_BYTES, np.uint8)  # the compiled forward's scratch
        self._spots = np.zeros(4, np.int64)
        # The compiled forward's calls, frames placed, queued and dropped, and why each call stopped
        # (``stats()["compiled"]``).
        self._fast = dict.fromkeys(("calls", "frames", "queued", "dropped"), 0)
        self._fast_stops = np.zeros(len(switch_kernel.STOPS), np.int64)
        # Senders paced by one receiver (tx_budget): port -> the receiver, and since when a round of
        # theirs has waited for its buffers (none while it has not).
        self._paced: dict[int, int] = {}
        self._waiting: dict[int, float] = {}
        self._round_dest = _NONE  # where the round being forwarded went: one port, _MIXED or _NONE yet
        self.pacing = dict.fromkeys(("rounds", "waits", "expired"), 0)

    # -- ports and configuration -----------------------------------------------------------------

    def slot(self, name: str) -> int:
        """The fixed number of the port called ``name`` (allotted on first use)."""
        return self._slots.setdefault(name, len(self._slots))

    def port(self, name: str) -> SwitchPort:
        """A new port for a guest on ``name``; it joins when its device attaches."""
        return SwitchPort(self, name)

    def uplink(self, name: str, port: Port) -> Uplink:
        """Join ``port`` (a tap, a vxlan tunnel) to the switch as the uplink called ``name``, for good;
        the switch owns it from now on (:meth:`close` closes it)."""
        if name in self._uplinks:
            raise ValueError(f"switch: there is already an uplink called {name!r}")
        number = self.slot(name)
        up = Uplink(name, number, port, functools.partial(self.forward_flat, number), clock=self._clock,
                    offload=self.offload)  # fmt: skip
        self._uplinks[name] = up
        self._live[number] = up
        if self._loop is not None:
            up.start_io(self._loop)
        return up

    @property
    def uplinks(self) -> dict[str, Uplink]:
        return dict(self._uplinks)

    def impair(self, name: str, direction: str, spec: str) -> None:
        """Impair one direction (``tx``, ``rx``) of port ``name`` with a netem-style ``spec``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"impairment direction {direction!r}: use {' or '.join(DIRECTIONS)}")
        number = self.slot(name)
        self._impair[(number, direction)] = Impairment(spec, stream=(number, DIRECTIONS.index(direction)))

    def join(self, port: SwitchPort) -> None:
        self._live[port.number] = port

    def leave(self, port: SwitchPort) -> None:
        # A new guest may have taken the slot before the old session finished closing.
        if self._live.get(port.number) is port:
            del self._live[port.number]
            self._dest_hint.pop(port.number, None)
            self.fdb.forget_port(port.number)
            # Its pacing goes with it, both ways: the next guest on the slot starts afresh.
            for sender in [port.number, *(s for s, d in self._paced.items() if d == port.number)]:
                self._paced.pop(sender, None)
                self._waiting.pop(sender, None)

    def start_io(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on ``loop``: the delay timer, and the uplinks' reads (from now on, guest or no guest)."""
        self._loop = loop
        for up in self._uplinks.values():
            up.start_io(loop)

    # -- forwarding ------------------------------------------------------------------------------

    def forward(self, ingress: int, batch: TxFrames, sender: SwitchPort | None = None) -> None:
        """A batch port ``ingress``'s guest sent: impair, switch, deliver, before the batch returns.
        ``sender``: the guest's port, when it passes virtio-net headers (offloads on)."""
        self._round_dest = _NONE
        if sender is not None and isinstance(batch, TxBatch):
            done = self._forward_compiled(ingress, batch, sender)
            if done == batch.count:
                self._decide_pace(ingress)
                return
            if done:
                batch = batch.tail(done)
        lengths = batch.lengths
        self.counters.received(ingress, lengths)
        imp = self._impair.get((ingress, "tx"))
        headers: Headers | None = None
        if sender is not None and sender.vnet_hdr:
            # Views of the sender's TX buffers (a frame split across descriptors is gathered) and
            # their headers apart: the receiver's RX path copies them once, into its own buffers.
            views, found = split_frames(batch, sender.hdr_len)
            if found.any():
                views, lengths, headers = self._checked(ingress, views, lengths, found, sender.tx_offloads)
            # else: headers that ask for nothing (a ping, an ARP) are nothing to check or carry.
            if imp is not None:
                if headers is not None:
                    # An impaired link carries wire frames: segmented, checksums complete.
                    views, lengths, _ = self._finish(ingress, views, lengths, headers, NONE)
                    headers = None
                data, offsets = _flat(views, lengths)
                data, offsets, lengths = imp.offer(self._clock(), data, offsets, lengths)
                views = _views(data, offsets, lengths)
        elif imp is None:
            views = [batch.frame(i) for i in range(batch.count)]
        else:
            data, offsets = batch.gather()  # the delay line keeps its own copy of what it holds
            data, offsets, lengths = imp.offer(self._clock(), data, offsets, lengths)
            views = _views(data, offsets, lengths)
        if imp is not None:
            self._round_dest = _MIXED  # the delay line sends them later: nothing to pace by
        self._switch(ingress, views, lengths, headers)
        self._arm()
        self._decide_pace(ingress)

    def _went_to(self, dest: int) -> None:
        """Frames of the round being forwarded went to port ``dest`` (_MIXED: to several, or unknown)."""
        self._round_dest = dest if self._round_dest in (_NONE, dest) else _MIXED

    def _decide_pace(self, ingress: int) -> None:
        """After a round: pace port ``ingress``'s guest by the one guest its whole round went to once
        that guest has no buffer left, and go on while its rounds go there (:meth:`tx_budget`);
        otherwise stop pacing it."""
        dest = self._round_dest
        port = self._live.get(dest) if dest >= 0 else None
        # (A guest with several queue pairs gets each flow on its own pair: one pair's buffers say
        # nothing of what the others can take.)
        if (self.pace and isinstance(port, SwitchPort) and not port.multiqueue
                and (dest, "rx") not in self._impair
                and (self._paced.get(ingress) == dest or not self._room(dest))):  # fmt: skip
            self._paced[ingress] = dest
        else:
            self._paced.pop(ingress, None)

    def tx_budget(self, ingress: int) -> int | None:
        """How many chains port ``ingress``'s guest's next round may take (None: a full round).

        A guest whose last round went whole to one other guest and left it no buffer (its frames
        queued in that guest's backlog, or were dropped past it) is paced by that receiver: its next
        round takes only as many chains as the receiver has buffers posted, and none while it has
        none, so its frames wait in its own ring (which stops its driver's queue) instead of being
        taken and dropped on the cores both guests need. A wait lasts at most ``PACE_MAX_S``: then
        the round is taken whole, as for any sender, so a receiver that stopped costs the sender
        drops, not a stalled ring, and frames for anyone else wait at most that long. The pacing
        lasts while the guest's rounds go wholly to that receiver (with buffers to spare, its budget
        is just those buffers); a round that goes anywhere else ends it.

        Measured (two guests on two cores, A's 64-byte pktgen to B for 14 s, alternated): B received
        77-83k frames a second with pacing that ended at the first round with buffers to spare,
        87-92k with pacing that lasts, 55-64k with none; nicsim used 21-23 % of a core against 44 %;
        A's frames dropped went from 2.4M to none or a few thousand (waits of 1-4 ms alike)."""
        dest = self._paced.get(ingress)
        if dest is None:
            return None
        port = self._live.get(dest)
        if not isinstance(port, SwitchPort):
            self._paced.pop(ingress, None)
            return None
        room = self._room(dest)
        if room > 0:
            self._waiting.pop(ingress, None)
            self.pacing["rounds"] += 1
            return room
        now = self._clock()
        since = self._waiting.setdefault(ingress, now)
        if now - since >= PACE_MAX_S:
            del self._waiting[ingress]
            self._paced.pop(ingress, None)
            self.pacing["expired"] += 1
            return None
        self.pacing["waits"] += 1
        return 0

    def forwards_compiled(self, ingress: int) -> bool:
        """Whether port ``ingress``'s next round is likely to be forwarded by the compiled forward."""
        return self._compiled_dest(ingress) is not None

    def _compiled_dest(self, ingress: int) -> int | None:
        """The port the compiled forward tries first for port ``ingress``'s frames: the one its last
        frames went to, or the only other port; None when the forward is off or the port's sending
        side is impaired."""
        if switch_kernel.kernel() is None or (ingress, "tx") in self._impair:
            return None
        dest = self._dest_hint.get(ingress)
        if dest is None and len(self._live) == 2:
            dest = next(n for n in self._live if n != ingress)
        return dest

    def _forward_compiled(self, ingress: int, batch: TxBatch, sender: SwitchPort) -> int:
        """The first frames of a compiled round taken straight from the sender's chains, in one
        compiled call per run of frames for one port (:mod:`nicsim.ports.switch_kernel`), while each
        is a frame the general path would pass on unchanged to a learned station on another guest's
        port, unimpaired both ways: into that guest's buffers, its backlog once none is left, or
        dropped past the backlog, counted as the general path counts them. Returns how many; the
        general path takes the rest of the batch."""
        dest = self._compiled_dest(ingress)
        kernel = switch_kernel.kernel()
        sender_round = batch.round_arrays()
        if dest is None or kernel is None or sender_round is None:
            return 0
        fdb = self.fdb
        keys, ports, seen = fdb.arrays()
        now = self._clock()
        count = batch.count
        done = 0
        while dest is not None and done < count and dest != ingress and (dest, "rx") not in self._impair:
            port = self._live.get(dest)
            if not isinstance(port, SwitchPort):
                break
            extra = (*sender_round, sender.hdr_len, done, count, sender.tx_allow, self.offload,
                     port.rx_takes, keys, ports, seen, now, fdb.ageing, ingress, dest, self._head,
                     self._spots)  # fmt: skip
            got = port.sink.place_round(kernel, extra)
            if got is None:
                break
            if int(got[0]) < 0:
                raise RuntimeError(f"switch port {dest}: the pool refused to free what a round took")
            placed, why, where, gso = int(got[1]), int(got[3]), int(got[4]), int(got[5])
            dropped, queued = int(got[6]), int(got[7])
            fast = self._fast
            fast["calls"] += 1
            fast["frames"] += placed
            fast["queued"] += queued
            fast["dropped"] += dropped
            self._fast_stops[why] += 1
            taken = placed + queued + dropped  # in that order in the round
            if taken:
                self._went_to(dest)
                self.counters.received(ingress, batch.lengths[done : done + taken])
                if placed + queued:
                    self.counters.sent(dest, batch.lengths[done : done + placed + queued])
                if dropped:
                    self.counters.dropped(dest, "no_rx_buffer", dropped)
                fdb.counters["hit"] += taken
                if gso:  # passed on whole (or dropped after), as the general path counts it on both ports
                    self.counters.offloaded(ingress, {"rx_gso": gso})
                    self.counters.offloaded(dest, {"tx_gso": gso})
                done += taken
            if why != switch_kernel.ELSEWHERE or where < 0:
                break
            dest = self._dest_hint[ingress] = where  # the next frames are for another guest: try it
        return done

    def _room(self, dest: int) -> int:
        """Buffers guest ``dest`` has posted that no frame waits for (0 for anything but a guest)."""
        port = self._live.get(dest)
        if not isinstance(port, SwitchPort):
            return 0
        return max(port.sink.rx_space() - port.sink.rx_backlog(), 0)

    def _checked(self, ingress: int, views: list[Frame], lengths: npt.NDArray[np.uint32], headers: Headers,
                 allowed: Offloads) -> tuple[list[Frame], npt.NDArray[np.uint32], Headers]:  # fmt: skip
        """Drop (counted on ``ingress`` by reason) the frames whose header asks for what the guest did
        not negotiate, points outside the frame, or calls a frame GSO that is not a TCP/IP frame."""
        # NEEDS_CSUM is the one flag a driver sets on TX (§5.1.6.2); DATA_VALID from a guest would
        # tell the receiver to trust a checksum nobody checked.
        headers[:, 0] &= F_NEEDS_CSUM
        if len(views) <= _FEW:
            return self._checked_few(ingress, views, lengths, headers, allowed)
        codes = check(headers, lengths, allowed)
        gso = fields(headers)["gso_type"]
        is_gso = gso != GSO_NONE
        for i in np.flatnonzero(is_gso & (codes == OK)).tolist():
            if tcp_layout(views[i], int(gso[i])) is None:
                codes[i] = BAD_GSO_FRAME
        keep = codes == OK
        if is_gso.any():
            self.counters.offloaded(ingress, {"rx_gso": int(np.count_nonzero(is_gso & keep))})
        if keep.all():
            return views, lengths, headers
        for code, count in zip(*np.unique(codes[~keep], return_counts=True), strict=True):
            self.counters.dropped(ingress, REASONS[int(code)], int(count))
        idx = np.flatnonzero(keep)
        return [views[i] for i in idx.tolist()], lengths[idx], headers[idx]

    def _checked_few(self, ingress: int, views: list[Frame], lengths: npt.NDArray[np.uint32],
                     headers: Headers, allowed: Offloads) -> _Frames:  # fmt: skip
        """:meth:`_checked` for a few frames, with plain ints (:func:`check_one`): the same codes,
        drops and counts."""
        codes = [check_one(headers[i], n, allowed) for i, n in enumerate(lengths.tolist())]
        gso_kept, any_gso = 0, False
        for i, code in enumerate(codes):
            gso = int(headers[i, GSO_TYPE_OFFSET])
            if gso == GSO_NONE:
                continue
            any_gso = True
            if code == OK:
                if tcp_layout(views[i], gso) is None:
                    codes[i] = BAD_GSO_FRAME
                else:
                    gso_kept += 1
        if any_gso:
            self.counters.offloaded(ingress, {"rx_gso": gso_kept})
        if codes.count(OK) == len(codes):
            return views, lengths, headers
        for code in sorted(set(codes) - {OK}):
            self.counters.dropped(ingress, REASONS[code], codes.count(code))
        keep = [i for i, code in enumerate(codes) if code == OK]
        return [views[i] for i in keep], lengths[keep], headers[keep]

    def _finish(self, port: int, views: list[Frame], lengths: npt.NDArray[np.uint32], headers: Headers,
                takes: Offloads) -> tuple[list[Frame], npt.NDArray[np.uint32], Headers]:  # fmt: skip
        """The frames for port ``port``, whose far end takes ``takes``: what it cannot take is done in
        software (:func:`nicsim.ports.gso.finish`), counted on the port."""
        out, headers, done = finish(views, headers, takes)
        counts = done.as_dict()
        if counts:
            self.counters.offloaded(port, counts)
        if done.bad:
            self.counters.dropped(port, "bad_gso_frame", done.bad)
        if out is views or (len(out) == len(views) and not (done.segments or done.completed)):
            return out, lengths, headers
        return out, np.fromiter((f.shape[0] for f in out), np.uint32, len(out)), headers

    def forward_flat(self, ingress: int, data: Frame, offsets: npt.NDArray[np.int64],
                     lengths: npt.NDArray[np.uint32]) -> None:  # fmt: skip
        """Frames ``data[offsets[i]:offsets[i] + lengths[i]]`` port ``ingress`` sent (an uplink's): as
        :meth:`forward`; ``data`` may be reused once this returns (what waits is copied)."""
        self.counters.received(ingress, lengths)
        imp = self._impair.get((ingress, "tx"))
        if imp is not None:
            data, offsets, lengths = imp.offer(self._clock(), data, offsets, lengths)
        self._switch(ingress, _views(data, offsets, lengths), lengths)
        self._arm()

    def _switch(self, ingress: int, views: list[Frame], lengths: npt.NDArray[np.uint32],
                headers: Headers | None = None) -> None:  # fmt: skip
        if not views:
            return
        if ingress not in self._live:
            # Frames a tx delay held while their guest left: learning them would point its MACs at
            # an empty port, where frames would vanish uncounted.
            self.counters.dropped(ingress, "port_down", len(views))
            self._went_to(_MIXED)
            return
        now = self._clock()
        if len(views) <= _FEW:
            # A frame or two (a ping, an ACK, a TCP stream's GSO frames): plain ints, not numpy.
            out_few = self._lookup_few(ingress, views, now)
            dest = out_few[0]
            if dest >= 0:
                self._dest_hint[ingress] = dest
            if dest >= 0 and dest in self._live and out_few.count(dest) == len(out_few):
                self._went_to(dest)
                self._send(dest, views, lengths, now, queue=True, headers=headers)
                return
            out = np.array(out_few, np.int32)
        else:
            # Both addresses of every frame, 12 bytes each, in one small array: all the switch reads.
            heads = np.stack([v[:12] for v in views]).reshape(-1)
            at = np.arange(len(views), dtype=np.int64) * 12
            self.fdb.learn(mac_keys(heads, at, 6), ingress, now)
            out = self.fdb.lookup(mac_keys(heads, at, 0), now, ingress=ingress)
            if out[-1] >= 0:
                self._dest_hint[ingress] = int(out[-1])
        first = int(out[0])
        self._went_to(first if first >= 0 and bool((out == first).all()) else _MIXED)
        filtered = int(np.count_nonzero(out == FILTER))
        if filtered:
            self.counters.dropped(ingress, "filtered", filtered)
        if len(self._live) == 1:  # nobody else on the switch: what is not filtered goes nowhere
            if len(views) > filtered:
                self.counters.dropped(ingress, "no_peer", len(views) - filtered)
            return
        flood = out == FLOOD
        for dest, picked in fan_out(out, ingress, sorted(self._live)).items():
            # Flooded frames first (an ARP request before what follows it), then those for ``dest``.
            for part, queue in ((picked[flood[picked]], False), (picked[~flood[picked]], True)):
                if part.size:
                    self._send(dest, [views[i] for i in part.tolist()], lengths[part], now, queue=queue,
                               headers=None if headers is None else headers[part])  # fmt: skip

    def _lookup_few(self, ingress: int, views: list[Frame], now: float) -> list[int]:
        """Learn the source of each of a few frames, then look up each destination, as the batch
        calls do (every source first): the output port, FLOOD or FILTER of each."""
        fdb = self.fdb
        for v in views:
            fdb.learn_one(int.from_bytes(v[6:12].tobytes(), "big"), ingress, now)
        return [fdb.lookup_one(int.from_bytes(v[:6].tobytes(), "big"), now, ingress=ingress) for v in views]

    def _send(self, dest: int, views: list[Frame], lengths: npt.NDArray[np.uint32], now: float, *,
              queue: bool, headers: Headers | None = None) -> None:  # fmt: skip
        imp = self._impair.get((dest, "rx"))
        if headers is not None:
            # What the destination cannot take as is (its guest's GUEST_* features; an uplink and an
            # impaired link take nothing) is segmented or checksummed here.
            port = self._live.get(dest)
            takes = port.rx_offloads if port is not None and imp is None else NONE
            views, lengths, headers = self._finish(dest, views, lengths, headers, takes)
        if imp is None:
            self._deliver(dest, views, lengths, queue=queue, headers=headers)
            return
        data, starts = _flat(views, lengths)
        data, offsets, lengths = imp.offer(now, data, starts, lengths)
        self._deliver(dest, _views(data, offsets, lengths), lengths, queue=queue)

    def _deliver(self, dest: int, views: list[Frame], lengths: npt.NDArray[np.uint32], *,
                 queue: bool = True, headers: Headers | None = None) -> None:  # fmt: skip
        if not views:
            return
        port = self._live.get(dest)
        if port is None:  # a delayed frame whose guest left meanwhile
            self.counters.dropped(dest, "port_down", len(views))
            return
        # Into the buffers the destination has posted, or its bounded backlog, or dropped: the sink
        # never blocks, so a slow guest costs only itself. Flooded frames (broadcast, unknown
        # unicast) never wait in the backlog: a guest flooding the switch must not fill every other
        # guest's backlog and leave no room for the frames addressed to them.
        kept = port.deliver(views, queue=queue, headers=headers)
        self.counters.sent(dest, lengths[kept])
        refused = len(views) - int(np.count_nonzero(kept))
        if refused:
            # An uplink sends or drops at once (its port's stats say why): never a backlog.
            reason = "no_rx_buffer" if queue else "flood_no_rx_buffer"
            if isinstance(port, Uplink):
                reason = "uplink_tx"
            self.counters.dropped(dest, reason, refused)

    # -- the delay timer -------------------------------------------------------------------------

    def _arm(self) -> None:
        """Keep one timer, set for the earliest frame any impairment holds."""
        deadlines = [d for imp in self._impair.values() if (d := imp.next_deadline()) is not None]
        if not deadlines or self._loop is None:
            return
        at = min(deadlines)
        if self._timer is not None and self._timer_at is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_later(max(0.0, at - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        now = self._clock()
        for (number, direction), imp in list(self._impair.items()):
            if imp.next_deadline() is None:
                continue
            data, offsets, lengths = imp.due(now)
            if direction == "tx":
                self._switch(number, _views(data, offsets, lengths), lengths)
            else:
                self._deliver(number, _views(data, offsets, lengths), lengths)
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        for up in self._uplinks.values():
            if self._live.get(up.number) is up:
                del self._live[up.number]
                self.fdb.forget_port(up.number)
            up.close()

    # -- stats -----------------------------------------------------------------------------------

    def port_stats(self, number: int) -> dict[str, Any]:
        row = self.counters.port(number)
        row["macs"] = int(self.fdb.entries_per_port(number + 1)[number])
        impaired = {d: self._impair[(number, d)].stats() for d in DIRECTIONS if (number, d) in self._impair}
        if impaired:
            row["impair"] = impaired
        uplink = next((up for up in self._uplinks.values() if up.number == number), None)
        if uplink is not None:
            row["uplink"] = uplink.stats()
        return row

    def stats(self) -> dict[str, Any]:
        stopped = zip(switch_kernel.STOPS, self._fast_stops.tolist(), strict=True)
        stops = {name: int(n) for name, n in stopped if n}
        return {
            "fdb": {**self.fdb.counters, "entries": len(self.fdb)},
            # Frames the compiled forward placed itself, queued in a guest's backlog (no buffer left)
            # and dropped (the backlog full), in how many calls, and what ended each call (``done``:
            # the round's last frame; else the general path took the frame it stopped at).
            "compiled": {**self._fast, "stops": stops},
            # Rounds of a paced sender (tx_budget): taken up to its receiver's buffers, left in its
            # ring while the receiver had none, and waits that ran out (then taken whole).
            "pacing": dict(self.pacing),
            "ports": {name: self.port_stats(n) for name, n in self._slots.items()},
            "joined": sorted(name for name, n in self._slots.items() if n in self._live),
        }


class SwitchPort(Port):
    """One guest's port on a :class:`Switch`, named after the socket it serves."""

    name = "switch"

    def __init__(self, switch: Switch | None = None, port_name: str = "port0") -> None:
        super().__init__()
        self.switch = switch if switch is not None else Switch()
        self.port_name = port_name
        self.number = self.switch.slot(port_name)
        self._joined = False
        # With offloads, frames go with their virtio-net header, both ways (the device's vnet_hdr).
        self.vnet_hdr = self.switch.offload
        self.hdr_len = HDR_LEN_V1
        self.tx_offloads = NONE  # what the guest may ask on TX (CSUM, HOST_TSO4/6 negotiated)
        self.tx_allow = 0  # the same as the compiled checks' bits (nicsim.ports.fd_kernels.allowed)
        self.rx_offloads = NONE  # what it takes on RX (GUEST_CSUM, GUEST_TSO4/6)
        self.rx_takes = 0  # the same as the compiled forward's bits (nicsim.ports.fd_kernels.allowed)
        self.multiqueue = False  # the guest negotiated VIRTIO_NET_F_MQ

    @property
    def compiled_rounds(self) -> bool:  # type: ignore[override]
        """The switch forwards this guest's rounds in one compiled call now: even a round of one
        frame costs less that way than the short path's plain ints (a ping's forward)."""
        return self._joined and self.switch.forwards_compiled(self.number)

    def features(self) -> int:
        return OFFLOADS if self.switch.offload else 0

    def negotiated(self, features: int) -> None:
        self.hdr_len = vnet_hdr_len(features)
        self.tx_offloads = Offloads.tx(features)
        self.tx_allow = allowed(self.tx_offloads)
        self.rx_offloads = Offloads.rx(features)
        self.rx_takes = allowed(self.rx_offloads)
        self.multiqueue = bool(features >> VIRTIO_NET_F_MQ & 1)

    def attach(self, sink: Any) -> None:
        super().attach(sink)
        self.switch.join(self)
        self._joined = True

    def start_io(self, loop: asyncio.AbstractEventLoop) -> None:
        self.switch.start_io(loop)

    def deliver(self, views: list[Frame], *, queue: bool = True,
                headers: Headers | None = None) -> npt.NDArray[np.bool_]:  # fmt: skip
        """Frames the switch sends this guest: into its posted buffers (one copy), its backlog, or not;
        with their virtio-net headers (offloads on: zero ones when none came with them)."""
        if not self.vnet_hdr:
            return self.sink.push_views(views, queue=queue)
        if headers is None:
            n = len(views)
            few = n <= _ZERO_HEADERS.shape[0]
            headers = _ZERO_HEADERS[:n] if few else np.zeros((n, HDR_FIELDS), np.uint8)
        return self.sink.push_views(views, queue=queue, headers=headers)

    def tx_budget(self, pair: int) -> int | None:
        return self.switch.tx_budget(self.number) if self._joined else None

    def transmit(self, batch: TxFrames) -> bool:
        if batch.count == 0 or not self._joined:
            return True
        self.switch.forward(self.number, batch, self)
        return True  # every frame is copied out: the sender's buffers go back now

    def close(self) -> None:
        if self._joined:
            self.switch.leave(self)
            self._joined = False
        super().close()

    def stats(self) -> dict[str, Any]:
        # What the guest negotiated: offloads it may ask for (tx) and takes (rx).
        offloads = {"tx": self.tx_offloads.names(), "rx": self.rx_offloads.names()}
        return {"port": self.port_name, "number": self.number, **self.switch.port_stats(self.number),
                "fdb": {**self.switch.fdb.counters, "entries": len(self.switch.fdb)},
                "offloads": offloads}  # fmt: skip
