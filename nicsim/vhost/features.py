"""Feature bits of the vhost-user protocol, with the names the vhost-user spec gives them.

This module owns the vhost bits reserved in the device feature word (``VHOST_F_LOG_ALL``,
``VHOST_USER_F_PROTOCOL_FEATURES``), the vhost-user protocol feature bits (``VHOST_USER_PROTOCOL_F_*``),
the sets the backend offers by default, and :func:`feature_names`, which names the bits of either word
for logs. The virtio bits themselves (``VIRTIO_F_*``, ``VIRTIO_NET_F_*``) and the mask helpers belong to
:mod:`nicsim.virtio.features`; ``bit``, ``mask`` and ``has`` are re-exported here for the protocol's
own feature words. Constants are *bit numbers*.
"""

from __future__ import annotations

from nicsim.virtio.features import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_FEATURE_NAMES,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    names_by_bit,
)
from nicsim.virtio.features import bit as bit
from nicsim.virtio.features import has as has
from nicsim.virtio.features import mask as mask

# --- vhost bits in the device feature word (vhost-user spec, "Feature bits") -----------------------
VHOST_F_LOG_ALL = 26
# vhost-user reuses the reserved (UNUSED) bit 30 to announce protocol-feature negotiation.
VHOST_USER_F_PROTOCOL_FEATURES = 30

# --- vhost-user protocol features (vhost-user spec, "Protocol features") ---------------------------
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1
VHOST_USER_PROTOCOL_F_RARP = 2
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_NET_MTU = 4
VHOST_USER_PROTOCOL_F_BACKEND_REQ = 5
VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = 6
VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = 7
VHOST_USER_PROTOCOL_F_PAGEFAULT = 8
VHOST_USER_PROTOCOL_F_CONFIG = 9
VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = 10
VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = 11
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 12
VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13
VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 14
VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
VHOST_USER_PROTOCOL_F_STATUS = 16
VHOST_USER_PROTOCOL_F_XEN_MMAP = 17
VHOST_USER_PROTOCOL_F_SHARED_OBJECT = 18
VHOST_USER_PROTOCOL_F_DEVICE_STATE = 19


DEFAULT_VIRTIO_FEATURES = mask(
    (
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_F_EVENT_IDX,
        VIRTIO_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VHOST_USER_F_PROTOCOL_FEATURES,
    )
)
"""What the backend offers in GET_FEATURES unless the device asks for more (offloads, later)."""

DEFAULT_PROTOCOL_FEATURES = mask(
    (
        VHOST_USER_PROTOCOL_F_MQ,
        VHOST_USER_PROTOCOL_F_RARP,
        VHOST_USER_PROTOCOL_F_REPLY_ACK,
        VHOST_USER_PROTOCOL_F_NET_MTU,
        VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS,
        VHOST_USER_PROTOCOL_F_STATUS,
    )
)
"""What the backend offers in GET_PROTOCOL_FEATURES. NET_MTU: without it QEMU never tells the backend the
``host_mtu`` it gives the guest (it sends NET_SET_MTU only when this bit is negotiated; seen with QEMU
7.2, its ``x-mtu-bypass-backend`` default offers the guest VIRTIO_NET_F_MTU and the MTU even from a
backend that offers neither, and leaves the bit out of SET_FEATURES). RARP: for a
guest without GUEST_ANNOUNCE, QEMU asks the backend to announce it (SEND_RARP). INFLIGHT_SHMFD and
CONFIG are added only on request: QEMU's virtio-net device never reads its config space over vhost-user
(it keeps its own), and QEMU 7.2 warns "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but
QEMU does not" on every connection to a net backend that offers CONFIG."""


_VIRTIO_NAMES = {**VIRTIO_FEATURE_NAMES, **names_by_bit(globals(), ("VHOST_F_", "VHOST_USER_F_"))}
_PROTOCOL_NAMES = names_by_bit(globals(), ("VHOST_USER_PROTOCOL_F_",))


def feature_names(features: int, *, protocol: bool = False) -> list[str]:
    """The spec names of the bits set in ``features`` (``BIT_n`` for bits without a name)."""
    table = _PROTOCOL_NAMES if protocol else _VIRTIO_NAMES
    out = []
    n = 0
    while features >> n:
        if features >> n & 1:
            out.append(table.get(n, f"BIT_{n}"))
        n += 1
    return out
