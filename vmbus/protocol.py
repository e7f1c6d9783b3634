"""VMBus channel-management messages: one declarative table, byte-exact.

Layer: vmbus (sans-IO).  Every message is a packed little-endian struct that
starts with the 8-byte header {msgtype u32, padding u32} and fits in a
240-byte SynIC payload (spec §3; Linux ``struct vmbus_channel_*``, OpenVMM
``vmbus_core::protocol``).  GUIDs travel in Microsoft's mixed-endian order
(``uuid.UUID.bytes_le``).

The table ``MESSAGES`` maps each ``MessageType`` to a frozen dataclass whose
``_LAYOUT`` gives the fixed part; GPADL_HEADER and GPADL_BODY carry a
variable tail of page numbers.  ``decode`` is the one entry point for bytes
another partition wrote.

Trust: ``decode`` reads the message type once, rejects unknown types and
payloads shorter than the type's fixed size (longer ones are accepted, as
hosts round sizes up to 8), and bounds every count by the bytes present.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from hv.abi import PAGE_SIZE

from .errors import VmbusError

__all__ = [
    "GPADL_BODY_MAX_PFNS",
    "GPADL_HEADER_MAX_PFNS",
    "MAX_MESSAGE_BYTES",
    "MESSAGES",
    "MessageType",
    "ProtocolError",
    "Version",
    "decode",
    "encode",
    "gpadl_messages",
]

MAX_MESSAGE_BYTES = 240
HEADER = struct.Struct("<II")
#: PFNs in a GPADL_HEADER with one range: (240 - 20 - 8) / 8.
GPADL_HEADER_MAX_PFNS = 26
#: PFNs in a GPADL_BODY: (240 - 16) / 8.
GPADL_BODY_MAX_PFNS = 28


class ProtocolError(VmbusError):
    """A channel-management message that is malformed or unknown."""


class MessageType(enum.IntEnum):
    """Channel-management message types (Linux ``enum vmbus_channel_message_type``)."""

    OFFERCHANNEL = 1
    RESCIND_CHANNELOFFER = 2
    REQUESTOFFERS = 3
    ALLOFFERS_DELIVERED = 4
    OPENCHANNEL = 5
    OPENCHANNEL_RESULT = 6
    CLOSECHANNEL = 7
    GPADL_HEADER = 8
    GPADL_BODY = 9
    GPADL_CREATED = 10
    GPADL_TEARDOWN = 11
    GPADL_TORNDOWN = 12
    RELID_RELEASED = 13
    INITIATE_CONTACT = 14
    VERSION_RESPONSE = 15
    UNLOAD = 16
    UNLOAD_RESPONSE = 17


class Version(enum.IntEnum):
    """VMBus protocol versions (major << 16 | minor) this emulation speaks."""

    WIN10 = 0x00040000  # 4.0
    WIN10_V4_1 = 0x00040001  # 4.1
    WIN10_V5 = 0x00050000  # 5.0: message connection ID 4, host-assigned msg_conn_id
    WIN10_V5_1 = 0x00050001
    WIN10_V5_2 = 0x00050002
    WIN10_V5_3 = 0x00050003  # "Iron", WS2022

    @property
    def text(self) -> str:
        return f"{self >> 16}.{self & 0xFFFF}"


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message; subclasses declare ``TYPE`` and ``_LAYOUT``."""

    TYPE: ClassVar[MessageType]
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<")

    def encode(self) -> bytes:
        values = [_to_wire(getattr(self, f.name)) for f in fields(self) if f.name != "tail"]
        return HEADER.pack(self.TYPE, 0) + self._LAYOUT.pack(*values) + self._tail()

    def _tail(self) -> bytes:
        return b""

    @classmethod
    def _decode(cls, body: bytes) -> Message:
        values = cls._LAYOUT.unpack_from(body)
        names = [f.name for f in fields(cls)]
        return cls(**{n: _from_wire(cls, n, v) for n, v in zip(names, values, strict=False)})


def _to_wire(v: Any) -> Any:
    return v.bytes_le if isinstance(v, uuid.UUID) else v


def _from_wire(cls: type, name: str, v: Any) -> Any:
    if name in getattr(cls, "_GUIDS", ()):
        return uuid.UUID(bytes_le=v)
    return v


@dataclass(frozen=True, slots=True)
class OfferChannel(Message):
    """OFFERCHANNEL (196 bytes): the host offers one channel."""

    TYPE = MessageType.OFFERCHANNEL
    _LAYOUT = struct.Struct("<16s16sQQHH120sHHIBBHI")
    _GUIDS = ("if_type", "if_instance")
    if_type: uuid.UUID
    if_instance: uuid.UUID
    reserved1: int = 0
    reserved2: int = 0
    chn_flags: int = 0
    mmio_megabytes: int = 0
    user_def: bytes = bytes(120)
    sub_channel_index: int = 0
    reserved3: int = 0
    child_relid: int = 0
    monitorid: int = 0
    monitor_allocated: int = 0
    is_dedicated_interrupt: int = 0
    connection_id: int = 0


