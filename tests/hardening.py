"""Shared checks of the hardening tests: a server on a fresh socket with a reflect port, a frontend
whose memfd guard bytes (the memfd bytes that belong to no region) are filled with a pattern, and the
end-of-test contract: traffic still flows both ways, the guard bytes are unchanged, no fd and no pool
descriptor is left behind.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nicsim.frontend import VhostUserFrontend
from nicsim.ports import Port
from nicsim.ports.frames import ip_bytes, mac_bytes, udp_frame
from nicsim.ports.reflect import ReflectPort
from nicsim.server import Server, Session
from nicsim.virtio.device import VirtioNetDevice
from rings.pool import PacketPool

GUARD = 0xA5


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def describe_fds(fds: set[str]) -> dict[str, str]:
    out = {}
    for fd in sorted(fds):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            out[fd] = "?"
    return out


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def frame(n: int, size: int = 60) -> bytes:
    return udp_frame(dst_mac=mac_bytes("52:54:00:00:00:02"), src_mac=mac_bytes("52:54:00:12:34:56"),
                     src_ip=ip_bytes("10.0.2.15"), dst_ip=ip_bytes("10.0.2.2"), sport=1000 + n, dport=9,
                     size=size)  # fmt: skip


@dataclass
class Rig:
    server: Server
    path: Path
    devices: list[VirtioNetDevice] = field(default_factory=list)
    frontends: list[VhostUserFrontend] = field(default_factory=list)

    @property
    def endpoint(self):  # type: ignore[no-untyped-def]
        return self.server.endpoints[0]

    async def session(self, connections: int = 1) -> Session:
        return await asyncio.wait_for(self.endpoint.wait_session(connections=connections), 10)

    async def frontend(
        self, *, start: bool = True, inflight: bool = False, **kwargs: object
    ) -> VhostUserFrontend:
        fe = await VhostUserFrontend.connect(self.path, **kwargs)
        self.frontends.append(fe)
        fe.ram.fill_guards(GUARD)
        await fe.handshake(inflight=inflight)
        if inflight:
            await fe.setup_inflight()
        if start:
            await fe.start()
        return fe


async def until(predicate: Callable[[], object], what: str, *, timeout: float = 10.0) -> None:
    """Wait for a condition (not for a time): look every few milliseconds until ``predicate()`` holds;
    an AssertionError naming ``what`` if it does not within ``timeout`` seconds (a deadline for failure
    only)."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g} s: {what}") from None


async def start_rig(tmp_path: Path, make_port: Callable[[], Port] = ReflectPort, *, pool_size: int = 1024,
                    name: str = "nicsim.sock") -> Rig:  # fmt: skip
    rig_devices: list[VirtioNetDevice] = []

    def make_device() -> VirtioNetDevice:
        dev = VirtioNetDevice(port=make_port(), pool=PacketPool(pool_size))
        rig_devices.append(dev)
        return dev

    server = Server([tmp_path / name], make_device)
    await server.start()
    return Rig(server=server, path=tmp_path / name, devices=rig_devices)


async def traffic_flows(fe: VhostUserFrontend, n: int = 16) -> None:
    """TX ``n`` frames and (with the reflect port) get each one back on RX, byte for byte (MACs swapped)."""
    fe.post_rx(n)
    frames = [frame(i) for i in range(n)]
    fe.transmit(frames)
    await fe.wait_used(1, n)
    got = await fe.wait_used(0, n)
    for sent, c in zip(frames, got, strict=True):
        assert c.data is not None
        body = c.data[12:]
        assert body[12:] == sent[12:] and body[:6] == sent[6:12] and body[6:12] == sent[:6]


async def finish(rig: Rig, fe: VhostUserFrontend, before: set[str]) -> Session:
    """Traffic still flows, guards are intact; then disconnect, close, and check fds and the pool."""
    await traffic_flows(fe)
    assert fe.ram.guards_intact(GUARD), "the backend wrote outside guest memory"
    await fe.close()
    await asyncio.wait_for(rig.endpoint.wait_idle(), 10)
    last = rig.endpoint.last
    assert last is not None
    await rig.server.close()
    assert last.final_snapshot is not None and last.final_snapshot["pool"]["usage"] == 0
    assert last.device.pool.closed  # close() refuses while any descriptor is outstanding
    assert last.memory.leaked_views == 0
    leaked = open_fds() - before
    assert not leaked, f"file descriptors leaked: {describe_fds(leaked)}"
    return last
