"""The vhost-user codec: round trips for every message, each validation error, and framing fed three ways."""

from __future__ import annotations

import struct

import pytest

from nicsim.vhost import FrontendProtocolError, Request
from nicsim.vhost import payloads as p
from nicsim.vhost.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    SPECS,
    VERSION,
    VRING_NOFD_MASK,
    RawMessage,
    decode_request,
    encode_message,
    request_name,
)
from nicsim.vhost.reader import MessageReader

R = Request
REGION = p.MemoryRegionDesc(
    guest_phys_addr=0x1000, size=0x10000, user_addr=0x7F00_0000_0000, mmap_offset=0x1000
)
REGION_B = p.MemoryRegionDesc(
    guest_phys_addr=0x100000, size=0x1000, user_addr=0x7F10_0000_0000, mmap_offset=0
)

# One representative (payload, fd count) per request the spec defines.
SAMPLES: dict[Request, tuple[p.Payload, int]] = {
    R.GET_FEATURES: (p.Empty(), 0),
    R.SET_FEATURES: (p.U64(value=(1 << 32) | (1 << 30)), 0),
    R.SET_OWNER: (p.Empty(), 0),
    R.RESET_OWNER: (p.Empty(), 0),
    R.SET_MEM_TABLE: (p.MemoryTable(regions=(REGION, REGION_B)), 2),
    R.SET_LOG_BASE: (p.LogDesc(mmap_size=4096, mmap_offset=0), 1),
    R.SET_LOG_FD: (p.Empty(), 1),
    R.SET_VRING_NUM: (p.VringState(index=1, num=256), 0),
    R.SET_VRING_ADDR: (
        p.VringAddr(
            index=1,
            flags=1,
            desc_user_addr=0x1000,
            used_user_addr=0x3000,
            avail_user_addr=0x2000,
            log_guest_addr=0,
        ),
        0,
    ),
    R.SET_VRING_BASE: (p.VringState(index=0, num=5), 0),
    R.GET_VRING_BASE: (p.VringState(index=0, num=0), 0),
    R.SET_VRING_KICK: (p.U64(value=1), 1),
    R.SET_VRING_CALL: (p.U64(value=0 | VRING_NOFD_MASK), 0),
    R.SET_VRING_ERR: (p.U64(value=1), 1),
    R.GET_PROTOCOL_FEATURES: (p.Empty(), 0),
    R.SET_PROTOCOL_FEATURES: (p.U64(value=0b1001), 0),
    R.GET_QUEUE_NUM: (p.Empty(), 0),
    R.SET_VRING_ENABLE: (p.VringState(index=1, num=1), 0),
    R.SEND_RARP: (p.U64(value=0x563412005452), 0),
    R.NET_SET_MTU: (p.U64(value=1500), 0),
    R.SET_BACKEND_REQ_FD: (p.Empty(), 1),
    R.IOTLB_MSG: (p.IotlbMsg(iova=0x1000, size=0x1000, user_addr=0x7000, perm=3, type=p.IOTLB_UPDATE), 0),
    R.SET_VRING_ENDIAN: (p.VringState(index=0, num=1), 0),
    R.GET_CONFIG: (p.ConfigSpace(offset=0, size=6, flags=0, payload=bytes(6)), 0),
    R.SET_CONFIG: (p.ConfigSpace(offset=0, size=2, flags=1, payload=b"\x05\xdc"), 0),
    R.CREATE_CRYPTO_SESSION: (p.Opaque(data=b"\x01" * 16), 0),
    R.CLOSE_CRYPTO_SESSION: (p.Opaque(data=b"\x02" * 8), 0),
    R.POSTCOPY_ADVISE: (p.Opaque(data=b""), 0),
    R.POSTCOPY_LISTEN: (p.Opaque(data=b""), 0),
    R.POSTCOPY_END: (p.Opaque(data=b""), 0),
    R.GET_INFLIGHT_FD: (p.InflightDesc(mmap_size=0, mmap_offset=0, num_queues=2, queue_size=256), 0),
    R.SET_INFLIGHT_FD: (p.InflightDesc(mmap_size=8192, mmap_offset=0, num_queues=2, queue_size=256), 1),
    R.GPU_SET_SOCKET: (p.Opaque(data=b""), 1),
    R.RESET_DEVICE: (p.Empty(), 0),
    R.VRING_KICK: (p.VringState(index=0, num=0), 0),
    R.GET_MAX_MEM_SLOTS: (p.Empty(), 0),
    R.ADD_MEM_REG: (p.SingleMemoryRegion(region=REGION), 1),
    R.REM_MEM_REG: (p.SingleMemoryRegion(region=REGION), 0),
    R.SET_STATUS: (p.U64(value=0x0F), 0),
    R.GET_STATUS: (p.Empty(), 0),
    R.GET_SHARED_OBJECT: (p.Opaque(data=bytes(16)), 0),
    R.SET_DEVICE_STATE_FD: (p.DeviceStateTransfer(direction=0, phase=0), 1),
    R.CHECK_DEVICE_STATE: (p.Empty(), 0),
}


