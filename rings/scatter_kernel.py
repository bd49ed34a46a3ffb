"""A compiled copy of one frame into the device-writable segments of the receive chains it fills.

:func:`_scatter_frame_py` writes a header and a frame, as if they were one run of bytes, across given
segments of a round's chains (``ChainBatch`` fields), each segment filled before the next: a frame
the receiver takes in several buffers (mergeable buffers: a 64 KB GSO frame in 17 of them) costs one
call instead of a Python slice copy and a view per segment. Like the kernels of
:mod:`rings.round_kernels`, it is plain Python over arrays, compiled by ``kernels.enable()``; it
declines, writing nothing, what it cannot write whole, and the caller's numpy code stays the
reference the tests compare it with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

_Arr = npt.NDArray[Any]

__all__: list[str] = []


def _scatter_frame_py(
    datas: Any, s_region: _Arr, s_offset: _Arr, s_len: _Arr, s_writable: _Arr, segs: _Arr, head: _Arr,
    frame: _Arr,
) -> int:  # pragma: no cover - compiled by numba
    """Write ``head`` then ``frame`` into segments ``segs`` (indices into the ``s_*`` arrays), in
    order; ``datas`` is the tuple of the guest memory regions' bytes. Returns the bytes written, or
    -1 having written nothing when a segment is not device-writable or untranslated, or the segments
    hold fewer bytes than ``head`` and ``frame``."""
    hn = head.shape[0]
    total = hn + frame.shape[0]
    room = np.int64(0)
    for k in range(segs.shape[0]):
        s = segs[k]
        if s_region[s] < 0 or not s_writable[s]:
            return -1
        room += np.int64(s_len[s])
    if room < total:
        return -1
    done = 0
    for k in range(segs.shape[0]):
        if done >= total:
            break
        s = segs[k]
        take = min(np.int64(s_len[s]), total - done)
        off = np.intp(s_offset[s])
        buf = datas[s_region[s]][off : off + take]
        j = 0
        while j < take and done < hn:
            buf[j] = head[done]
            j += 1
            done += 1
        rest = take - j
        src = frame[done - hn : done - hn + rest]
        # An element loop, which numba vectorises; a slice assignment copies byte by byte.
        for b in range(rest):
            buf[j + b] = src[b]
        done += rest
    return done
