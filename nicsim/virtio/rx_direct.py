"""One copy from another guest's memory into this guest's receive buffers (the switch's path).

This module owns :func:`write_frames`: given frames as views (of the sending guest's TX buffers, say),
the chains an RX round took and the plan :func:`~nicsim.virtio.rx.plan_rx` made for them, it writes
each frame's virtio-net header and bytes straight into the chain(s) the plan gave it, segment by
segment, with no staging buffer in between: the frame's bytes are copied once. The header is ours
(flags 0 and GSO_NONE, §5.1.6.4.1: the frames carry complete checksums), or the sender's flags and
GSO fields when the switch passes them on to a driver that negotiated GUEST_CSUM; num_buffers is
always from the plan.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from nicsim.virtio.port import HDR_LEN_V1, NUM_BUFFERS_OFFSET
from rings import kernels
from rings.chains import ChainBatch
from rings.memory import GuestMemory
from rings.split import region_bytes


def _writable_views(
    mem: GuestMemory, cb: ChainBatch, chains: npt.NDArray[np.int64]
) -> list[npt.NDArray[np.uint8]]:
    """The device-writable segments of ``chains``, in order, as views of guest memory."""
    return [cb.segment_view(mem, s) for k in chains.tolist() for s in cb.segments(k) if cb.seg_writable[s]]


def _stream(dst: list[npt.NDArray[np.uint8]], parts: tuple[npt.NDArray[np.uint8], ...]) -> None:
    """Copy ``parts`` one after another into ``dst``'s segments, spilling from one to the next."""
    seg, at = 0, 0
    for part in parts:
        done, n = 0, part.shape[0]
        while done < n:
            room = dst[seg].shape[0] - at
            if room == 0:
                seg, at = seg + 1, 0
                continue
            k = min(room, n - done)
            dst[seg][at : at + k] = part[done : done + k]
            done += k
            at += k


def write_frames(
    mem: GuestMemory, cb: ChainBatch, good_pos: npt.NDArray[np.int64], hdr_len: int,
    frames: Sequence[npt.NDArray[np.uint8]], placed: npt.NDArray[np.int64], nbufs: npt.NDArray[np.int64],
    need: npt.NDArray[np.int64], *, headers: npt.NDArray[np.uint8] | None = None,
) -> None:  # fmt: skip
    """Write frame ``placed[i]`` with its header into the next ``nbufs[i]`` good chains, in order.
    The plan guarantees the room (it sized every chain's share from ``need``, header + frame).
    ``headers``: the first bytes of each frame's header (flags, GSO fields) as the sender left them,
    for a driver that takes them (GUEST_CSUM); else they are zero."""
    header = np.zeros(hdr_len, np.uint8)
    if hdr_len >= HDR_LEN_V1:
        header[NUM_BUFFERS_OFFSET] = 1
    keep = min(hdr_len, NUM_BUFFERS_OFFSET) if headers is not None else 0
    n = int(placed.shape[0])
    if n and int(nbufs.max()) == 1:
        # The common case (Linux posts one writable buffer per chain, big enough for a frame): each
        # frame goes whole into its chain's first segment, two slice copies and no segment walk.
        seg = cb.first_seg[good_pos[:n]]
        if bool((cb.seg_writable[seg] & (cb.seg_len[seg] >= need[placed])).all()):
            for i, region, offset, size in zip(placed.tolist(), cb.seg_region[seg].tolist(),
                                               cb.seg_offset[seg].tolist(), need[placed].tolist(),
                                               strict=True):  # fmt: skip
                dst = mem.segment(region, offset, size)
                dst[:hdr_len] = header
                if keep:
                    assert headers is not None
                    dst[:keep] = headers[i, :keep]
                dst[hdr_len:] = frames[i]
            return
    # A frame over several buffers (mergeable): one compiled call each, when every chain is one
    # segment (Linux's mergeable buffers); else, or with the kernels off, a view and a copy per segment.
    scatter = kernels.scatter_frame
    one_each = scatter is not None and bool((cb.seg_count[good_pos] == 1).all())
    lone = cb.first_seg[good_pos] if one_each else None
    datas = region_bytes(mem) if lone is not None else ()
    chain = 0
    for i, nb in zip(placed.tolist(), nbufs.tolist(), strict=True):
        if hdr_len >= HDR_LEN_V1:
            header[NUM_BUFFERS_OFFSET] = nb & 0xFF
            header[NUM_BUFFERS_OFFSET + 1] = nb >> 8
        if keep:
            assert headers is not None
            header[:keep] = headers[i, :keep]
        if lone is None or scatter is None or scatter(datas, cb.seg_region, cb.seg_offset, cb.seg_len,
                                                      cb.seg_writable, lone[chain : chain + nb], header,
                                                      frames[i]) < 0:  # fmt: skip
            _stream(_writable_views(mem, cb, good_pos[chain : chain + nb]), (header, frames[i]))
        chain += nb
