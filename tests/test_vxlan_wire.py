"""The VXLAN header, I/O-free (RFC 7348 §5): the bytes built for a VNI, and every reason a received
datagram is refused, fed whole, one byte short, and with trailing bytes (STYLE.md principle 9)."""

from __future__ import annotations

import pytest

from nicsim.ports.vxlan_wire import MIN_DATAGRAM, OVERHEAD, VXLAN_HLEN, VXLAN_PORT, check, header, vni_of

FRAME = bytes(range(14)) + b"payload"  # an Ethernet header and a little behind it


def test_header_bytes_are_the_i_flag_then_the_vni_big_endian_with_reserved_bits_zero() -> None:
    assert header(0x123456) == bytes([0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0])
    assert header(0) == bytes([0x08, 0, 0, 0, 0, 0, 0, 0])
    assert header(0xFFFFFF) == bytes([0x08, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0])
    assert len(header(42)) == VXLAN_HLEN == 8
    assert vni_of(header(4242)) == 4242


@pytest.mark.parametrize("vni", [-1, 1 << 24])
def test_a_vni_outside_24_bits_is_refused(vni: int) -> None:
    with pytest.raises(ValueError, match="24 bits"):
        header(vni)


def test_constants_match_the_rfc_and_an_ipv4_underlay() -> None:
    assert VXLAN_PORT == 4789
    assert OVERHEAD == 50  # 1500-byte underlay: 1450-byte inner IP MTU
    assert MIN_DATAGRAM == 22


def test_a_good_datagram_passes_whole_and_with_trailing_bytes() -> None:
    d = header(42) + FRAME
    assert check(d, len(d), 42) is None
    assert check(d + b"\xee" * 9, len(d), 42) is None  # only ``length`` bytes are looked at
    assert check(memoryview(bytearray(d)), len(d), 42) is None


def test_short_datagrams_are_runts_down_to_zero_bytes() -> None:
    d = header(42) + FRAME[:14]
    assert check(d, len(d), 42) is None  # exactly a header and an Ethernet header
    for n in range(len(d)):
        assert check(d[:n], n, 42) == "runt"
        assert check(d, n, 42) == "runt"  # a short length over a longer buffer


@pytest.mark.parametrize("flags", [0x00, 0x0C, 0x88, 0x09, 0x01])
def test_the_i_flag_must_be_set_and_every_other_flag_bit_clear(flags: int) -> None:
    d = bytes([flags]) + header(42)[1:] + FRAME
    assert check(d, len(d), 42) == "bad_flags"


@pytest.mark.parametrize("pos", [1, 2, 3])
def test_reserved_bytes_after_the_flags_must_be_zero(pos: int) -> None:
    d = bytearray(header(42) + FRAME)
    d[pos] = 0x40
    assert check(d, len(d), 42) == "bad_flags"


def test_the_last_reserved_byte_must_be_zero() -> None:
    d = bytearray(header(42) + FRAME)
    d[7] = 1
    assert check(d, len(d), 42) == "bad_reserved"


def test_another_vni_is_refused() -> None:
    d = header(43) + FRAME
    assert check(d, len(d), 42) == "wrong_vni"
    assert check(d, len(d), 43) is None
    d = header(42 | 1 << 16) + FRAME  # differs only in the VNI's high byte
    assert check(d, len(d), 42) == "wrong_vni"
