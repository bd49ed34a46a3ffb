"""Feature bit numbers, with the names the virtio 1.2 and vhost-user specs give them.

This module owns every feature constant the vhost-user layer and the device use: virtio device
feature bits (``VIRTIO_F_*``, ``VIRTIO_NET_F_*``, ``VIRTIO_RING_F_*``), the vhost-specific bits
(``VHOST_F_LOG_ALL``, ``VHOST_USER_F_PROTOCOL_FEATURES``), the vhost-user protocol feature bits
(``VHOST_USER_PROTOCOL_F_*``), the sets nicsim offers by default, and helpers that turn masks into
names for logs. Constants are *bit numbers*; ``bit(n)`` / ``mask(...)`` build masks.
"""

from __future__ import annotations

from collections.abc import Iterable

# --- virtio-net device features (virtio 1.2 §5.1.3) -------------------------------------------------
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

# --- transport / ring features (virtio 1.2 §6) ----------------------------------------------------
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VHOST_F_LOG_ALL = 26
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
# vhost-user reuses the reserved (UNUSED) bit 30 to announce protocol-feature negotiation.
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_IOMMU_PLATFORM = VIRTIO_F_ACCESS_PLATFORM  # the older name, still used by the vhost-user spec
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38

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


def bit(n: int) -> int:
    """The mask of feature bit number ``n``."""
    return 1 << n


def mask(bits: Iterable[int]) -> int:
    """The mask with every bit number in ``bits`` set."""
    out = 0
    for n in bits:
        out |= 1 << n
    return out


def has(features: int, n: int) -> bool:
    """Whether bit number ``n`` is set in ``features``."""
    return bool(features >> n & 1)


DEFAULT_VIRTIO_FEATURES = mask(
    (
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VHOST_USER_F_PROTOCOL_FEATURES,
    )
)
"""What the backend offers in GET_FEATURES unless the device asks for more (offloads, later)."""

# Offloads (virtio 1.2 §5.1.3): a device offers these only when its port can honour them.
OFFLOAD_FEATURES = mask((
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_UFO,
))  # fmt: skip

DEFAULT_PROTOCOL_FEATURES = mask(
    (
        VHOST_USER_PROTOCOL_F_MQ,
        VHOST_USER_PROTOCOL_F_REPLY_ACK,
        VHOST_USER_PROTOCOL_F_CONFIG,
        VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS,
        VHOST_USER_PROTOCOL_F_STATUS,
    )
)
"""What the backend offers in GET_PROTOCOL_FEATURES (INFLIGHT_SHMFD is added only on request)."""


def _names(prefixes: tuple[str, ...]) -> dict[int, str]:
    out: dict[int, str] = {}
    for name, value in globals().items():
        if name.startswith(prefixes) and isinstance(value, int) and value not in out:
            out[value] = name
    return out


_VIRTIO_NAMES = _names(("VIRTIO_F_", "VIRTIO_NET_F_", "VIRTIO_RING_F_", "VHOST_F_", "VHOST_USER_F_"))
_PROTOCOL_NAMES = _names(("VHOST_USER_PROTOCOL_F_",))


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