def test_every_request_number_has_a_spec_and_a_sample() -> None:
    assert set(SPECS) == set(Request) == set(SAMPLES)
    assert [int(r) for r in Request] == list(range(1, 44))
    assert request_name(5) == "SET_MEM_TABLE" and request_name(0) == "UNKNOWN(0)"


@pytest.mark.parametrize("req", list(Request), ids=lambda r: r.name)
def test_round_trip(req: Request) -> None:
    payload, nfds = SAMPLES[req]
    data = encode_message(int(req), payload.encode(), flags=VERSION | FLAG_NEED_REPLY)
    code, flags, size = struct.unpack_from("=III", data)
    assert (code, flags, size) == (int(req), VERSION | FLAG_NEED_REPLY, len(data) - HEADER_SIZE)
    msg = RawMessage(code=code, flags=flags, payload=data[HEADER_SIZE:], fds=tuple(range(100, 100 + nfds)))
    assert decode_request(msg) == (req, payload)


def _raw(req: int, body: bytes, nfds: int = 0, flags: int = VERSION) -> RawMessage:
    return RawMessage(code=req, flags=flags, payload=body, fds=tuple(range(100, 100 + nfds)))


def _region(**kw: int) -> bytes:
    fields = {"guest_phys_addr": 0, "size": 4096, "user_addr": 0, "mmap_offset": 0} | kw
    return struct.pack("=QQQQ", *fields.values())


