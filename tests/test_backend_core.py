"""The backend core without a socket: QEMU 7.2's recorded net-device messages, replayed with stand-in fds.

``tests/data/qemu72_net_boot.json`` holds every vhost-user message QEMU 7.2 sent nicsim while the test
guest booted, pinged the responder and QEMU quit (recorded by ``scripts/record_vhost.py``; the
file's docstring there says what each field is). The test plays the asyncio shell: it feeds each
message to a :class:`BackendCore` the way ``recvmsg`` reads it (or byte by byte), hands in a fresh
memfd for each memory region fd and a fresh eventfd for each ring fd, and carries the core's actions
out on a numpy guest memory at the recorded addresses. Before QEMU's GET_VRING_BASE, it acts as the
guest for one round trip (an ARP request on the TX ring, one buffer on the RX ring), so the stop
answers say how far the rings really moved. It then checks the state reached (features, regions,
ring sizes, addresses and bases, queues and pumps), the replies against the recorded ones, and that
every fd handed in came back exactly once.
"""

from __future__ import annotations

import ast
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from nicsim.ports import ResponderPort
from nicsim.ports import frames as fr
from nicsim.vhost import features as vf
from nicsim.vhost import payloads as p
from nicsim.vhost.actions import (
    Action,
    CloseFds,
    InflightStorage,
    MapMemoryRegion,
    MapMemoryTable,
    RingFd,
    SetRingFd,
    StartPump,
    StopPump,
    UnmapMemoryRegion,
)
from nicsim.vhost.backend_core import BackendCore
from nicsim.vhost.frontend_codec import FrontendConnection
from nicsim.vhost.protocol import Request
from nicsim.virtio.device import VirtioNetDevice
from nicsim.virtio.features import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_RING_PACKED,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MTU,
)
from rings.layout import DESC_DTYPE, VIRTQ_DESC_F_WRITE
from rings.memory import GuestMemory, MemoryRegion

ROOT = Path(__file__).resolve().parents[1]
RECORDING = ROOT / "tests" / "data" / "qemu72_net_boot.json"
HEADER = struct.Struct("<III")
MEMORY_REQUESTS = {Request.SET_MEM_TABLE, Request.ADD_MEM_REG, Request.REM_MEM_REG}
GUEST_MAC, GUEST_IP = fr.mac_bytes("52:54:00:12:34:56"), fr.ip_bytes("10.0.2.15")


@dataclass(frozen=True)
class Message:
    request: Request
    data: bytes
    nfds: int
    reply: bytes | None  # what nicsim answered when it was recorded


def recorded() -> list[Message]:
    raw = json.loads(RECORDING.read_text())["messages"]
    out: list[Message] = []
    for i, m in enumerate(raw):
        if m["dir"] != "to_backend":
            continue
        data = bytes.fromhex(m["data"])
        nxt = raw[i + 1] if i + 1 < len(raw) else None
        reply = bytes.fromhex(nxt["data"]) if nxt is not None and nxt["dir"] == "to_frontend" else None
        out.append(Message(Request(HEADER.unpack_from(data)[0]), data, m["fds"], reply))
    return out


def no_inflight(*, num_queues: int, queue_size: int) -> InflightStorage:
    raise AssertionError("QEMU 7.2 never asks a net backend for an inflight buffer")


