"""The packet pool's descriptor record and state values (NDIS 5.x packet-pool contract, see
:mod:`rings.pool`), apart from the pool so that the compiled kernels that write the records
(:mod:`rings.kernels`) can know their layout without importing the pool.
"""

from __future__ import annotations

import numpy as np

# NDIS keeps descriptor counts in a USHORT: NumberOfDescriptors + NumberOfOverflowDescriptors <= 0xFFFF.
MAX_DESCRIPTORS = 0xFFFF
STATE_FREE = 0
STATE_IN_USE = 1
UNTRACKED = -1  # ``queue`` of a descriptor allocated but not yet given to ``track()``


def descriptor_dtype(reserved: int) -> np.dtype[np.void]:
    """The record of one descriptor; its ``itemsize`` is ``NdisPacketSize(reserved)``.

    Aligned (so ``addr`` sits on 8 bytes and the itemsize is a multiple of 8) and little-endian like
    the ring layouts. ``ever`` tells a double free (1) from an index never handed out (0).
    """
    return np.dtype(
        [
            ("addr", "<u8"),  # guest-physical address of the buffer
            ("length", "<u4"),  # its length in bytes
            ("queue", "<i4"),  # virtqueue holding it, UNTRACKED until track()
            ("head", "<u2"),  # head descriptor index of the chain in that queue
            ("state", "u1"),  # STATE_FREE / STATE_IN_USE
            ("ever", "u1"),  # 1 once the descriptor has been allocated at least once
            ("reserved", "u1", (reserved,)),  # ProtocolReserved: the owner's bytes, zeroed on allocate
        ],
        align=True,
    )
