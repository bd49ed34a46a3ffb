"""Shared helpers for the vhost tests: a frontend/backend pair joined in-process, and fd accounting.

``Link`` passes each ``Outgoing`` from the frontend to the backend with *duplicated* fds, the way
SCM_RIGHTS installs new fds in the receiver, so the test can check that every fd the backend got is
handed back exactly once (in an event or in ``fds_to_close()``) and that the process's open fds
return to where they started once the test closes them.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from nicsim.vhost import (
    BackendConnection,
    ConnectionState,
    Event,
    FrontendConnection,
    Outgoing,
    Reply,
    events,
)
from nicsim.vhost import features as f
from nicsim.vhost.payloads import MemoryRegionDesc

GIB = 1 << 30
REGION = MemoryRegionDesc(guest_phys_addr=0, size=GIB, user_addr=0x7F00_0000_0000, mmap_offset=0)
REGION2 = MemoryRegionDesc(guest_phys_addr=4 * GIB, size=GIB, user_addr=0x7F80_0000_0000, mmap_offset=0)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def new_fd() -> int:
    """A real fd, like QEMU's eventfds and memfds."""
    return os.eventfd(0)


def fds_in(event: Event) -> list[int]:
    """Every fd an event hands over."""
    if isinstance(event, events.MemoryTableSet):
        return list(event.fds)
    if isinstance(event, events.MemoryRegionAdded):
        return [event.region.fd]
    fd = getattr(event, "fd", None)
    return [fd] if isinstance(fd, int) else []


class Link:
    """A frontend and a backend connection joined in-process, with SCM_RIGHTS-like fd duplication."""

    def __init__(self, backend: BackendConnection | None = None) -> None:
        self.backend = backend if backend is not None else BackendConnection()
        self.frontend = FrontendConnection()
        self.events: list[Event] = []
        self.received: list[int] = []  # every fd the backend was given

    def send(self, out: Outgoing, *, chunked: bool = False) -> list[Event]:
        dups = [os.dup(fd) for fd in out.fds]
        self.received.extend(dups)
        if chunked:
            evs = self.backend.receive_data(out.data[:1], dups)
            for i in range(1, len(out.data)):
                evs += self.backend.receive_data(out.data[i : i + 1])
        else:
            evs = self.backend.receive_data(out.data, dups)
        self.events.extend(evs)
        return evs

    def replies(self) -> list[Reply]:
        out: list[Reply] = []
        for msg in self.backend.data_to_send():
            dups = [os.dup(fd) for fd in msg.fds]
            out.extend(self.frontend.receive_data(msg.data, dups))
        return out

    def call(self, out: Outgoing) -> tuple[list[Event], list[Reply]]:
        evs = self.send(out)
        return evs, self.replies()

    def settle(self) -> list[int]:
        """Close every fd the backend handed over or gave back; return them (each exactly once)."""
        handed = [fd for e in self.events for fd in fds_in(e)] + self.backend.fds_to_close()
        for fd in handed:
            os.close(fd)
        self.events.clear()
        return handed


@contextmanager
def no_fd_leak() -> Iterator[None]:
    # Collect first: an earlier test's garbage (a socket in a reference cycle) may otherwise close its
    # fd in the middle of this one and show as a difference that is not this test's.
    gc.collect()
    before = open_fds()
    yield
    close_originals()
    gc.collect()
    assert open_fds() == before


def qemu72_init(link: Link, *, protocol: int | None = None) -> None:
    """What QEMU 7.2 sends before the guest driver starts (ENVIRONMENT.md), replies checked."""
    fe, be = link.frontend, link.backend
    _, (r,) = link.call(fe.get_features())
    assert r.value == be.offered_features
    _, (r,) = link.call(fe.get_protocol_features())
    proto = r.value if protocol is None else protocol
    link.call(fe.set_protocol_features(proto))
    _, (r,) = link.call(fe.get_queue_num())
    assert r.value == be.queue_pairs
    if f.has(proto, f.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS):
        _, (r,) = link.call(fe.get_max_mem_slots())
        assert r.value == be.max_mem_slots
    link.call(fe.set_owner())
    link.call(fe.get_features())
    for q in range(be.num_vrings):
        link.send(fe.set_vring_call(q, new_fd_closed_by(link)))
        link.send(fe.set_vring_err(q, new_fd_closed_by(link)))
    for q in range(be.num_vrings):
        link.send(fe.set_vring_enable(q, False))


_originals: list[int] = []


def new_fd_closed_by(link: Link) -> int:
    """An fd for the frontend side; the test's own copy is closed by ``close_originals``."""
    fd = new_fd()
    _originals.append(fd)
    return fd


def close_originals() -> None:
    while _originals:
        os.close(_originals.pop())


def qemu72_start(link: Link, *, use_add_mem_reg: bool, ring_size: int = 256) -> None:
    """What QEMU 7.2 sends when the guest driver starts the device."""
    fe, be = link.frontend, link.backend
    link.call(fe.set_features(f.DEFAULT_VIRTIO_FEATURES))
    if use_add_mem_reg:
        _, (r,) = link.call(fe.add_mem_reg(REGION, new_fd_closed_by(link), need_reply=True))
    else:
        _, (r,) = link.call(fe.set_mem_table([REGION], [new_fd_closed_by(link)], need_reply=True))
    assert r.ok
    for q in range(be.num_vrings):
        base = REGION.user_addr + q * 0x10000
        link.send(fe.set_vring_num(q, ring_size))
        link.send(fe.set_vring_base(q, 0))
        link.send(fe.set_vring_addr(q, desc=base, avail=base + 0x4000, used=base + 0x8000))
        link.send(fe.set_vring_kick(q, new_fd_closed_by(link)))
        link.send(fe.set_vring_call(q, new_fd_closed_by(link)))


def state_of(conn: BackendConnection) -> ConnectionState:
    """The connection's state, read through a call so type checkers do not pin it between steps."""
    return conn.state


def kinds(evs: Iterable[Event]) -> list[str]:
    return [type(e).__name__ for e in evs]


def test_link_duplicates_fds_and_settle_closes_each_once() -> None:
    with no_fd_leak():
        link = Link()
        qemu72_init(link)
        handed = link.settle()
        close_originals()
        assert sorted(handed) == sorted(link.received)
        assert len(handed) == 2 * link.backend.num_vrings