@dataclass(frozen=True, slots=True)
class RescindChannelOffer(Message):
    TYPE = MessageType.RESCIND_CHANNELOFFER
    _LAYOUT = struct.Struct("<I")
    child_relid: int


@dataclass(frozen=True, slots=True)
class RequestOffers(Message):
    TYPE = MessageType.REQUESTOFFERS


@dataclass(frozen=True, slots=True)
class AllOffersDelivered(Message):
    TYPE = MessageType.ALLOFFERS_DELIVERED


@dataclass(frozen=True, slots=True)
class OpenChannel(Message):
    """OPENCHANNEL (148 bytes): open a relid on the ring GPADL."""

    TYPE = MessageType.OPENCHANNEL
    _LAYOUT = struct.Struct("<IIIII120s")
    child_relid: int
    openid: int
    ringbuffer_gpadlhandle: int
    target_vp: int = 0
    downstream_ringbuffer_pageoffset: int = 0
    userdata: bytes = bytes(120)


@dataclass(frozen=True, slots=True)
class OpenChannelResult(Message):
    TYPE = MessageType.OPENCHANNEL_RESULT
    _LAYOUT = struct.Struct("<III")
    child_relid: int
    openid: int
    status: int


@dataclass(frozen=True, slots=True)
class CloseChannel(Message):
    TYPE = MessageType.CLOSECHANNEL
    _LAYOUT = struct.Struct("<I")
    child_relid: int


@dataclass(frozen=True, slots=True)
class GpadlHeader(Message):
    """GPADL_HEADER: the first message of a GPADL; ``tail`` holds the raw
    gpa_range array ({byte_count u32, byte_offset u32, pfn u64 * n} ...),
    possibly continued by GPADL_BODY messages."""

    TYPE = MessageType.GPADL_HEADER
    _LAYOUT = struct.Struct("<IIHH")
    child_relid: int
    gpadl: int
    range_buflen: int
    rangecount: int
    tail: bytes = field(default=b"")

    def _tail(self) -> bytes:
        return self.tail

    @classmethod
    def _decode(cls, body: bytes) -> Message:
        relid, gpadl, buflen, count = cls._LAYOUT.unpack_from(body)
        tail = body[cls._LAYOUT.size :]
        if len(tail) % 8:
            raise ProtocolError("GPADL_HEADER range bytes are not a multiple of 8")
        return cls(relid, gpadl, buflen, count, tail)


@dataclass(frozen=True, slots=True)
class GpadlBody(Message):
    """GPADL_BODY: more page numbers of a GPADL being built."""

    TYPE = MessageType.GPADL_BODY
    _LAYOUT = struct.Struct("<II")
    msgnumber: int
    gpadl: int
    tail: bytes = field(default=b"")

    def _tail(self) -> bytes:
        return self.tail

    @property
    def pfns(self) -> tuple[int, ...]:
        return struct.unpack(f"<{len(self.tail) // 8}Q", self.tail)

    @classmethod
    def _decode(cls, body: bytes) -> Message:
        msgnumber, gpadl = cls._LAYOUT.unpack_from(body)
        tail = body[cls._LAYOUT.size :]
        if len(tail) % 8:
            raise ProtocolError("GPADL_BODY page numbers are not a multiple of 8 bytes")
        return cls(msgnumber, gpadl, tail)


@dataclass(frozen=True, slots=True)
class GpadlCreated(Message):
    TYPE = MessageType.GPADL_CREATED
    _LAYOUT = struct.Struct("<III")
    child_relid: int
    gpadl: int
    creation_status: int


@dataclass(frozen=True, slots=True)
class GpadlTeardown(Message):
    TYPE = MessageType.GPADL_TEARDOWN
    _LAYOUT = struct.Struct("<II")
    child_relid: int
    gpadl: int


@dataclass(frozen=True, slots=True)
class GpadlTorndown(Message):
    TYPE = MessageType.GPADL_TORNDOWN
    _LAYOUT = struct.Struct("<I")
    gpadl: int


@dataclass(frozen=True, slots=True)
class RelidReleased(Message):
    TYPE = MessageType.RELID_RELEASED
    _LAYOUT = struct.Struct("<I")
    child_relid: int


