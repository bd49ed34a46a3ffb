"""Frames the device sends on the guest's behalf: the RARP that announces its MAC after a migration.

Who announces a vhost-user guest, in QEMU 7.2 (``net/announce.c``, ``net/vhost-user.c``,
``hw/virtio/vhost-user.c``, ``hw/net/virtio-net.c``, ``hw/net/vhost_net.c``): after a migration (or on
QMP ``announce-self``) QEMU's ``qemu_announce_self`` builds a 60-byte RARP for each NIC's MAC and hands
it to the NIC's peer, and calls the NIC's own ``announce`` hook. For a vhost-user peer QEMU never puts
that RARP on any wire itself; its ``vhost_user_receive`` takes any 60-byte frame as "announce this MAC"
and calls ``vhost_user_migration_done``, which

- does nothing if the driver acked ``VIRTIO_NET_F_GUEST_ANNOUNCE``: then the NIC's ``announce`` hook
  (``virtio_net_announce``, which also needs ``VIRTIO_NET_F_CTRL_VQ``, the control queue QEMU keeps
  for itself) sets ``VIRTIO_NET_S_ANNOUNCE`` in the config status and raises a config interrupt; the
  guest's driver sends its own gratuitous ARP / IPv6 neighbour advertisements through the TX ring (the
  backend forwards them like any frame) and acks with ``VIRTIO_NET_CTRL_ANNOUNCE_ACK`` on the control
  queue, which QEMU handles;
- else sends ``VHOST_USER_SEND_RARP`` with the MAC in the first 6 bytes of its u64 payload, if the
  backend negotiated ``VHOST_USER_PROTOCOL_F_RARP``: the *backend* then broadcasts the RARP;
- else fails ("Vhost user backend fails to broadcast fake RARP"): nobody announces the guest.

``VIRTIO_NET_F_GUEST_ANNOUNCE`` is one of the bits QEMU lets a vhost-user backend veto (its
``user_feature_bits``), so the guest sees it only if the backend offers it. nicsim offers both: a
guest whose driver takes GUEST_ANNOUNCE announces itself, any other is announced by this module's RARP.
Both were seen with QEMU 7.2 under TCG (``vectors=0``) and ``announce-self`` (``tests/test_e2e_mtu.py``):
a Linux guest's gratuitous ARP with GUEST_ANNOUNCE; with ``guest_announce=off``, one SEND_RARP a round.

This module owns :func:`rarp_frame`, the frame QEMU's ``announce_self_create`` builds (and DPDK's vhost
library sends for SEND_RARP), and :class:`OwnFrames`, a :class:`~nicsim.virtio.port.TxFrames` batch of
frames the device made itself, so that a port sends them the way it sends the guest's (the switch
learns the source MAC and floods the broadcast; the tap writes it to its TAP).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

ETH_P_RARP = 0x8035
RARP_REQUEST_REVERSE = 3  # ARP opcode 3, "request reverse" (RFC 903)
RARP_LEN = 60  # the Ethernet minimum without the FCS, as QEMU sends it
BROADCAST = b"\xff" * 6


def rarp_frame(mac: bytes) -> bytes:
    """The 60-byte RARP QEMU's ``announce_self_create`` builds for ``mac``: broadcast, source ``mac``,
    EtherType 0x8035; hardware Ethernet (1), protocol IPv4 (0x0800), lengths 6 and 4, opcode 3; sender
    and target hardware address ``mac``, both protocol addresses 0.0.0.0; zero padding."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    zero_ip = bytes(4)
    frame = (BROADCAST + mac + ETH_P_RARP.to_bytes(2, "big")
             + (1).to_bytes(2, "big") + (0x0800).to_bytes(2, "big") + bytes((6, 4))
             + RARP_REQUEST_REVERSE.to_bytes(2, "big") + mac + zero_ip + mac + zero_ip)  # fmt: skip
    return frame + bytes(RARP_LEN - len(frame))


class OwnFrames:
    """Frames the device made (implements :class:`~nicsim.virtio.port.TxFrames`): owned bytes, so a
    port may keep them as long as it likes; ``iovec`` puts a zeroed virtio-net header of ``hdr_len``
    bytes in front (flags 0, GSO_NONE: nothing for the other side to do, §5.1.6)."""

    def __init__(self, frames: Sequence[bytes], *, hdr_len: int, pair: int = 0) -> None:
        self._frames = [np.frombuffer(f, np.uint8) for f in frames]
        self._lengths = np.array([len(f) for f in frames], np.uint32)
        self._hdr = np.zeros(hdr_len, np.uint8)
        self._pair = pair
        self.completed = False

    @property
    def pair(self) -> int:
        return self._pair

    @property
    def count(self) -> int:
        return len(self._frames)

    @property
    def lengths(self) -> npt.NDArray[np.uint32]:
        return self._lengths

    @property
    def frame_bytes(self) -> int:
        return int(self._lengths.sum())

    def byte_sum(self) -> None:
        return None

    def frame(self, i: int) -> npt.NDArray[np.uint8]:
        return self._frames[i]

    def gather(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        starts = np.cumsum(self._lengths, dtype=np.int64) - self._lengths
        data = np.concatenate(self._frames) if self._frames else np.zeros(0, np.uint8)
        return data, starts

    def iovec(self, i: int) -> list[npt.NDArray[np.uint8]]:
        return [self._hdr, self._frames[i]]

    def complete(self) -> None:
        self.completed = True
