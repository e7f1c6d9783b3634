"""VMBus packet types, ranges and the packet object a reader gets.

Layer: vmbus (pure Python, cold path).  The 16-byte descriptor and the
extended headers of transfer-page (7) and GPA-direct (9) packets follow
Hyper-V's layout (spec §2; Linux ``struct vmpacket_descriptor``,
``vmtransfer_page_packet_header`` and ``vmdata_gpa_direct``).

Trust: a ``Packet`` wraps bytes already copied out of the ring by the C core,
which validated offset8 and len8.  The extended headers are validated here,
by ``check_extended_header``, before a reader ever hands the packet out.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from hv.abi import PAGE_SIZE

from .errors import RingCorruptError

__all__ = [
    "DESCRIPTOR",
    "DESCRIPTOR_BYTES",
    "FLAG_COMPLETION_REQUESTED",
    "PACKET_TYPES",
    "GpaRange",
    "Packet",
    "PacketType",
    "TransferPageRange",
    "build_gpa_direct_header",
    "build_xfer_pages_header",
    "check_extended_header",
]

DESCRIPTOR_BYTES = 16
FLAG_COMPLETION_REQUESTED = 1

#: The 16-byte descriptor: type, offset8, len8, flags, trans_id.
DESCRIPTOR = struct.Struct("<HHHHQ")
_U32X2 = struct.Struct("<II")
_XFER_HDR = struct.Struct("<HBBI")  # xfer_pageset_id, sender_owns_set, reserved, range_cnt


class PacketType(enum.IntEnum):
    """VMBus packet types (Linux ``enum vmbus_packet_type``); the ring carries 6, 7, 9, 11."""

    DATA_INBAND = 0x6
    DATA_USING_XFER_PAGES = 0x7
    DATA_USING_GPA_DIRECT = 0x9
    COMP = 0xB


@dataclass(frozen=True, slots=True)
class GpaRange:
    """One range of a GPA-direct packet: ``byte_count`` bytes from ``byte_offset``
    into the first of ``pfns`` (4 KiB guest page numbers)."""

    byte_count: int
    byte_offset: int
    pfns: tuple[int, ...]

    @staticmethod
    def pages_spanned(byte_offset: int, byte_count: int) -> int:
        return (byte_offset + byte_count + PAGE_SIZE - 1) // PAGE_SIZE


@dataclass(frozen=True, slots=True)
class TransferPageRange:
    """One range of a transfer-page packet: bytes inside a pre-shared page set."""

    byte_count: int
    byte_offset: int


def build_gpa_direct_header(ranges: list[GpaRange] | tuple[GpaRange, ...]) -> bytes:
    """The extended header of a type-9 packet: reserved, range_cnt, ranges."""
    if not ranges:
        raise ValueError("a GPA-direct packet needs at least one range")
    parts = [_U32X2.pack(0, len(ranges))]
    for r in ranges:
        if not 0 <= r.byte_offset < PAGE_SIZE or r.byte_count <= 0:
            raise ValueError(f"bad GPA range {r}: byte_offset must be < 4096, byte_count > 0")
        if len(r.pfns) != GpaRange.pages_spanned(r.byte_offset, r.byte_count):
            raise ValueError(f"GPA range {r} must list exactly the pages it spans")
        parts.append(_U32X2.pack(r.byte_count, r.byte_offset))
        parts.append(struct.pack(f"<{len(r.pfns)}Q", *r.pfns))
    return b"".join(parts)


def build_xfer_pages_header(
    pageset_id: int, ranges: list[TransferPageRange] | tuple[TransferPageRange, ...]
) -> bytes:
    """The extended header of a type-7 packet."""
    parts = [_XFER_HDR.pack(pageset_id, 0, 0, len(ranges))]
    parts.extend(_U32X2.pack(r.byte_count, r.byte_offset) for r in ranges)
    return b"".join(parts)


def _parse_gpa_direct(raw: bytes, start: int, end: int) -> tuple[GpaRange, ...]:
    if end - start < 8:
        raise RingCorruptError("gpa_direct_header", end - start, "no room for range_cnt")
    _reserved, count = _U32X2.unpack_from(raw, start)
    if count == 0:
        raise RingCorruptError("gpa_direct_header", 0, "range_cnt is 0")
    pos = start + 8
    ranges = []
    for _ in range(count):
        if end - pos < 8:
            raise RingCorruptError("gpa_direct_header", count, "range_cnt exceeds the header")
        byte_count, byte_offset = _U32X2.unpack_from(raw, pos)
        if byte_offset >= PAGE_SIZE or byte_count == 0:
            raise RingCorruptError(
                "gpa_direct_header", byte_offset, f"bad range ({byte_count} bytes at {byte_offset})"
            )
        pages = GpaRange.pages_spanned(byte_offset, byte_count)
        pos += 8
        if end - pos < 8 * pages:
            raise RingCorruptError("gpa_direct_header", pages, "PFN list exceeds the header")
        pfns = struct.unpack_from(f"<{pages}Q", raw, pos)
        pos += 8 * pages
        ranges.append(GpaRange(byte_count, byte_offset, pfns))
    return tuple(ranges)


def _parse_xfer_pages(
    raw: bytes, start: int, end: int
) -> tuple[int, tuple[TransferPageRange, ...]]:
    if end - start < _XFER_HDR.size:
        raise RingCorruptError("xfer_pages_header", end - start, "no room for range_cnt")
    pageset_id, _owns, _reserved, count = _XFER_HDR.unpack_from(raw, start)
    if 8 * count > end - start - _XFER_HDR.size:
        raise RingCorruptError("xfer_pages_header", count, "range_cnt exceeds the header")
    ranges = tuple(
        TransferPageRange(*_U32X2.unpack_from(raw, start + _XFER_HDR.size + 8 * i))
        for i in range(count)
    )
    return pageset_id, ranges


def check_extended_header(raw: bytes, pos: int = 0) -> None:
    """Raise RingCorruptError if the packet at raw[pos:] has a bad type-7/9 header."""
    ptype, off8, _len8, _flags, _tid = DESCRIPTOR.unpack_from(raw, pos)
    start, end = pos + DESCRIPTOR_BYTES, pos + off8 * 8
    if ptype == PacketType.DATA_USING_GPA_DIRECT:
        _parse_gpa_direct(raw, start, end)
    elif ptype == PacketType.DATA_USING_XFER_PAGES:
        _parse_xfer_pages(raw, start, end)


#: Wire value -> PacketType, without an Enum call (~10x cheaper on hot paths).
PACKET_TYPES = {int(t): t for t in PacketType}


class Packet:
    """A packet read from a ring: descriptor fields, payload and, for types 7
    and 9, the parsed ranges.

    A Packet is a window on a private copy of the packet (often shared by a
    whole batch): ``payload`` is sliced out when the packet is handed out,
    the other fields are decoded on first access.  ``Packet(raw)`` wraps the
    raw bytes of one packet (descriptor first) as found in a ring.

    The ring's readers, which make one Packet per packet read, skip
    ``__init__`` (a Python frame, ~40 ns) and set the three slots directly:
    ``data`` (the bytes the packet lies in: often a whole read-ahead batch,
    other packets included, so read ``payload`` or ``raw()``, not ``data``),
    ``start`` (where its descriptor begins in them) and ``payload``.
    """

    __slots__ = ("data", "payload", "start")

    def __init__(self, raw: bytes, pos: int = 0) -> None:
        self.data = raw
        self.start = pos
        #: The bytes from offset8·8 to len8·8 of the packet (padding included).
        self.payload = raw[
            pos + (raw[pos + 2] | raw[pos + 3] << 8) * 8 : pos
            + (raw[pos + 4] | raw[pos + 5] << 8) * 8
        ]

    @property
    def packet_type(self) -> PacketType:
        return PACKET_TYPES[self.data[self.start] | self.data[self.start + 1] << 8]

    @property
    def flags(self) -> int:
        return self.data[self.start + 6] | self.data[self.start + 7] << 8

    @property
    def completion_requested(self) -> bool:
        return bool(self.data[self.start + 6] & FLAG_COMPLETION_REQUESTED)

    @property
    def trans_id(self) -> int:
        return int.from_bytes(self.data[self.start + 8 : self.start + 16], "little")

    @property
    def offset8(self) -> int:
        return self.data[self.start + 2] | self.data[self.start + 3] << 8

    @property
    def len8(self) -> int:
        return self.data[self.start + 4] | self.data[self.start + 5] << 8

    @property
    def ranges(self) -> tuple[GpaRange, ...] | tuple[TransferPageRange, ...] | None:
        """GPA ranges (type 9), transfer-page ranges (type 7), else None."""
        ptype, off8 = self.packet_type, self.offset8
        start, end = self.start + DESCRIPTOR_BYTES, self.start + off8 * 8
        if ptype == PacketType.DATA_USING_GPA_DIRECT:
            return _parse_gpa_direct(self.data, start, end)
        if ptype == PacketType.DATA_USING_XFER_PAGES:
            return _parse_xfer_pages(self.data, start, end)[1]
        return None

    @property
    def xfer_pageset_id(self) -> int | None:
        if self.packet_type != PacketType.DATA_USING_XFER_PAGES:
            return None
        return _parse_xfer_pages(self.data, self.start + 16, self.start + self.offset8 * 8)[0]

    def raw(self) -> bytes:
        """The packet's bytes as they were in the ring (descriptor to len8·8)."""
        return self.data[self.start : self.start + self.len8 * 8]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Packet):
            return NotImplemented
        return self.raw() == other.raw()

    def __hash__(self) -> int:
        return hash(self.raw())

    def __repr__(self) -> str:
        return (
            f"Packet(type={self.packet_type.name}, flags={self.flags:#x}, "
            f"trans_id={self.trans_id}, payload={len(self.payload)} bytes)"
        )
