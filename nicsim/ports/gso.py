"""Offloads done in software, for a receiver that cannot take a frame as its sender left it.

This module owns :func:`segment` (a TCP GSO frame, IPv4 or IPv6, cut into segments of ``gso_size``
bytes of payload: per segment the IP total or payload length, the IPv4 id and header checksum, the TCP
sequence number, flags and checksum, as Linux's ``tcp_gso_segment`` writes them), :func:`complete_csum`
(a partial checksum, virtio's NEEDS_CSUM, completed on a copy) and :func:`finish`, which applies
either to the frames of a batch whose receiver lacks the offload their virtio-net header asks of it.

Segmentation is numpy work per GSO frame, none per segment: the segments are rows of one array (the
headers broadcast, the payload one reshaped copy), their fields written a column at a time and their
checksums summed a row at a time. The sender's buffers are never written: what changes is a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from nicsim.ports.vnet_hdr import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    HDR_FIELDS,
    Headers,
    Offloads,
    TcpLayout,
    fields,
    tcp_layout,
)  # fmt: skip

__all__ = ["Finished", "complete_csum", "finish", "segment"]

Frame = npt.NDArray[np.uint8]
TCP_CWR, TCP_PSH, TCP_FIN = 0x80, 0x08, 0x01


def _fold(total: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    for _ in range(3):  # sums of up to 2**32 words fit 48 bits: three folds reach 16
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _put16(out: npt.NDArray[np.uint8], at: int, value: npt.NDArray[np.integer[Any]]) -> None:
    out[:, at] = (value >> 8) & 0xFF
    out[:, at + 1] = value & 0xFF


def _be(frame: Frame, at: int, size: int) -> int:
    return int.from_bytes(frame[at : at + size].tobytes(), "big")


def _words(region: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """Each row's sum of big-endian 16-bit words (rows of even length)."""
    sums: npt.NDArray[np.uint64] = region.view(">u2").sum(axis=-1, dtype=np.uint64)
    return sums


