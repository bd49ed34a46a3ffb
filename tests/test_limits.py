"""Resource limits and socket safety, each checked through the real server over its socket.

Limits (``nicsim.vhost.protocol``): a payload over MAX_PAYLOAD_SIZE breaks the stream (the connection is
dropped, the next frontend is served); a message with more fds than its request carries is refused and
every fd closed; more than the kernel's per-recvmsg fd budget is truncated and closed; more than 8
memory regions, overlapping, zero-sized or out-of-file regions are refused with a failure ack; rings
past the queue count are refused; a chain walk is bounded by the queue size. The socket is created 0600;
a stale socket file is replaced; a live server's socket is refused with a clear error. The guest cannot
make the backend allocate without bound: the RX backlog is capped and counts what it drops.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from nicsim.ports import GeneratorConfig, GeneratorPort, SinkPort
from nicsim.server import MAX_FDS as SERVER_MAX_FDS
from nicsim.server import Server, SocketPathError
from nicsim.vhost import Outgoing, Request
from nicsim.vhost import payloads as p
from nicsim.vhost.protocol import FLAG_NEED_REPLY, HEADER, MAX_PAYLOAD_SIZE, VERSION
from nicsim.virtio.device import VirtioNetDevice
from rings.driver import Malformed
from tests.hardening import describe_fds, finish, open_fds, start_rig


async def test_oversized_message_drops_the_connection_and_the_next_frontend_is_served(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    await fe.send(Outgoing(data=HEADER.pack(int(Request.SET_CONFIG), VERSION, MAX_PAYLOAD_SIZE + 1)))
    with pytest.raises(ConnectionResetError):
        await fe.get_features()
    await asyncio.wait_for(rig.endpoint.wait_idle(), 10)
    assert any("payload" in e or "size" in e for e in rig.endpoint.last.errors), rig.endpoint.last.errors
    await fe.close()
    fe2 = await rig.frontend()
    await rig.session(connections=2)
    await finish(rig, fe2, before)


async def test_more_fds_than_a_message_may_carry_are_refused_and_all_closed(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    sess = await rig.session()

    async def send_with(count: int) -> object:
        pairs = [os.pipe() for _ in range(count)]
        try:
            out = fe.conn.request(Request.SET_VRING_ENABLE, p.VringState(index=0, num=1),
                                  fds=[r for r, _ in pairs], need_reply=True)  # fmt: skip
            return await fe.call(out, check=False)
        finally:
            for r, w in pairs:
                os.close(r)
                os.set_blocking(w, False)
                with pytest.raises(BrokenPipeError):  # no copy of the read end survives in the backend
                    os.write(w, b"x")
                os.close(w)

    for count in (1, 2, 8):  # SET_VRING_ENABLE carries none: refused, the connection carries on
        reply = await send_with(count)
        assert reply is not None and not reply.ok  # type: ignore[attr-defined]
    assert any("fds" in e for e in sess.errors), sess.errors
    # More than the server's recvmsg budget: the kernel truncates the control data; the message cannot
    # be honoured as sent, so the connection is dropped (as libvhost-user and DPDK do).
    with pytest.raises(ConnectionResetError):
        await send_with(SERVER_MAX_FDS + 4)
    await asyncio.wait_for(rig.endpoint.wait_idle(), 10)
    assert any("truncated" in e for e in sess.errors), sess.errors
    await fe.close()
    fe2 = await rig.frontend()
    await rig.session(connections=2)
    await finish(rig, fe2, before)


async def test_memory_tables_too_large_overlapping_empty_or_beyond_the_file_are_refused(
    tmp_path: Path,
) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    sess = await rig.session()
    d0, d1 = fe.ram.region_descs()
    file_size = os.fstat(fe.ram.fd).st_size
    tables = {
        "nine regions": [p.MemoryRegionDesc(guest_phys_addr=d0.guest_phys_addr + i * 0x1000, size=0x1000,
                                            user_addr=d0.user_addr + i * 0x1000, mmap_offset=0)
                         for i in range(9)],
        "overlapping": [d0, p.MemoryRegionDesc(guest_phys_addr=d0.guest_phys_addr + 0x1000, size=0x1000,
                                               user_addr=d1.user_addr, mmap_offset=d1.mmap_offset)],
        "zero-sized": [p.MemoryRegionDesc(guest_phys_addr=d0.guest_phys_addr, size=0, user_addr=d0.user_addr,
                                          mmap_offset=0)],
        "offset + size beyond the fd": [p.MemoryRegionDesc(guest_phys_addr=d0.guest_phys_addr, size=d0.size,
                                                           user_addr=d0.user_addr,
                                                           mmap_offset=file_size - d0.size + 4096)],
    }  # fmt: skip
    for name, regions in tables.items():
        body = len(regions).to_bytes(4, "little") + bytes(4) + b"".join(
            r.guest_phys_addr.to_bytes(8, "little") + r.size.to_bytes(8, "little")
            + r.user_addr.to_bytes(8, "little") + r.mmap_offset.to_bytes(8, "little") for r in regions
        )  # fmt: skip
        fds = [fe.ram.fd] * len(regions)
        head = HEADER.pack(int(Request.SET_MEM_TABLE), VERSION | FLAG_NEED_REPLY, len(body))
        out = Outgoing(data=head + body,
                       fds=tuple(fds[:8]))  # fmt: skip
        fe.conn._expected.append(Request.SET_MEM_TABLE)
        reply = await fe.call(out, check=False)
        assert reply is not None and not reply.ok, f"{name}: accepted"
        assert sess.errors, name
    # The table in force is untouched: traffic still flows over it.
    await finish(rig, fe, before)


async def test_queue_count_and_chain_length_are_bounded(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    sess = await rig.session()
    assert await fe._u64(fe.conn.get_queue_num()) == 1
    reply = await fe.call(fe.conn.set_vring_num(2, 256, need_reply=True), check=False)
    assert reply is not None and not reply.ok
    reply = await fe.call(fe.conn.set_vring_num(1, 65536, need_reply=True), check=False)
    assert reply is not None and not reply.ok  # virtio 1.2 §2.6: at most 32768 (and ours: 1024)
    # Chains that never end (a loop) or whose length overflows 32 bits are cut and returned.
    fe.queues[1].post_malformed(Malformed.LOOP)
    fe.queues[1].post_malformed(Malformed.CHAIN_TOO_LONG)
    fe.kick(1, force=True)
    done = await fe.wait_used(1, 2)
    assert [c.len for c in done] == [0, 0]
    drops = sess.device.snapshot()["queues"][1]["drops"]
    assert sum(drops.values()) == 2, drops
    await finish(rig, fe, before)


async def test_rx_backlog_is_bounded_when_the_guest_posts_no_buffers(tmp_path: Path) -> None:
    """A generator pushes far more than the guest takes: the backlog stops at its cap, the rest is
    counted as dropped (no_rx_buffer), and memory does not grow with the number of frames pushed."""
    before = open_fds()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    sess = await rig.session()
    dev = sess.device
    cap = dev.policy.rx_backlog
    frame = bytes(60)
    kept = sum(dev.push(frame) for _ in range(cap * 4))
    assert kept == cap and dev.rx_backlog() == cap
    assert dev.snapshot()["queues"][0]["drops"].get("no_rx_buffer") == 3 * cap
    fe.post_rx(cap)
    await fe.wait_used(0, cap)  # the backlog drains into the buffers once they come
    assert dev.rx_backlog() == 0
    await finish(rig, fe, before)


# -- the socket file ----------------------------------------------------------------------------------


async def test_socket_is_created_0600(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask does not open it up
    try:
        rig = await start_rig(tmp_path)
    finally:
        os.umask(old)
    mode = stat.S_IMODE(rig.path.stat().st_mode)
    await rig.server.close()
    assert mode == 0o600, oct(mode)


async def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    before = open_fds()
    path = tmp_path / "nicsim.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a killed server's leftover
    assert path.exists()
    rig = await start_rig(tmp_path)
    fe = await rig.frontend()
    await finish(rig, fe, before)


async def test_socket_in_use_by_a_live_server_is_refused(tmp_path: Path) -> None:
    before = open_fds()
    rig = await start_rig(tmp_path)
    second = Server([rig.path], lambda: VirtioNetDevice(port=SinkPort()))
    with pytest.raises(SocketPathError) as info:
        await second.start()
    assert info.value.reason == "in_use" and "listening" in str(info.value)
    # The probe was a connection: the first server saw it come and go.
    await rig.session(connections=1)
    await asyncio.wait_for(rig.endpoint.wait_idle(), 10)
    # The refused server removed nothing: the first still serves on its path.
    fe = await rig.frontend()
    await rig.session(connections=2)
    await finish(rig, fe, before)
    leaked = open_fds() - before
    assert not leaked, describe_fds(leaked)


async def test_a_path_that_is_not_a_socket_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "nicsim.sock"
    path.write_text("precious")
    server = Server([path], lambda: VirtioNetDevice(port=GeneratorPort(GeneratorConfig())))
    with pytest.raises(SocketPathError) as info:
        await server.start()
    assert info.value.reason == "not_a_socket"
    assert path.read_text() == "precious"