U64MAX = (1 << 64) - 1
INVALID = [
    ("unknown request", _raw(99, b""), "not a request number"),
    ("reply flag", _raw(R.GET_FEATURES, b"", flags=VERSION | FLAG_REPLY), "REPLY flag"),
    ("unknown flags", _raw(R.GET_FEATURES, b"", flags=VERSION | 0x100), "unknown header flag"),
    ("u64 too short", _raw(R.SET_FEATURES, b"\0" * 4), "expected 8"),
    ("empty with payload", _raw(R.GET_FEATURES, b"\0" * 8), "expected 0"),
    ("fd on a no-fd request", _raw(R.SET_FEATURES, bytes(8), nfds=1), "expected 0"),
    ("table of 0 regions", _raw(R.SET_MEM_TABLE, struct.pack("=II", 0, 0)), "0 regions"),
    ("table of 9 regions", _raw(R.SET_MEM_TABLE, struct.pack("=II", 9, 0) + _region() * 9, 9), "9 regions"),
    ("table size mismatch", _raw(R.SET_MEM_TABLE, struct.pack("=II", 2, 0) + _region(), 2), "expected"),
    ("table header short", _raw(R.SET_MEM_TABLE, b"\1\0\0"), "shorter"),
    ("zero-sized region", _raw(R.SET_MEM_TABLE, struct.pack("=II", 1, 0) + _region(size=0), 1), "size 0"),
    (
        "gpa overflow",
        _raw(R.SET_MEM_TABLE, struct.pack("=II", 1, 0) + _region(guest_phys_addr=U64MAX), 1),
        "overflows",
    ),
    ("uva overflow", _raw(R.ADD_MEM_REG, bytes(8) + _region(user_addr=U64MAX - 10), 1), "user address"),
    ("offset overflow", _raw(R.ADD_MEM_REG, bytes(8) + _region(mmap_offset=U64MAX), 1), "mmap offset"),
    (
        "overlapping regions",
        _raw(R.SET_MEM_TABLE, struct.pack("=II", 2, 0) + _region() + _region(guest_phys_addr=2048), 2),
        "overlap",
    ),
    (
        "fds per region",
        _raw(R.SET_MEM_TABLE, struct.pack("=II", 2, 0) + _region() + _region(guest_phys_addr=1 << 20), 1),
        "expected 2",
    ),
    ("add region without fd", _raw(R.ADD_MEM_REG, bytes(8) + _region()), "expected 1"),
    ("rem region with 2 fds", _raw(R.REM_MEM_REG, bytes(8) + _region(), 2), "expected 0 or 1"),
    ("kick without fd", _raw(R.SET_VRING_KICK, struct.pack("=Q", 0)), "expected 1"),
    ("kick nofd with fd", _raw(R.SET_VRING_KICK, struct.pack("=Q", VRING_NOFD_MASK), 1), "expected 0"),
    ("call high bits", _raw(R.SET_VRING_CALL, struct.pack("=Q", 1 << 9), 1), "bits above 8"),
    ("addr misaligned", _raw(R.SET_VRING_ADDR, struct.pack("=IIQQQQ", 0, 0, 8, 0, 0, 0)), "aligned"),
    ("addr flags", _raw(R.SET_VRING_ADDR, struct.pack("=IIQQQQ", 0, 2, 0, 0, 0, 0)), "unknown bits"),
    ("config too big", _raw(R.GET_CONFIG, struct.pack("=III", 0, 300, 0) + bytes(300)), "beyond"),
    ("config size mismatch", _raw(R.SET_CONFIG, struct.pack("=III", 0, 4, 0) + bytes(2)), "expected 16"),
    ("config flags", _raw(R.SET_CONFIG, struct.pack("=III", 0, 0, 7)), "flags"),
    ("iotlb perm", _raw(R.IOTLB_MSG, struct.pack("=QQQBB6x", 0, 1, 0, 9, 2)), "permissions"),
    ("iotlb type", _raw(R.IOTLB_MSG, struct.pack("=QQQBB6x", 0, 1, 0, 1, 9)), "type"),
    ("log size 0", _raw(R.SET_LOG_BASE, struct.pack("=QQ", 0, 0), 1), "size 0"),
    ("state short", _raw(R.SET_VRING_NUM, b"\0" * 4), "expected 8"),
    ("inflight short", _raw(R.SET_INFLIGHT_FD, b"\0" * 20, 1), "expected 24"),
]


@pytest.mark.parametrize(("case", "msg", "reason"), INVALID, ids=[c[0] for c in INVALID])
def test_validation_error(case: str, msg: RawMessage, reason: str) -> None:
    with pytest.raises(FrontendProtocolError) as info:
        decode_request(msg)
    err = info.value
    assert reason in err.reason
    assert err.request == request_name(msg.code)
    assert not err.fatal


def test_full_fixed_size_memory_table_is_accepted() -> None:
    body = struct.pack("=II", 1, 0) + _region() + bytes(7 * 32)
    _, table = decode_request(_raw(R.SET_MEM_TABLE, body, 1))
    assert isinstance(table, p.MemoryTable) and len(table.regions) == 1


# --- framing --------------------------------------------------------------------------------------

STREAM = [
    (encode_message(R.GET_FEATURES), ()),
    (encode_message(R.SET_VRING_KICK, p.U64(value=0).encode()), (11,)),
    (encode_message(R.SET_MEM_TABLE, p.MemoryTable(regions=(REGION, REGION_B)).encode()), (12, 13)),
    (encode_message(R.SET_OWNER), ()),
    (encode_message(R.SET_VRING_CALL, p.U64(value=1).encode()), (14,)),
]
EXPECTED = [(int.from_bytes(d[:4], "little"), d[HEADER_SIZE:], fds) for d, fds in STREAM]