@dataclass
class Shell:
    """What the asyncio shell would do, on stand-in fds and numpy guest memory."""

    core: BackendCore
    chunked: bool
    handed: list[int] = field(default_factory=list)  # every fd given to the core
    returned: list[int] = field(default_factory=list)  # every fd that came back (action, fds_to_close)
    ring_fds: dict[tuple[int, RingFd], int | None] = field(default_factory=dict)
    pumps: dict[int, bool] = field(default_factory=dict)
    regions: list[MemoryRegion] = field(default_factory=list)
    replies: list[tuple[Request, bytes]] = field(default_factory=list)

    def feed(self, msg: Message) -> None:
        mem = msg.request in MEMORY_REQUESTS
        fds = [os.memfd_create("region") if mem else os.eventfd(0) for _ in range(msg.nfds)]
        self.handed += fds
        data = msg.data
        while data:
            n = 1 if not self.chunked else self.core.bytes_wanted
            self.carry_out(self.core.receive_data(data[:n], fds))
            data, fds = data[n:], []
        self.replies += [(msg.request, out.data) for out in self.core.data_to_send()]
        self.give_back(self.core.fds_to_close())

    def give_back(self, fds: list[int] | tuple[int, ...]) -> None:
        for fd in fds:
            self.returned.append(fd)
            os.close(fd)

    def carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            self.carry_out(self.do(action))

    def do(self, action: Action) -> list[Action]:
        match action:
            case StartPump() | StopPump():
                self.pumps[action.index] = isinstance(action, StartPump)
            case SetRingFd():
                old = self.ring_fds.get((action.index, action.kind))
                if old is not None:
                    self.give_back([old])  # the pump closes the fd it replaces
                self.ring_fds[(action.index, action.kind)] = action.fd
            case MapMemoryTable() | MapMemoryRegion():
                new = action.regions if isinstance(action, MapMemoryTable) else (action.region,)
                if isinstance(action, MapMemoryTable):
                    self.regions = []
                self.give_back([r.fd for r in new])
                self.regions += [MemoryRegion(guest_phys_addr=r.guest_phys_addr, size=r.size,
                                              user_addr=r.user_addr, data=np.zeros(r.size, np.uint8))
                                 for r in new]  # fmt: skip
                return self.core.memory_mapped(action, GuestMemory(self.regions))
            case UnmapMemoryRegion():
                self.regions = [r for r in self.regions
                                if (r.guest_phys_addr, r.user_addr, r.size) != action.key]  # fmt: skip
                return self.core.memory_mapped(action, GuestMemory(self.regions) if self.regions else None)
            case CloseFds():
                self.give_back(action.fds)
            case _:
                raise AssertionError(f"not expected from this recording: {action}")
        return []

    def close(self) -> None:
        self.carry_out(self.core.stop_rings())
        self.carry_out(self.core.close())
        self.give_back([fd for fd in self.ring_fds.values() if fd is not None])
        self.ring_fds.clear()


def u64(reply: bytes) -> int:
    return p.U64.decode(reply[HEADER.size :]).value


def ring_round_trip(core: BackendCore) -> None:
    """Be the guest for one ARP exchange: a request on the TX ring, one buffer on the RX ring, and the
    device run once each way (the pumps' job); the reply must land in the guest's buffer."""
    dev, mem = core.device, core.memory
    assert mem is not None
    rxq, txq = dev.queue(0), dev.queue(1)
    assert rxq is not None and txq is not None
    hdr = bytes(12)  # virtio_net_hdr_v1 (VERSION_1 negotiated)
    request = fr.arp(fr.ARP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), fr.ip_bytes("10.0.2.2"))
    arp = fr.ethernet(fr.BROADCAST_MAC, GUEST_MAC, fr.ETHERTYPE_ARP, request)
    tx_buf, rx_buf = 0x10000, 0x20000  # guest-physical, far below the rings QEMU placed
    mem.view(tx_buf, len(hdr + arp))[:] = np.frombuffer(hdr + arp, np.uint8)
    for q, buf, length, flags in ((txq, tx_buf, len(hdr + arp), 0), (rxq, rx_buf, 2048, VIRTQ_DESC_F_WRITE)):
        mem.view_as(q.desc_addr, DESC_DTYPE, 1)[0] = (buf, length, flags, 0)
        avail = mem.view_as(q.avail_addr, np.dtype("<u2"), 3)  # flags, idx, ring[0]
        avail[2], avail[1] = 0, avail[1] + 1
    assert dev.process_tx(1).processed == 1
    assert dev.deliver_rx(0).processed == 1
    used_elem = mem.view_as(rxq.used_addr + 4, np.dtype("<u4"), 2)  # ring[0]: id, len
    assert used_elem.tolist() == [0, len(hdr) + 60]  # the ARP reply, padded to 60 bytes
    reply = fr.parse_ethernet(mem.view(rx_buf + len(hdr), 60).tobytes())
    assert reply.ethertype == fr.ETHERTYPE_ARP and reply.dst == GUEST_MAC


