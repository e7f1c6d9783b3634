"""Dynamic Memory messages against byte vectors written from the spec (§7.2)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from partitions.devices.dynmem import protocol as D
from partitions.devices.dynmem.protocol import PageRange


def hdr(t: int, size: int, tid: int) -> bytes:
    return struct.pack("<HHI", t, size, tid)  # type u16 @0, size u16 @2, trans_id u32 @4


VECTORS = [
    # DM_VERSION_REQUEST 2.0, not the last attempt: 16 bytes
    (D.VersionRequest(0x00020000), 7, hdr(1, 16, 7) + bytes.fromhex("00000200" "00000000")),
    (D.VersionRequest(0x00000003, True), 9, hdr(1, 16, 9) + bytes.fromhex("03000000 01000000")),
    (D.VersionResponse(True), 7, hdr(2, 16, 7) + bytes.fromhex("0100000000000000")),
    # caps: balloon bit0, hot_add bit1, alignment 7 in bits 2-5 -> 0x1f; min 0; max all ones
    (D.CapabilitiesReport(), 1,
     hdr(3, 32, 1) + bytes.fromhex("1f00000000000000" "0000000000000000" "ffffffffffffffff")),
    (D.CapabilitiesReport(balloon=True, hot_add=False, hot_add_alignment=0), 1,
     hdr(3, 32, 1) + bytes.fromhex("0100000000000000" + "00" * 8 + "ff" * 8)),
    (D.CapabilitiesResponse(True), 1, hdr(4, 16, 1) + bytes.fromhex("0100000000000000")),
    (D.StatusReport(num_avail=0x1000, num_committed=0x2000, page_file_writes=3, io_diff=4), 5,
     hdr(5, 48, 5) + struct.pack("<QQQQII", 0x1000, 0x2000, 0, 0, 3, 4)),
    (D.BalloonRequest(512), 2, hdr(6, 16, 2) + struct.pack("<II", 512, 0)),
    # two ranges, last message: word = range_count << 1 | more_pages
    (D.BalloonResponse((PageRange(0x100, 0x200), PageRange(0x12345, 1))), 2,
     hdr(7, 32, 2) + struct.pack("<II", 0, 2 << 1)
     + struct.pack("<QQ", 0x100 | 0x200 << 40, 0x12345 | 1 << 40)),
    (D.BalloonResponse((PageRange(1, 2),), more_pages=True), 2,
     hdr(7, 24, 2) + struct.pack("<II", 0, 1 << 1 | 1) + struct.pack("<Q", 1 | 2 << 40)),
    (D.UnballoonRequest((PageRange(0x40000, 512),), more_pages=False), 3,
     hdr(8, 24, 3) + struct.pack("<II", 0, 1) + struct.pack("<Q", 0x40000 | 512 << 40)),
    (D.UnballoonResponse(), 3, hdr(9, 8, 3)),
    # 128 MiB at 1 GiB: start PFN 0x40000, 32768 pages
    (D.HotAddRequest(PageRange(0x40000, 0x8000)), 4,
     hdr(10, 16, 4) + struct.pack("<Q", 0x40000 | 0x8000 << 40)),
    (D.HotAddRequest(PageRange(0x40000, 0x100), PageRange(0x40000, 0x8000)), 4,
     hdr(10, 24, 4) + struct.pack("<QQ", 0x40000 | 0x100 << 40, 0x40000 | 0x8000 << 40)),
    (D.HotAddResponse(0x8000, 1), 4, hdr(11, 16, 4) + struct.pack("<II", 0x8000, 1)),
    (D.InfoMessage.max_page_count(0x100000), 0,
     hdr(12, 32, 0) + struct.pack("<II", 0, 16) + struct.pack("<IIQ", 0, 8, 0x100000)),
]


@pytest.mark.parametrize(("msg", "tid", "wire"), VECTORS,
                         ids=[type(v[0]).__name__ for v in VECTORS])
def test_byte_vectors_round_trip(msg, tid, wire):
    assert msg.encode(tid) == wire
    assert D.decode(wire) == (msg, tid)
    # VMBus pads payloads to 8 bytes: trailing padding is not part of the message
    assert D.decode(wire + bytes(8)) == (msg, tid)


def test_the_spec_sizes():
    sizes = {D.DmType.VERSION_REQUEST: 16, D.DmType.VERSION_RESPONSE: 16,
             D.DmType.CAPABILITIES_REPORT: 32, D.DmType.CAPABILITIES_RESPONSE: 16,
             D.DmType.STATUS_REPORT: 48, D.DmType.BALLOON_REQUEST: 16,
             D.DmType.BALLOON_RESPONSE: 16, D.DmType.UNBALLOON_REQUEST: 16,
             D.DmType.UNBALLOON_RESPONSE: 8, D.DmType.MEM_HOT_ADD_REQUEST: 16,
             D.DmType.MEM_HOT_ADD_RESPONSE: 16, D.DmType.INFO_MESSAGE: 16}
    for t, n in sizes.items():
        assert D.fixed_size(t) == n, t.name
    assert D.DM_CLASS_ID.bytes_le.hex() == "dc745052" "8589" "e246" "8057a307dc18a502"
    assert D.MAX_RANGES_PER_MESSAGE == 510


@pytest.mark.parametrize("wire", [
    b"",
    hdr(1, 16, 0)[:6],
    hdr(99, 8, 0),  # unknown type
    hdr(1, 12, 0) + bytes(8),  # size below the fixed part
    hdr(1, 40, 0) + bytes(8),  # size past the payload
    hdr(10, 20, 0) + bytes(16),  # hot-add is 16 or 24
    hdr(7, 24, 0) + struct.pack("<II", 0, 5 << 1) + bytes(8),  # 5 ranges in room for 1
    hdr(8, 16, 0) + struct.pack("<II", 0, 1),  # 1 range, none present
    hdr(12, 24, 0) + struct.pack("<II", 0, 100) + bytes(8),  # info_size past the end
    hdr(12, 24, 0) + struct.pack("<II", 0, 8) + struct.pack("<II", 0, 50),  # item past info
])
def test_malformed_messages_are_refused(wire):
    with pytest.raises(D.DmProtocolError):
        D.decode(wire)


@given(st.binary(max_size=128))
def test_decode_never_raises_anything_else(data):
    try:
        D.decode(data)
    except D.DmProtocolError:
        pass


def test_page_range_bounds():
    assert PageRange.decode(PageRange(_ := (1 << 40) - 1, (1 << 24) - 1).encode()) == PageRange(
        (1 << 40) - 1, (1 << 24) - 1)
    for bad in ((1 << 40, 1), (0, 1 << 24), (-1, 0)):
        with pytest.raises(D.DmProtocolError):
            PageRange(*bad)
