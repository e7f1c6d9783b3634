"""Packet descriptor, extended headers (types 7 and 9) and the Packet object.

Byte vectors are written by hand from the spec (vmbus-protocol.md §2): the
16-byte descriptor {type u16, offset8 u16, len8 u16, flags u16, trans_id u64},
the GPA-direct header {reserved u32, range_cnt u32, {byte_count u32,
byte_offset u32, pfn u64[]}...} and the transfer-page header {pageset_id u16,
sender_owns_set u8, reserved u8, range_cnt u32, {byte_count u32,
byte_offset u32}...}, all little endian.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbus.errors import RingCorruptError, VmbusError
from vmbus.packet import (
    GpaRange,
    Packet,
    PacketType,
    TransferPageRange,
    build_gpa_direct_header,
    build_xfer_pages_header,
    check_extended_header,
)
from vmbus.ring import packet_bytes

H = bytes.fromhex

# type 6, offset8 2, len8 3, flags 1, trans_id 0x0102030405060708; payload "hello" + 3 zeros
INBAND_HELLO = H("0600 0200 0300 0100 0807060504030201") + b"hello\0\0\0"

# GPA direct: one range of 5000 bytes at offset 100 spans 2 pages (0x10, 0x11)
GPA_ONE_RANGE = H(
    "00000000 01000000"  # reserved, range_cnt 1
    "88130000 64000000"  # byte_count 5000, byte_offset 100
    "1000000000000000 1100000000000000"  # pfn 0x10, 0x11
)
# transfer pages: pageset 0x1234, two ranges (100 @ 0) and (200 @ 4096)
XFER_TWO_RANGES = H(
    "3412 00 00 02000000"  # pageset_id, sender_owns_set, reserved, range_cnt 2
    "64000000 00000000"  # 100 bytes at 0
    "c8000000 00100000"  # 200 bytes at 4096
)


def test_packet_type_numbers_are_hyper_vs() -> None:
    assert PacketType.DATA_INBAND == 6
    assert PacketType.DATA_USING_XFER_PAGES == 7
    assert PacketType.DATA_USING_GPA_DIRECT == 9
    assert PacketType.COMP == 0xB


def test_descriptor_fields_decode_from_hand_written_bytes() -> None:
    p = Packet(INBAND_HELLO)
    assert p.packet_type is PacketType.DATA_INBAND
    assert p.offset8 == 2
    assert p.len8 == 3
    assert p.flags == 1
    assert p.completion_requested
    assert p.trans_id == 0x0102030405060708
    assert p.payload == b"hello\0\0\0"  # offset8*8 .. len8*8, padding included
    assert p.raw() == INBAND_HELLO
    assert p.ranges is None
    assert p.xfer_pageset_id is None


def test_packet_at_an_offset_inside_a_batch_sees_only_its_own_bytes() -> None:
    comp = H("0b00 0200 0200 0000 2a00000000000000")  # a completion, no payload
    raw = INBAND_HELLO + comp + H("ff" * 8)
    p = Packet(raw, len(INBAND_HELLO))
    assert p.packet_type is PacketType.COMP
    assert p.trans_id == 42
    assert p.flags == 0 and not p.completion_requested
    assert p.payload == b""
    assert p.raw() == comp


def test_payload_starts_at_offset8_not_after_the_descriptor() -> None:
    # offset8 = 3: 8 bytes between descriptor and payload are not payload
    raw = H("0600 0300 0400 0000 0000000000000000") + b"HEADERxx" + b"PAYLOAD!"
    assert Packet(raw).payload == b"PAYLOAD!"


def test_flag_bits_beyond_bit0_are_visible_but_not_completion() -> None:
    raw = H("0600 0200 0200 0200 0000000000000000")
    p = Packet(raw)
    assert p.flags == 2
    assert not p.completion_requested


def test_equality_and_hash_follow_the_raw_bytes() -> None:
    a = Packet(INBAND_HELLO)
    b = Packet(b"junk" + INBAND_HELLO, 4)
    c = Packet(INBAND_HELLO[:8] + H("0900000000000000") + INBAND_HELLO[16:])
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert a != object()
    assert "DATA_INBAND" in repr(a) and "8 bytes" in repr(a)


def test_gpa_direct_header_bytes() -> None:
    assert build_gpa_direct_header([GpaRange(5000, 100, (0x10, 0x11))]) == GPA_ONE_RANGE


def test_gpa_direct_header_with_two_ranges() -> None:
    ranges = [GpaRange(4096, 0, (7,)), GpaRange(1, 4095, (0xFFFFFFFFFF,))]
    assert build_gpa_direct_header(ranges) == H(
        "00000000 0200000000100000 00000000 070000000000000001000000 ff0f0000 ffffffffff000000"
    )


@pytest.mark.parametrize(
    ("ranges", "match"),
    [
        ([], "at least one range"),
        ([GpaRange(10, 4096, (1,))], "byte_offset"),
        ([GpaRange(0, 0, (1,))], "byte_count"),
        ([GpaRange(5000, 100, (1,))], "pages it spans"),  # needs 2 PFNs
        ([GpaRange(10, 0, (1, 2))], "pages it spans"),  # needs 1 PFN
    ],
)
def test_gpa_direct_header_rejects_bad_ranges(ranges: list[GpaRange], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_gpa_direct_header(ranges)


@pytest.mark.parametrize(
    ("offset", "count", "pages"),
    [
        (0, 1, 1),
        (0, 4096, 1),
        (1, 4096, 2),
        (4095, 2, 2),
        (0, 4097, 2),
        (100, 5000, 2),
        (0, 3 * 4096, 3),
    ],
)
def test_pages_spanned(offset: int, count: int, pages: int) -> None:
    assert GpaRange.pages_spanned(offset, count) == pages


def test_xfer_pages_header_bytes() -> None:
    hdr = build_xfer_pages_header(0x1234, [TransferPageRange(100, 0), TransferPageRange(200, 4096)])
    assert hdr == XFER_TWO_RANGES


def test_ranges_parse_from_a_packet_with_a_gpa_direct_header() -> None:
    # offset8 = (16 + 32) / 8 = 6; 3 payload bytes padded to 8: len8 = 7
    raw = H("0900 0600 0700 0100 0500000000000000") + GPA_ONE_RANGE + b"abc\0\0\0\0\0"
    check_extended_header(raw)
    p = Packet(raw)
    assert p.packet_type is PacketType.DATA_USING_GPA_DIRECT
    assert p.ranges == (GpaRange(5000, 100, (0x10, 0x11)),)
    assert p.payload == b"abc\0\0\0\0\0"
    assert p.xfer_pageset_id is None


def test_ranges_parse_from_a_packet_with_a_transfer_page_header() -> None:
    # offset8 = (16 + 24) / 8 = 5, no payload: len8 = 5
    raw = H("0700 0500 0500 0000 0100000000000000") + XFER_TWO_RANGES
    check_extended_header(raw)
    p = Packet(raw)
    assert p.ranges == (TransferPageRange(100, 0), TransferPageRange(200, 4096))
    assert p.xfer_pageset_id == 0x1234
    assert p.payload == b""


def _pkt(ptype: int, ext: bytes) -> bytes:
    off8 = 2 + len(ext) // 8
    return (
        H(f"{ptype:02x}00")
        + off8.to_bytes(2, "little")
        + off8.to_bytes(2, "little")
        + (bytes(10))
        + ext
    )


@pytest.mark.parametrize(
    ("ptype", "ext", "reason"),
    [
        (9, b"", "gpa_direct_header"),  # no room for reserved + range_cnt
        (9, H("00000000 00000000"), "gpa_direct_header"),  # range_cnt 0
        (
            9,
            H("00000000 02000000 01000000 00000000 0100000000000000"),
            "gpa_direct_header",
        ),  # range_cnt 2, one range present
        (
            9,
            H("00000000 01000000 88130000 64000000 1000000000000000"),
            "gpa_direct_header",
        ),  # 5000 bytes @100 needs 2 PFNs, 1 present
        (
            9,
            H("00000000 01000000 01000000 00100000 0100000000000000"),
            "gpa_direct_header",
        ),  # byte_offset 4096
        (
            9,
            H("00000000 01000000 00000000 00000000 0100000000000000"),
            "gpa_direct_header",
        ),  # byte_count 0
        (
            9,
            H("00000000 01000000 ffffffff ff0f0000 0100000000000000"),
            "gpa_direct_header",
        ),  # a huge byte_count: PFN list far beyond the header
        (7, b"", "xfer_pages_header"),  # no room for range_cnt
        (7, H("0100 00 00 02000000 01000000 00000000"), "xfer_pages_header"),  # cnt 2, 1 there
        (7, H("0100 00 00 ffffffff"), "xfer_pages_header"),  # huge range_cnt
    ],
)
def test_bad_extended_headers_are_corruption(ptype: int, ext: bytes, reason: str) -> None:
    raw = _pkt(ptype, ext)
    with pytest.raises(RingCorruptError) as ei:
        check_extended_header(raw)
    assert ei.value.reason == reason
    with pytest.raises(RingCorruptError):
        _ = Packet(raw).ranges


def test_extended_header_check_ignores_types_without_one() -> None:
    check_extended_header(INBAND_HELLO)
    check_extended_header(_pkt(0xB, b""))


def test_ring_corrupt_error_is_a_vmbus_error_with_reason_and_value() -> None:
    e = RingCorruptError("bad_lengths", 0x20003, "detail here")
    assert isinstance(e, VmbusError)
    assert (e.reason, e.value) == ("bad_lengths", 0x20003)
    assert "bad_lengths" in str(e) and "0x20003" in str(e) and "detail here" in str(e)


@pytest.mark.parametrize(
    ("payload", "ext", "total"),
    [(0, 0, 24), (1, 0, 32), (8, 0, 32), (9, 0, 40), (3, 32, 64), (0, 24, 48)],
)
def test_packet_bytes_counts_descriptor_padding_and_trailer(
    payload: int, ext: int, total: int
) -> None:
    assert packet_bytes(payload, ext) == total


_gpa_range = st.builds(
    lambda off, count, base: GpaRange(
        count, off, tuple(range(base, base + GpaRange.pages_spanned(off, count)))
    ),
    st.integers(0, 4095),
    st.integers(1, 5 * 4096),
    st.integers(0, 2**52),
)


@given(st.lists(_gpa_range, min_size=1, max_size=4))
def test_gpa_direct_header_round_trips(ranges: list[GpaRange]) -> None:
    ext = build_gpa_direct_header(ranges)
    assert len(ext) % 8 == 0
    raw = _pkt(9, ext)
    check_extended_header(raw)
    assert Packet(raw).ranges == tuple(ranges)


@given(
    st.integers(0, 0xFFFF),
    st.lists(
        st.builds(TransferPageRange, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
        max_size=6,
    ),
)
def test_xfer_pages_header_round_trips(pageset: int, ranges: list[TransferPageRange]) -> None:
    raw = _pkt(7, build_xfer_pages_header(pageset, ranges))
    check_extended_header(raw)
    p = Packet(raw)
    assert p.ranges == tuple(ranges)
    assert p.xfer_pageset_id == pageset