@pytest.mark.parametrize("chunked", [True, False], ids=["as-recvmsg-reads", "byte-by-byte"])
def test_qemu72_boot_and_shutdown_replayed_reach_the_expected_state(chunked: bool) -> None:
    before = set(os.listdir("/proc/self/fd"))
    messages = recorded()
    core = BackendCore(VirtioNetDevice(port=ResponderPort()), create_inflight=no_inflight)
    shell = Shell(core, chunked)
    stop_at = next(i for i, m in enumerate(messages) if m.request is Request.GET_VRING_BASE)
    for msg in messages[:stop_at]:
        shell.feed(msg)

    # Features: what QEMU acked, and the device got it without the vhost-user bit.
    (acked,) = [u64(m.data) for m in messages if m.request is Request.SET_FEATURES]
    assert core.conn.acked_features == acked
    assert core.device.features == acked & core.device.device_features()
    assert core.device.features & vf.bit(vf.VIRTIO_F_VERSION_1) and core.device.mergeable
    # Memory: the one region of ADD_MEM_REG (CONFIGURE_MEM_SLOTS negotiated), 256 MiB at GPA 0.
    (add,) = [p.SingleMemoryRegion.decode(m.data[HEADER.size :]).region for m in messages
              if m.request is Request.ADD_MEM_REG]  # fmt: skip
    assert core.memory is not None and core.device.mem is core.memory
    assert [(r.guest_phys_addr, r.size, r.user_addr) for r in core.memory.regions] == [
        (0, 256 << 20, add.user_addr)]
    # Rings: size, base and addresses as QEMU set them; each device queue at the translated address.
    addrs = {a.index: a for a in (p.VringAddr.decode(m.data[HEADER.size :]) for m in messages
                                  if m.request is Request.SET_VRING_ADDR)}  # fmt: skip
    for i in (0, 1):
        ring, q = core.conn.rings[i], core.device.queue(i)
        assert (ring.num, ring.base, ring.enabled, ring.addr) == (256, 0, True, addrs[i])
        assert q is not None and q.size == 256
        gpa = add.guest_phys_addr - add.user_addr
        assert (q.desc_addr, q.avail_addr, q.used_addr) == (
            addrs[i].desc_user_addr + gpa, addrs[i].avail_user_addr + gpa, addrs[i].used_user_addr + gpa)
        assert shell.pumps[i] is True
        assert all(shell.ring_fds[(i, kind)] is not None for kind in RingFd)
    ring_round_trip(core)

    for msg in messages[stop_at:]:
        shell.feed(msg)
    # Stopped: both queues gone, pumps stopped, GET_VRING_BASE said how far each ring moved.
    assert [core.device.queue(i) for i in (0, 1)] == [None, None] and shell.pumps == {0: False, 1: False}
    bases = [p.VringState.decode(r[HEADER.size :]) for req, r in shell.replies
             if req is Request.GET_VRING_BASE]  # fmt: skip
    assert [(b.index, b.num) for b in bases] == [(0, 1), (1, 1)]
    # Every other reply is byte for byte what nicsim sent QEMU at the recording, but for the bits
    # offered since: VIRTIO_NET_F_MTU and GUEST_ANNOUNCE; protocol features NET_MTU and RARP; the dirty
    # log (VHOST_F_LOG_ALL, LOG_SHMFD) that a live migration needs; packed rings (RING_PACKED).
    features = (VIRTIO_NET_F_MTU, VIRTIO_NET_F_GUEST_ANNOUNCE, vf.VHOST_F_LOG_ALL, VIRTIO_F_RING_PACKED)
    protocol = (vf.VHOST_USER_PROTOCOL_F_NET_MTU, vf.VHOST_USER_PROTOCOL_F_RARP,
                vf.VHOST_USER_PROTOCOL_F_LOG_SHMFD)  # fmt: skip
    since = {Request.GET_FEATURES: vf.mask(features), Request.GET_PROTOCOL_FEATURES: vf.mask(protocol)}

    def now(m: Message) -> bytes:
        assert m.reply is not None
        if m.request not in since:
            return m.reply
        assert u64(m.reply) & since[m.request] == 0, "recorded before these bits were offered"
        return m.reply[: HEADER.size] + struct.pack("<Q", u64(m.reply) | since[m.request])

    assert [r for req, r in shell.replies if req is not Request.GET_VRING_BASE] == [
        now(m) for m in messages if m.reply is not None and m.request is not Request.GET_VRING_BASE]
    assert core.errors == []
    assert core.device.snapshot()["pool"]["usage"] == 0

    shell.close()
    assert sorted(shell.returned) == sorted(shell.handed)  # each fd came back exactly once
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_repeated_set_features_is_accepted_while_the_queues_run() -> None:
    """QEMU sends SET_FEATURES once per queue pair: the same bits again, with rings running, are
    acknowledged and change nothing; other bits are refused and the device keeps its features."""
    messages = recorded()
    core = BackendCore(VirtioNetDevice(port=ResponderPort()), create_inflight=no_inflight)
    shell = Shell(core, chunked=True)
    stop_at = next(i for i, m in enumerate(messages) if m.request is Request.GET_VRING_BASE)
    for msg in messages[:stop_at]:
        shell.feed(msg)
    (acked,) = [u64(m.data) for m in messages if m.request is Request.SET_FEATURES]
    fe = FrontendConnection()
    assert core.receive_data(fe.set_features(acked, need_reply=True).data) == []
    (ok,) = core.data_to_send()
    assert u64(ok.data) == 0 and core.errors == []
    assert core.device.queue(0) is not None and core.device.queue(1) is not None
    fewer = acked & ~vf.bit(VIRTIO_F_EVENT_IDX)
    assert core.receive_data(fe.set_features(fewer, need_reply=True).data) == []
    (refused,) = core.data_to_send()
    assert u64(refused.data) != 0 and "cannot change while vring 0 is started" in core.errors[-1]
    assert core.conn.acked_features == acked and core.device.event_idx
    shell.close()


