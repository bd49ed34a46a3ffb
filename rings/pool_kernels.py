"""The pool's batch operations as compiled kernels' sources: ``free_batch`` of normal descriptors and
``track``, each in one loop that checks everything before it writes anything, and declines (the pool's
numpy path then raises the precise error) whatever it does not take. Plain Python over arrays;
:mod:`rings.kernels` compiles them, the pool calls them through it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def _free_normal_py(
    idx: npt.NDArray[Any], state: npt.NDArray[np.uint8], stack: npt.NDArray[np.intp], used: int, capacity: int
) -> int:  # pragma: no cover - compiled by numba
    """``PacketPool.free_batch`` of normal (not overflow) descriptors, every one in use and none twice:
    marks them free and pushes them reversed, as the pool does; returns the new ``used``. -1, with
    nothing changed, for anything else (the pool's numpy path then raises the precise error)."""
    n = idx.shape[0]
    for j in range(n):
        i = idx[j]
        if i < 0 or i >= capacity or state[i] != 1:  # 1: STATE_IN_USE; 2: seen earlier in this batch
            for k in range(j):
                state[idx[k]] = 1
            return -1
        state[i] = 2
    for j in range(n):
        state[idx[j]] = 0
        stack[used - 1 - j] = idx[j]
    left: int = used - n
    return left


def _track_py(
    idx: npt.NDArray[Any], state: npt.NDArray[np.uint8], queue_f: npt.NDArray[np.int32],
    head_f: npt.NDArray[np.uint16], addr_f: npt.NDArray[np.uint64], length_f: npt.NDArray[np.uint32],
    queue: int, heads: npt.NDArray[np.uint16], addrs: npt.NDArray[np.uint64], lengths: npt.NDArray[np.uint32],
) -> bool:  # pragma: no cover - compiled by numba
    """``PacketPool.track`` of allocated descriptors: False, with nothing written, when an index is
    out of range or not allocated (the pool's numpy path then raises the precise error)."""
    size = state.shape[0]
    for j in range(idx.shape[0]):
        i = idx[j]
        if i < 0 or i >= size or state[i] == 0:
            return False
    for j in range(idx.shape[0]):
        i = idx[j]
        queue_f[i] = queue
        head_f[i] = heads[j]
        addr_f[i] = addrs[j]
        length_f[i] = lengths[j]
    return True
