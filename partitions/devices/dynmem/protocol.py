"""The Dynamic Memory protocol (hv_balloon): byte-exact messages, sans-IO.

Layer: partitions/devices (pure Python, no I/O).  Spec §7: every message is
an inband packet without completion requested; it starts with ``dm_header``
{type u16, size u16 (bytes including the header), trans_id u32}; a page range
is one u64 with the start PFN in bits 0-39 and the page count in bits 40-63.

``decode`` is the one entry point for bytes another partition wrote: it reads
the header once, checks that ``size`` covers the type's fixed part and lies
within the packet (VMBus pads payloads to 8 bytes, so a payload may be longer
than ``size``), bounds every range count by ``size``, and raises
``DmProtocolError`` otherwise.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, field
from typing import ClassVar, Self

__all__ = [
    "DM_CLASS_ID",
    "HOT_ADD_ALIGN_128M",
    "MAX_RANGES_PER_MESSAGE",
    "DmMessage",
    "DmProtocolError",
    "DmType",
    "DmVersion",
    "PageRange",
    "decode",
]

DM_CLASS_ID = uuid.UUID("525074dc-8985-46e2-8057-a307dc18a502")  # spec §5, §7.1
HEADER = struct.Struct("<HHI")
#: hot_add_alignment is log2 of the block size in MiB: 7 means 128 MiB.
HOT_ADD_ALIGN_128M = 7
#: A balloon response is at most one 4 KiB page: (4096 - 16) / 8 ranges (spec §7.3).
MAX_RANGES_PER_MESSAGE = (4096 - 16) // 8
_PFN_MASK = (1 << 40) - 1
_CNT_MAX = (1 << 24) - 1


class DmProtocolError(ValueError):
    """A Dynamic Memory message that is malformed."""


class DmType(enum.IntEnum):
    ERROR = 0
    VERSION_REQUEST = 1
    VERSION_RESPONSE = 2
    CAPABILITIES_REPORT = 3
    CAPABILITIES_RESPONSE = 4
    STATUS_REPORT = 5
    BALLOON_REQUEST = 6
    BALLOON_RESPONSE = 7
    UNBALLOON_REQUEST = 8
    UNBALLOON_RESPONSE = 9
    MEM_HOT_ADD_REQUEST = 10
    MEM_HOT_ADD_RESPONSE = 11
    INFO_MESSAGE = 12


class DmVersion(enum.IntEnum):
    WIN7 = 0x00000003  # 0.3
    WIN8 = 0x00010000  # 1.0
    WIN10 = 0x00020000  # 2.0


@dataclass(frozen=True, slots=True)
class PageRange:
    """``count`` 4 KiB pages from PFN ``start`` (dm_mem_page_range)."""

    start: int
    count: int

    def __post_init__(self) -> None:
        if not (0 <= self.start <= _PFN_MASK and 0 <= self.count <= _CNT_MAX):
            raise DmProtocolError(f"page range {self.start:#x}+{self.count} does not fit a u64")

    def encode(self) -> int:
        return self.start | self.count << 40

    @classmethod
    def decode(cls, v: int) -> PageRange:
        return cls(v & _PFN_MASK, v >> 40)

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True, slots=True)
class DmMessage:
    """Base: ``TYPE``, the fixed body ``_BODY`` (after the header), ``trans_id``."""

    TYPE: ClassVar[DmType]
    _BODY: ClassVar[struct.Struct] = struct.Struct("<")

    def body(self) -> bytes:
        raise NotImplementedError

    def encode(self, trans_id: int = 0) -> bytes:
        body = self.body()
        return HEADER.pack(self.TYPE, HEADER.size + len(body), trans_id) + body


@dataclass(frozen=True, slots=True)
class VersionRequest(DmMessage):
    TYPE = DmType.VERSION_REQUEST
    _BODY = struct.Struct("<II")
    version: int
    is_last_attempt: bool = False

    def body(self) -> bytes:
        return self._BODY.pack(self.version, int(self.is_last_attempt))

    @classmethod
    def parse(cls, b: bytes) -> VersionRequest:
        v, flags = cls._BODY.unpack_from(b)
        return cls(v, bool(flags & 1))


@dataclass(frozen=True, slots=True)
class _Accepted(DmMessage):
    """Base of the two answers whose body is one u64 with ``is_accepted`` in bit 0."""

    _BODY = struct.Struct("<Q")
    is_accepted: bool

    def body(self) -> bytes:
        return self._BODY.pack(int(self.is_accepted))

    @classmethod
    def parse(cls, b: bytes) -> Self:
        return cls(bool(cls._BODY.unpack_from(b)[0] & 1))


@dataclass(frozen=True, slots=True)
class VersionResponse(_Accepted):
    TYPE = DmType.VERSION_RESPONSE


@dataclass(frozen=True, slots=True)
class CapabilitiesReport(DmMessage):
    TYPE = DmType.CAPABILITIES_REPORT
    _BODY = struct.Struct("<QQQ")
    balloon: bool = True
    hot_add: bool = True
    hot_add_alignment: int = HOT_ADD_ALIGN_128M  # log2 MiB
    min_page_cnt: int = 0
    max_page_number: int = (1 << 64) - 1

    def body(self) -> bytes:
        if not 0 <= self.hot_add_alignment <= 15:
            raise DmProtocolError("hot_add_alignment is a 4-bit field")
        caps = int(self.balloon) | int(self.hot_add) << 1 | self.hot_add_alignment << 2
        return self._BODY.pack(caps, self.min_page_cnt, self.max_page_number)

    @classmethod
    def parse(cls, b: bytes) -> CapabilitiesReport:
        caps, mn, mx = cls._BODY.unpack_from(b)
        return cls(bool(caps & 1), bool(caps & 2), caps >> 2 & 0xF, mn, mx)


@dataclass(frozen=True, slots=True)
class CapabilitiesResponse(_Accepted):
    TYPE = DmType.CAPABILITIES_RESPONSE


@dataclass(frozen=True, slots=True)
class StatusReport(DmMessage):
    """Pressure report (all in pages); the host uses ``num_committed``."""

    TYPE = DmType.STATUS_REPORT
    _BODY = struct.Struct("<QQQQII")
    num_avail: int
    num_committed: int
    page_file_size: int = 0
    zero_free: int = 0
    page_file_writes: int = 0
    io_diff: int = 0

    def body(self) -> bytes:
        return self._BODY.pack(self.num_avail, self.num_committed, self.page_file_size,
                               self.zero_free, self.page_file_writes, self.io_diff)

    @classmethod
    def parse(cls, b: bytes) -> StatusReport:
        return cls(*cls._BODY.unpack_from(b))


@dataclass(frozen=True, slots=True)
class BalloonRequest(DmMessage):
    TYPE = DmType.BALLOON_REQUEST
    _BODY = struct.Struct("<II")
    num_pages: int

    def body(self) -> bytes:
        return self._BODY.pack(self.num_pages, 0)

    @classmethod
    def parse(cls, b: bytes) -> BalloonRequest:
        return cls(cls._BODY.unpack_from(b)[0])


def _ranges(b: bytes, off: int, count: int) -> tuple[PageRange, ...]:
    if count > MAX_RANGES_PER_MESSAGE or off + 8 * count > len(b):
        raise DmProtocolError(f"{count} ranges do not fit the message")
    return tuple(PageRange.decode(v) for v in struct.unpack_from(f"<{count}Q", b, off))


def _pack_ranges(ranges: tuple[PageRange, ...]) -> bytes:
    if len(ranges) > MAX_RANGES_PER_MESSAGE:
        raise DmProtocolError(f"{len(ranges)} ranges exceed {MAX_RANGES_PER_MESSAGE}")
    return struct.pack(f"<{len(ranges)}Q", *(r.encode() for r in ranges))


@dataclass(frozen=True, slots=True)
class BalloonResponse(DmMessage):
    TYPE = DmType.BALLOON_RESPONSE
    _BODY = struct.Struct("<II")
    ranges: tuple[PageRange, ...] = ()
    more_pages: bool = False

    def body(self) -> bytes:
        return self._BODY.pack(0, int(self.more_pages) | len(self.ranges) << 1) + _pack_ranges(
            self.ranges)

    @classmethod
    def parse(cls, b: bytes) -> BalloonResponse:
        _res, word = cls._BODY.unpack_from(b)
        return cls(_ranges(b, cls._BODY.size, word >> 1), bool(word & 1))


@dataclass(frozen=True, slots=True)
class UnballoonRequest(DmMessage):
    TYPE = DmType.UNBALLOON_REQUEST
    _BODY = struct.Struct("<II")
    ranges: tuple[PageRange, ...] = ()
    more_pages: bool = False

    def body(self) -> bytes:
        return self._BODY.pack(int(self.more_pages), len(self.ranges)) + _pack_ranges(self.ranges)

    @classmethod
    def parse(cls, b: bytes) -> UnballoonRequest:
        flags, count = cls._BODY.unpack_from(b)
        return cls(_ranges(b, cls._BODY.size, count), bool(flags & 1))


@dataclass(frozen=True, slots=True)
class UnballoonResponse(DmMessage):
    TYPE = DmType.UNBALLOON_RESPONSE

    def body(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, b: bytes) -> UnballoonResponse:
        return cls()


@dataclass(frozen=True, slots=True)
class HotAddRequest(DmMessage):
    """Hot-add ``range``; with ``region``, the region is added first and
    only partly populated by ``range`` (the 24-byte form)."""

    TYPE = DmType.MEM_HOT_ADD_REQUEST
    _BODY = struct.Struct("<Q")
    range: PageRange
    region: PageRange | None = None

    def body(self) -> bytes:
        b = self._BODY.pack(self.range.encode())
        return b if self.region is None else b + self._BODY.pack(self.region.encode())

    @classmethod
    def parse(cls, b: bytes) -> HotAddRequest:
        rng = PageRange.decode(cls._BODY.unpack_from(b)[0])
        region = PageRange.decode(cls._BODY.unpack_from(b, 8)[0]) if len(b) >= 16 else None
        return cls(rng, region)


@dataclass(frozen=True, slots=True)
class HotAddResponse(DmMessage):
    TYPE = DmType.MEM_HOT_ADD_RESPONSE
    _BODY = struct.Struct("<II")
    page_count: int
    result: int  # 1 success (or permanent failure with 0 pages), 0 transient failure

    def body(self) -> bytes:
        return self._BODY.pack(self.page_count, self.result)

    @classmethod
    def parse(cls, b: bytes) -> HotAddResponse:
        return cls(*cls._BODY.unpack_from(b))


INFO_TYPE_MAX_PAGE_CNT = 0


@dataclass(frozen=True, slots=True)
class InfoMessage(DmMessage):
    """DM_INFO (>= 1.0): {type u32, data_size u32, data} items."""

    TYPE = DmType.INFO_MESSAGE
    _BODY = struct.Struct("<II")
    items: tuple[tuple[int, bytes], ...] = field(default_factory=tuple)

    def body(self) -> bytes:
        info = b"".join(struct.pack("<II", t, len(d)) + d for t, d in self.items)
        return self._BODY.pack(0, len(info)) + info

    @classmethod
    def parse(cls, b: bytes) -> InfoMessage:
        _res, size = cls._BODY.unpack_from(b)
        if cls._BODY.size + size > len(b):
            raise DmProtocolError("info_size runs past the message")
        info, items, off = b[cls._BODY.size : cls._BODY.size + size], [], 0
        while off + 8 <= len(info):
            t, n = struct.unpack_from("<II", info, off)
            if off + 8 + n > len(info):
                raise DmProtocolError("an info item runs past info_size")
            items.append((t, info[off + 8 : off + 8 + n]))
            off += 8 + n
        return cls(tuple(items))

    @classmethod
    def max_page_count(cls, pages: int) -> InfoMessage:
        return cls(((INFO_TYPE_MAX_PAGE_CNT, struct.pack("<Q", pages)),))


MESSAGES: dict[DmType, type[DmMessage]] = {
    c.TYPE: c for c in (VersionRequest, VersionResponse, CapabilitiesReport,
                        CapabilitiesResponse, StatusReport, BalloonRequest, BalloonResponse,
                        UnballoonRequest, UnballoonResponse, HotAddRequest, HotAddResponse,
                        InfoMessage)
}


def fixed_size(t: DmType) -> int:
    """Total bytes of a message of type ``t`` with no ranges or info."""
    return HEADER.size + MESSAGES[t]._BODY.size


def decode(data: bytes) -> tuple[DmMessage, int]:
    """(message, trans_id) from one packet payload another partition wrote.

    Raises:
        DmProtocolError: unknown type, a size that does not cover the fixed
            part or runs past the payload, counts that do not fit.
    """
    data = bytes(data)  # one private copy: nothing below re-reads shared memory
    if len(data) < HEADER.size:
        raise DmProtocolError(f"a {len(data)}-byte message has no dm_header")
    raw_type, size, trans_id = HEADER.unpack_from(data)
    try:
        t = DmType(raw_type)
        cls = MESSAGES[t]
    except (ValueError, KeyError):
        raise DmProtocolError(f"unknown Dynamic Memory message type {raw_type}") from None
    if not fixed_size(t) <= size <= len(data):
        raise DmProtocolError(f"{t.name}: size {size} outside {fixed_size(t)}..{len(data)}")
    body = data[HEADER.size : size]
    if t == DmType.MEM_HOT_ADD_REQUEST and size not in (16, 24):
        raise DmProtocolError(f"MEM_HOT_ADD_REQUEST of {size} bytes (16 or 24)")
    try:
        return cls.parse(body), trans_id  # type: ignore[attr-defined]
    except struct.error as e:
        raise DmProtocolError(f"{t.name}: {e}") from None
