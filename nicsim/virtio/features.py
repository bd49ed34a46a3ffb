"""Virtio feature bit numbers, with the names the virtio 1.2 spec gives them.

This module owns the bits of the device feature word that belong to virtio itself: the virtio-net
device bits (``VIRTIO_NET_F_*``, §5.1.3), the transport and ring bits (``VIRTIO_F_*``, §6), the
offloads a device may offer only when its port can honour them, the spec name of each bit, and the
helpers that build and test masks. Constants are *bit numbers*; ``bit(n)`` / ``mask(...)`` build masks.
The vhost-user protocol's own bits (and the vhost bits it reserves in the same word) live in
:mod:`nicsim.vhost.features`, which builds on this module.
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

# --- transport / ring features (virtio 1.2 §6; Linux spells 28 and 29 VIRTIO_RING_F_*) ------------
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33  # the vhost-user spec still says IOMMU_PLATFORM
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38


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


# Offloads (virtio 1.2 §5.1.3): a device offers these only when its port can honour them.
OFFLOAD_FEATURES = mask((
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_UFO,
))  # fmt: skip


def names_by_bit(namespace: dict[str, object], prefixes: tuple[str, ...]) -> dict[int, str]:
    """Bit number -> constant name, for the int constants in ``namespace`` whose names start with one
    of ``prefixes`` (the first name wins where two share a number)."""
    out: dict[int, str] = {}
    for name, value in namespace.items():
        if name.startswith(prefixes) and isinstance(value, int) and value not in out:
            out[value] = name
    return out


VIRTIO_FEATURE_NAMES = names_by_bit(globals(), ("VIRTIO_F_", "VIRTIO_NET_F_"))
"""The spec name of every virtio bit above (the vhost layer adds its own bits of the same word)."""