def _drain(reader: MessageReader) -> list[tuple[int, bytes, tuple[int, ...]]]:
    out = []
    while (m := reader.next_message()) is not None:
        out.append((m.code, m.payload, m.fds))
    return out


def test_framing_all_at_once() -> None:
    # Linux glues fd-less sends and then one send with fds into one recvmsg (and stops there):
    # the fds belong to the last message that starts in the chunk.
    reader = MessageReader()
    data = b"".join(d for d, _ in STREAM[:4] if not _) + STREAM[1][0]
    reader.feed(data, [11])
    got = _drain(reader)
    assert [c for c, _, _ in got] == [R.GET_FEATURES, R.SET_OWNER, R.SET_VRING_KICK]
    assert got[-1][2] == (11,) and got[0][2] == () and got[1][2] == ()


def test_framing_one_message_per_chunk() -> None:
    reader = MessageReader()
    got = []
    for data, fds in STREAM:
        reader.feed(data, fds)
        got += _drain(reader)
    assert got == EXPECTED


def test_framing_byte_by_byte() -> None:
    reader = MessageReader()
    got = []
    for data, fds in STREAM:
        for i in range(len(data)):
            assert reader.bytes_wanted >= 1
            reader.feed(data[i : i + 1], fds if i == 0 else ())
            got += _drain(reader)
    assert got == EXPECTED
    assert reader.buffered == 0


def test_framing_with_a_second_message_and_trailing_bytes_in_the_same_chunk() -> None:
    # Linux may return the tail of one message and the head of the next in one recvmsg, with the
    # fds of the second: they belong to the first message that *starts* in the chunk.
    reader = MessageReader()
    kick, table = STREAM[1][0], STREAM[2][0]
    reader.feed(kick[:5], [11])
    assert _drain(reader) == []
    reader.feed(kick[5:] + table[:20], [12, 13])
    assert _drain(reader) == [EXPECTED[1]]
    reader.feed(table[20:] + STREAM[3][0] + STREAM[4][0][:3], [])
    assert _drain(reader) == [EXPECTED[2], EXPECTED[3]]
    assert reader.buffered == 3
    assert reader.bytes_wanted == HEADER_SIZE - 3
    assert reader.close() == []  # the partial message's fds would come with its first byte


def test_bytes_wanted_reads_never_mix_fds_of_two_messages() -> None:
    reader = MessageReader()
    data = b"".join(d for d, _ in STREAM)
    starts = {sum(len(d) for d, _ in STREAM[:i]): fds for i, (_, fds) in enumerate(STREAM)}
    pos, got = 0, []
    while pos < len(data):
        n = reader.bytes_wanted
        reader.feed(data[pos : pos + n], starts.get(pos, ()))
        pos += n
        got += _drain(reader)
    assert got == EXPECTED


def test_bad_version_is_fatal_and_held_fds_come_back() -> None:
    reader = MessageReader()
    reader.feed(encode_message(R.GET_FEATURES, flags=0), [5, 6])
    with pytest.raises(FrontendProtocolError) as info:
        reader.next_message()
    assert info.value.fatal and info.value.request == "GET_FEATURES"
    assert reader.dead and reader.next_message() is None
    assert reader.close() == [5, 6]


def test_oversize_length_is_fatal() -> None:
    reader = MessageReader()
    reader.feed(struct.pack("=III", R.SET_CONFIG, VERSION, 4097))
    with pytest.raises(FrontendProtocolError) as info:
        reader.next_message()
    assert info.value.fatal and "4097" in info.value.reason


def test_truncated_header_waits_for_more() -> None:
    reader = MessageReader()
    reader.feed(encode_message(R.SET_OWNER)[:11], [3])
    assert reader.next_message() is None and reader.bytes_wanted == 1
    assert reader.close() == [3]