def segment(frame: Frame, layout: TcpLayout, gso_size: int) -> tuple[Frame, npt.NDArray[np.int64],
                                                                       npt.NDArray[np.uint32]]:  # fmt: skip
    """The segments of TCP GSO frame ``frame`` (headers at ``layout``), ``gso_size`` bytes of payload
    each (the last one the rest): (flat bytes, start offsets, lengths), with complete checksums."""
    hl, l3, l4 = layout.payload, layout.l3, layout.l4
    mss = max(1, gso_size)
    pay = int(frame.shape[0]) - hl
    count = max(1, -(-pay // mss))
    stride = hl + mss + ((hl + mss) & 1)  # even rows: the TCP part of each is whole 16-bit words
    out = np.empty((count, stride), np.uint8)
    out[:, :hl] = frame[:hl]
    full = count - 1
    if full:
        out[:full, hl : hl + mss] = frame[hl : hl + full * mss].reshape(full, mss)
    last = pay - full * mss
    out[full, hl : hl + last] = frame[hl + full * mss :]
    out[full, hl + last :] = 0
    out[:, hl + mss :] = 0  # the pad byte of odd rows
    plen = np.full(count, mss, np.int64)
    plen[-1] = last
    seq = np.arange(count, dtype=np.int64)
    if layout.ipv6:
        _put16(out, l3 + 4, (hl - l3 - 40) + plen)
        pseudo = int(_words(frame[l3 + 8 : l3 + 40]))
    else:
        _put16(out, l3 + 2, (hl - l3) + plen)
        _put16(out, l3 + 4, (_be(frame, l3 + 4, 2) + seq) & 0xFFFF)
        out[:, l3 + 10 : l3 + 12] = 0
        _put16(out, l3 + 10, ~_fold(_words(out[:, l3:l4])) & 0xFFFF)
        pseudo = int(_words(frame[l3 + 12 : l3 + 20]))
    seqno = (_be(frame, l4 + 4, 4) + seq * mss) & 0xFFFFFFFF
    _put16(out, l4 + 4, seqno >> 16)
    _put16(out, l4 + 6, seqno & 0xFFFF)
    flags = np.full(count, int(frame[l4 + 13]), np.uint8)
    flags[1:] &= ~TCP_CWR & 0xFF  # CWR on the first segment only, FIN and PSH on the last only
    flags[:-1] &= ~(TCP_FIN | TCP_PSH) & 0xFF
    out[:, l4 + 13] = flags
    out[:, l4 + 16 : l4 + 18] = 0
    tcp_len = (hl - l4) + plen
    total = _words(out[:, l4:]) + np.uint64(pseudo + 6) + tcp_len.astype(np.uint64)
    _put16(out, l4 + 16, ~_fold(total) & 0xFFFF)
    return out.reshape(-1), seq * stride, (hl + plen).astype(np.uint32)


def complete_csum(frame: Frame, csum_start: int, csum_offset: int) -> Frame:
    """A copy of ``frame`` with the checksum NEEDS_CSUM asks for (§5.1.6.2) written at ``csum_start +
    csum_offset``: the one's complement sum from ``csum_start`` to the end, over the pseudo-header sum
    the sender left in that field. The caller checked that the field lies inside the frame."""
    out = frame.copy()
    region = out[csum_start:]
    if region.shape[0] % 2:
        region = np.concatenate((region, np.zeros(1, np.uint8)))
    value = int(~_fold(np.asarray(_words(region), np.uint64)) & 0xFFFF) or 0xFFFF  # 0 means none for UDP
    at = csum_start + csum_offset
    out[at], out[at + 1] = value >> 8, value & 0xFF
    return out


@dataclass
class Finished:
    """What :func:`finish` did: frames passed with their offload as is, segmented, segments made,
    checksums completed, and frames dropped because they were not the TCP frame their header said."""

    passed: int = 0
    segmented: int = 0
    segments: int = 0
    completed: int = 0
    bad: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts that are not 0, by the names a switch port's ``offload`` counters use."""
        out = {"tx_gso": self.passed, "gso_segmented": self.segmented, "segments": self.segments,
               "csum_completed": self.completed}  # fmt: skip
        return {k: v for k, v in out.items() if v}


def finish(
    frames: Sequence[Frame], headers: Headers, takes: Offloads
) -> tuple[list[Frame], Headers, Finished]:
    """Frames (and their headers) for a receiver that takes ``takes``: a GSO frame it cannot take is
    segmented, a partial checksum it cannot take completed (both then carry a zero header); the rest
    go as they are. Returns the frames, their headers and what was done."""
    h = fields(headers)
    gso = h["gso_type"]
    needs = (h["flags"] & F_NEEDS_CSUM) != 0
    is_gso = gso != GSO_NONE
    cut = ((gso == GSO_TCPV4) & (not takes.tso4)) | ((gso == GSO_TCPV6) & (not takes.tso6))
    fix = needs & ~is_gso & (not takes.csum)
    done = Finished(passed=int(np.count_nonzero(is_gso & ~cut)))
    work = np.flatnonzero(cut | fix)
    if not work.size:
        return list(frames), headers, done
    out: list[Frame] = []
    rows: list[int] = []  # the header row each output frame takes (-1: a zero header)
    todo = set(work.tolist())
    for i, f in enumerate(frames):
        if i not in todo:
            out.append(f)
            rows.append(i)
        elif fix[i]:
            out.append(complete_csum(f, int(h["csum_start"][i]), int(h["csum_offset"][i])))
            rows.append(-1)
            done.completed += 1
        else:
            layout = tcp_layout(f, int(gso[i]))
            if layout is None:
                done.bad += 1
                continue
            data, offsets, lengths = segment(f, layout, int(h["gso_size"][i]))
            out.extend(data[o : o + n] for o, n in zip(offsets.tolist(), lengths.tolist(), strict=True))
            rows.extend([-1] * lengths.shape[0])
            done.segmented += 1
            done.segments += int(lengths.shape[0])
    picked = np.asarray(rows, np.int64)
    new = np.zeros((picked.shape[0], HDR_FIELDS), np.uint8)
    keep = picked >= 0
    new[keep] = headers[picked[keep]]
    return out, new, done