def test_a_refused_memory_table_keeps_the_old_one_and_fails_the_ack() -> None:
    """The shell could not map the table QEMU sent (action_failed): the REPLY_ACK says so, the device
    keeps no table and the error names the request."""
    messages = recorded()
    core = BackendCore(VirtioNetDevice(port=ResponderPort()), create_inflight=no_inflight)
    shell = Shell(core, chunked=True)
    add = next(i for i, m in enumerate(messages) if m.request is Request.ADD_MEM_REG)
    for msg in messages[:add]:
        shell.feed(msg)
    fd = os.memfd_create("region")
    actions = core.receive_data(messages[add].data, [fd])
    assert [type(a) for a in actions] == [MapMemoryRegion]
    os.close(fd)
    assert core.action_failed(actions[0], "mmap failed") == []
    (reply,) = core.data_to_send()
    assert u64(reply.data) != 0  # REPLY_ACK: failure
    assert core.memory is None and core.device.mem is None
    assert core.errors == ["MemoryRegionAdded: mmap failed"]
    shell.close()


@pytest.mark.parametrize("module", ["backend_core", "actions"])
def test_the_core_imports_no_io_module_and_not_the_shell(module: str) -> None:
    tree = ast.parse((ROOT / "nicsim" / "vhost" / f"{module}.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {n for n in names if n.split(".")[0] in {"asyncio", "socket", "os", "mmap", "selectors"}}
    assert not {n for n in names if n == "nicsim.server" or n.startswith("nicsim.server.")}
