"""Two throwaway namespaces standing in for two hosts joined by a VXLAN tunnel, for the vxlan tests.

``host_a`` is nicsim's side: a veth end ``va`` with the underlay address 10.99.0.1/24, where the vxlan
port's socket is opened. ``host_b`` is Linux's side: the other veth end ``vb`` (10.99.0.2/24) and a
Linux ``vxlan0`` (VNI 42, remote 10.99.0.1, local 10.99.0.2, dstport 4789, over ``vb``, so the kernel
gives it MTU 1450) carrying 192.168.77.2/24, the address a guest behind nicsim pings. Nothing here
leaves the two namespaces, which the ``netns`` fixture deletes (their veth and vxlan devices with them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qemu.testvm import Netns

VNI = 4242  # any 24-bit value: not 0 or 1, so that a default could not pass by luck
UNDERLAY_A, UNDERLAY_B = "10.99.0.1", "10.99.0.2"
OVERLAY_B, OVERLAY_GUEST = "192.168.77.2", "192.168.77.1"


@dataclass(frozen=True)
class VxlanLab:
    host_a: Netns
    host_b: Netns

    def port_spec(self) -> str:
        return f"vxlan,remote={UNDERLAY_B},local={UNDERLAY_A},vni={VNI},netns={self.host_a.name}"


def vxlan_lab(netns: Callable[[], Netns]) -> VxlanLab:
    a, b = netns(), netns()
    a.run("ip", "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b.name)
    a.run("ip", "addr", "add", f"{UNDERLAY_A}/24", "dev", "va")
    a.run("ip", "link", "set", "va", "up")
    b.run("ip", "addr", "add", f"{UNDERLAY_B}/24", "dev", "vb")
    b.run("ip", "link", "set", "vb", "up")
    b.run("ip", "link", "add", "vxlan0", "type", "vxlan", "id", str(VNI), "remote", UNDERLAY_A,
          "local", UNDERLAY_B, "dstport", "4789", "dev", "vb")  # fmt: skip
    # No IPv6 on the overlay: its router solicitations and MLD reports would only be noise in the tests.
    b.run("sysctl", "-qw", "net.ipv6.conf.vxlan0.disable_ipv6=1")
    b.run("ip", "addr", "add", f"{OVERLAY_B}/24", "dev", "vxlan0")
    b.run("ip", "link", "set", "vxlan0", "up")
    return VxlanLab(a, b)