@dataclass(frozen=True, slots=True)
class InitiateContact(Message):
    """INITIATE_CONTACT (40 bytes).  For versions ≥ 5.0 the 8 bytes at offset
    16 are {msg_sint u8, msg_vtl u8, reserved u16, feature_flags u32}; below
    5.0 they are the interrupt page GPA (``interrupt_page``)."""

    TYPE = MessageType.INITIATE_CONTACT
    _LAYOUT = struct.Struct("<IIQQQ")
    vmbus_version_requested: int
    target_vcpu: int = 0
    interrupt_page_or_sint: int = 0
    monitor_page1: int = 0
    monitor_page2: int = 0

    @classmethod
    def v5(
        cls,
        version: int,
        msg_sint: int = 2,
        msg_vtl: int = 0,
        target_vcpu: int = 0,
        feature_flags: int = 0,
        monitor_page1: int = 0,
        monitor_page2: int = 0,
    ) -> InitiateContact:
        packed = msg_sint | msg_vtl << 8 | feature_flags << 32
        return cls(version, target_vcpu, packed, monitor_page1, monitor_page2)

    @property
    def msg_sint(self) -> int:
        return self.interrupt_page_or_sint & 0xFF

    @property
    def msg_vtl(self) -> int:
        return self.interrupt_page_or_sint >> 8 & 0xFF


@dataclass(frozen=True, slots=True)
class VersionResponse(Message):
    """VERSION_RESPONSE (16 bytes); msg_conn_id is meaningful from 5.0."""

    TYPE = MessageType.VERSION_RESPONSE
    _LAYOUT = struct.Struct("<BBHI")
    version_supported: int
    connection_state: int = 0
    padding: int = 0
    msg_conn_id: int = 0


@dataclass(frozen=True, slots=True)
class Unload(Message):
    TYPE = MessageType.UNLOAD


@dataclass(frozen=True, slots=True)
class UnloadResponse(Message):
    TYPE = MessageType.UNLOAD_RESPONSE


#: The table: message type -> message class (each knows its fixed layout).
MESSAGES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        OfferChannel,
        RescindChannelOffer,
        RequestOffers,
        AllOffersDelivered,
        OpenChannel,
        OpenChannelResult,
        CloseChannel,
        GpadlHeader,
        GpadlBody,
        GpadlCreated,
        GpadlTeardown,
        GpadlTorndown,
        RelidReleased,
        InitiateContact,
        VersionResponse,
        Unload,
        UnloadResponse,
    )
}


def fixed_size(mtype: MessageType) -> int:
    """The size of a message's fixed part, header included."""
    return HEADER.size + MESSAGES[mtype]._LAYOUT.size


def encode(msg: Message) -> bytes:
    """The wire bytes of ``msg`` (at most 240)."""
    data = msg.encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{msg.TYPE.name} of {len(data)} bytes exceeds 240")
    return data


def decode(data: bytes) -> Message:
    """Parse one message another partition wrote.

    Raises:
        ProtocolError: unknown type, too short, too long, or a bad tail.
    """
    data = bytes(data)  # a private copy: nothing below re-reads the sender's memory
    if len(data) < HEADER.size:
        raise ProtocolError(f"message of {len(data)} bytes has no header")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds 240")
    raw_type, _padding = HEADER.unpack_from(data)
    try:
        mtype = MessageType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown message type {raw_type}") from None
    cls = MESSAGES[mtype]
    need = HEADER.size + cls._LAYOUT.size
    if len(data) < need:
        raise ProtocolError(f"{mtype.name} of {len(data)} bytes is shorter than {need}")
    return cls._decode(data[HEADER.size :])


def gpadl_messages(
    child_relid: int,
    gpadl: int,
    pfns: list[int] | tuple[int, ...],
    byte_offset: int = 0,
    byte_count: int | None = None,
) -> list[Message]:
    """A one-range GPADL as GPADL_HEADER (≤ 26 PFNs) plus GPADL_BODY messages
    (≤ 28 PFNs each), the shape Linux sends (page-aligned, one range)."""
    if not pfns:
        raise ValueError("a GPADL needs at least one page")
    if byte_count is None:
        byte_count = len(pfns) * PAGE_SIZE - byte_offset
    range_buflen = 8 + 8 * len(pfns)
    first = pfns[:GPADL_HEADER_MAX_PFNS]
    head = struct.pack("<II", byte_count, byte_offset) + struct.pack(f"<{len(first)}Q", *first)
    out: list[Message] = [GpadlHeader(child_relid, gpadl, range_buflen, 1, head)]
    rest = pfns[GPADL_HEADER_MAX_PFNS:]
    for i in range(0, len(rest), GPADL_BODY_MAX_PFNS):
        chunk = rest[i : i + GPADL_BODY_MAX_PFNS]
        out.append(GpadlBody(0, gpadl, struct.pack(f"<{len(chunk)}Q", *chunk)))
    return out
