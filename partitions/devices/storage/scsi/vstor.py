"""The VSTOR protocol (storvsc/storvsp): byte-exact packets, sans-IO.

Layer: partitions/devices/storage (pure Python, no I/O).  Spec §8.1; names follow
Linux ``drivers/scsi/storvsc_drv.c`` (``vstor_packet``, ``vmscsi_request``,
``vmstorage_channel_properties``, ``vmstorage_protocol_version``) and OpenVMM
``storvsp_protocol``.

Every message is one ``vstor_packet``: {operation u32, flags u32, status u32}
and a union of 52 bytes, 64 bytes in all.  Below protocol 5.1 (Win8) the
union loses the 16-byte Win8 extension of ``vmscsi_request`` and the packet is
48 bytes ("vmscsi_size_delta").  Requests from the guest are INBAND (or, for
EXECUTE_SRB with data, GPA-direct: the data buffer is the packet's page range,
which the transport maps; this module sees only the vstor_packet).  The host
answers each with a VM_PKT_COMP whose payload is a vstor_packet with operation
COMPLETE_IO; what the union then holds depends on the request it completes,
which only the sender knows (by trans_id), hence ``decode_packet(completes=)``.

Reply sizes matter: guests drop replies of the wrong size.  ``reply_size``
implements §8.1: 12 + request_size, where request_size is the guest's own
request size capped at 52 while initialising, and the negotiated
``vmscsi_request`` size (36 or 52) afterwards.

Trust: ``decode_packet`` is the entry point for bytes another partition wrote.
It copies them once, checks the length against the struct in effect, the
operation, and every field the receiver will act on (cdb_length <= 16,
sense_info_length within the 20-byte sense field, data_in 0..2), and raises
``VstorError`` otherwise.  ``length`` and the reserved fields carry nothing a
host acts on: Hyper-V and OpenVMM ignore them, so they are kept, not checked.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "CDB_MAX_BYTES",
    "REQUEST_COMPLETION_FLAG",
    "SENSE_BUFFER_BYTES",
    "SRB_STATUS_AUTOSENSE_VALID",
    "SRB_STATUS_QUEUE_FROZEN",
    "STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL",
    "VSTOR_PACKET_BYTES",
    "VSTOR_PACKET_BYTES_PRE_WIN8",
    "ChannelProperties",
    "DataIn",
    "ProtocolVersion",
    "RawSrb",
    "ScsiRequest",
    "SrbFlags",
    "SrbStatus",
    "VstorError",
    "VstorOperation",
    "VstorPacket",
    "VstorStatus",
    "VstorVersion",
    "build_begin_initialization",
    "build_completion",
    "build_create_sub_channels",
    "build_end_initialization",
    "build_enumerate_bus",
    "build_execute_srb",
    "build_properties_reply",
    "build_query_properties",
    "build_query_protocol_version",
    "build_srb_reply",
    "build_version_reply",
    "decode_packet",
    "decode_srb",
    "encode_packet",
    "packet_size",
    "reply_size",
    "sense_buffer_size",
    "vmscsi_size",
]

_HEADER = struct.Struct("<III")  # operation, flags, status
# vmscsi_request up to the Win8 extension: length u16, srb_status, scsi_status,
# port_number, path_id, target_id, lun, cdb_length, sense_info_length, data_in,
# reserved (u8 each), data_transfer_length u32, cdb[16] / sense_data[20] union
_SRB = struct.Struct("<HBBBBBBBBBBI20s")
# Win8 extension: reserve u16, queue_tag u8, queue_action u8, srb_flags,
# time_out_value, queue_sort_key (u32 each)
_SRB_WIN8 = struct.Struct("<HBBIII")
# vmstorage_channel_properties: reserved u32, max_channel_cnt u16, reserved u16,
# flags u32, max_transfer_bytes u32, reserved u64
_PROPERTIES = struct.Struct("<IHHIIQ")
# A whole vstor_packet holding a vmscsi_request, in one call (the I/O hot path):
# header + the request + the Win8 extension (64 bytes), or without it (48).
_SRB_PACKET = struct.Struct("<III" + _SRB.format[1:] + _SRB_WIN8.format[1:])
_SRB_PACKET_PRE_WIN8 = struct.Struct("<III" + _SRB.format[1:])
_NO_WIN8 = (0,) * 6
_VERSION = struct.Struct("<HH")  # major_minor, revision
_SUB_CHANNELS = struct.Struct("<H")

HEADER_BYTES = _HEADER.size  # 12
VMSCSI_REQUEST_BYTES = _SRB.size + _SRB_WIN8.size  # 52 (0x34)
VMSCSI_REQUEST_BYTES_PRE_WIN8 = _SRB.size  # 36 (0x24)
VMSCSI_SIZE_DELTA = _SRB_WIN8.size  # 16
VSTOR_PACKET_BYTES = HEADER_BYTES + VMSCSI_REQUEST_BYTES  # 64
VSTOR_PACKET_BYTES_PRE_WIN8 = VSTOR_PACKET_BYTES - VMSCSI_SIZE_DELTA  # 48
CDB_MAX_BYTES = 16
#: The union's sense_data field; the sense a guest asks for (18 below 5.1) fits in it.
SENSE_BUFFER_BYTES = 0x14
SENSE_BUFFER_BYTES_PRE_WIN8 = 0x12
_UNION_BYTES = 20

REQUEST_COMPLETION_FLAG = 0x1
STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL = 0x1
SRB_STATUS_AUTOSENSE_VALID = 0x80  # OR-ed into srb_status: sense_data holds sense
SRB_STATUS_QUEUE_FROZEN = 0x40
_SCSI_GOOD = 0x00
_SCSI_CHECK_CONDITION = 0x02


class VstorError(ValueError):
    """A VSTOR packet that is malformed."""


class VstorOperation(enum.IntEnum):
    """``enum vstor_packet_operation`` (14 is OpenVMM's; Linux never sends it)."""

    COMPLETE_IO = 1
    REMOVE_DEVICE = 2
    EXECUTE_SRB = 3
    RESET_LUN = 4
    RESET_ADAPTER = 5
    RESET_BUS = 6
    BEGIN_INITIALIZATION = 7
    END_INITIALIZATION = 8
    QUERY_PROTOCOL_VERSION = 9
    QUERY_PROPERTIES = 10
    ENUMERATE_BUS = 11
    FCHBA_DATA = 12
    CREATE_SUB_CHANNELS = 13
    EVENT_NOTIFICATION = 14


class VstorVersion(enum.IntEnum):
    """Protocol versions as (major << 8) | minor (``VMSTOR_PROTO_VERSION``)."""

    WIN6 = 0x0200  # 2.0
    WIN7 = 0x0402  # 4.2
    WIN8 = 0x0501  # 5.1: the Win8 extension, 64-byte packets, 20-byte sense
    WIN8_1 = 0x0600  # 6.0
    WIN10 = 0x0602  # 6.2


class VstorStatus(enum.IntEnum):
    """NTSTATUS values a host puts in ``status`` (OpenVMM ``NtStatus``)."""

    SUCCESS = 0x00000000
    INVALID_PARAMETER = 0xC000000D
    REVISION_MISMATCH = 0xC0000059  # QUERY_PROTOCOL_VERSION: not this version
    DEVICE_DOES_NOT_EXIST = 0xC00000C0
    INVALID_DEVICE_STATE = 0xC0000184  # a request out of the initialisation order
    IO_DEVICE_ERROR = 0xC0000185


class SrbStatus(enum.IntEnum):
    """The low 6 bits of ``srb_status`` (the top two are flags)."""

    PENDING = 0x00
    SUCCESS = 0x01
    ABORTED = 0x02
    ERROR = 0x04
    INVALID_REQUEST = 0x06
    DATA_OVERRUN = 0x12
    INVALID_LUN = 0x20
    INTERNAL_ERROR = 0x30


class SrbFlags(enum.IntFlag):
    """``srb_flags`` of the Win8 extension (a subset; Linux sets the first few)."""

    QUEUE_ACTION_ENABLE = 0x00000002
    DISABLE_DISCONNECT = 0x00000004
    DISABLE_SYNCH_TRANSFER = 0x00000008
    BYPASS_FROZEN_QUEUE = 0x00000010
    DISABLE_AUTOSENSE = 0x00000020
    DATA_IN = 0x00000040
    DATA_OUT = 0x00000080
    NO_QUEUE_FREEZE = 0x00000100
    ADAPTER_CACHE_ENABLE = 0x00000200
    FREE_SENSE_BUFFER = 0x00000400


class DataIn(enum.IntEnum):
    """``data_in``: the direction of the data buffer, seen from the guest."""

    WRITE = 0  # guest -> device
    READ = 1  # device -> guest
    UNKNOWN = 2  # no data (Linux: DMA_NONE)


def packet_size(version: int) -> int:
    """Bytes of a vstor_packet once ``version`` is negotiated: 64 from 5.1, else 48."""
    return VSTOR_PACKET_BYTES if version >= VstorVersion.WIN8 else VSTOR_PACKET_BYTES_PRE_WIN8


def vmscsi_size(version: int) -> int:
    """Bytes of a vmscsi_request at ``version``: 52 from 5.1, else 36."""
    return packet_size(version) - HEADER_BYTES


def sense_buffer_size(version: int) -> int:
    """The sense a guest asks for at ``version``: 20 bytes from 5.1, 18 below."""
    return SENSE_BUFFER_BYTES if version >= VstorVersion.WIN8 else SENSE_BUFFER_BYTES_PRE_WIN8


def reply_size(request_bytes: int, version: int | None = None) -> int:
    """Payload bytes of the host's reply to a ``request_bytes``-byte request (§8.1).

    12 + request_size: while initialising (``version`` None) request_size is
    the guest's own request size capped at 52 (older Linux sends 48-byte init
    packets, current Linux 64 and drops shorter solicited replies); after
    negotiation it is the vmscsi_request size of ``version`` (Windows guests
    want exactly 48 or 64).  Unsolicited host packets use the latter too.
    """
    if version is not None:
        return packet_size(version)
    return HEADER_BYTES + min(max(request_bytes - HEADER_BYTES, 0), VMSCSI_REQUEST_BYTES)


def _u8(name: str, v: int) -> None:
    if not 0 <= v <= 0xFF:
        raise VstorError(f"{name} {v} does not fit a u8")


@dataclass(frozen=True, slots=True)
class ScsiRequest:
    """``vmscsi_request`` (52 bytes from 5.1, 36 without the Win8 extension).

    ``payload`` is the 20-byte union: the CDB (``cdb_length`` bytes) in a
    request, the sense data (``sense_info_length`` bytes) in a completion.
    """

    length: int = VMSCSI_REQUEST_BYTES
    srb_status: int = 0
    scsi_status: int = 0
    port_number: int = 0
    path_id: int = 0
    target_id: int = 0
    lun: int = 0
    cdb_length: int = 0
    sense_info_length: int = 0
    data_in: int = DataIn.UNKNOWN
    reserved: int = 0
    data_transfer_length: int = 0
    payload: bytes = bytes(_UNION_BYTES)
    # the Win8 extension (>= 5.1); absent, so zero, in a 36-byte request
    reserve: int = 0
    queue_tag: int = 0
    queue_action: int = 0
    srb_flags: int = 0
    time_out_value: int = 0
    queue_sort_key: int = 0

    def __post_init__(self) -> None:
        # The fields a receiver acts on; decode goes through here too.
        if len(self.payload) != _UNION_BYTES:
            raise VstorError(f"the cdb/sense union is {_UNION_BYTES} bytes, not "
                             f"{len(self.payload)}")
        _check_srb_fields(self.cdb_length, self.sense_info_length, self.data_in)

    @property
    def cdb(self) -> bytes:
        return self.payload[: self.cdb_length]

    @property
    def sense(self) -> bytes:
        return self.payload[: self.sense_info_length]

    def encode(self, *, win8: bool = True) -> bytes:
        """52 bytes, or 36 without the Win8 extension (its fields are dropped)."""
        try:
            b = _SRB.pack(self.length, self.srb_status, self.scsi_status, self.port_number,
                          self.path_id, self.target_id, self.lun, self.cdb_length,
                          self.sense_info_length, self.data_in, self.reserved,
                          self.data_transfer_length, self.payload)
            if win8:
                b += _SRB_WIN8.pack(self.reserve, self.queue_tag, self.queue_action,
                                    self.srb_flags, self.time_out_value, self.queue_sort_key)
        except struct.error as e:
            raise VstorError(f"vmscsi_request: {e}") from None
        return b

    @classmethod
    def decode(cls, b: bytes, *, win8: bool = True) -> ScsiRequest:
        need = VMSCSI_REQUEST_BYTES if win8 else VMSCSI_REQUEST_BYTES_PRE_WIN8
        if len(b) < need:
            raise VstorError(f"a vmscsi_request is {need} bytes, got {len(b)}")
        ext = _SRB_WIN8.unpack_from(b, _SRB.size) if win8 else _NO_WIN8
        return cls(*_SRB.unpack_from(b), *ext)


class RawSrb(NamedTuple):
    """A ``vmscsi_request`` as ``decode_srb`` returns it on the I/O path: the
    fields of ``ScsiRequest``, in its order, validated the same way, as a
    tuple (a frozen dataclass of 19 fields costs ~10x more to make).
    ``build_srb_reply`` takes either; ``to_request()`` gives the dataclass."""

    length: int
    srb_status: int
    scsi_status: int
    port_number: int
    path_id: int
    target_id: int
    lun: int
    cdb_length: int
    sense_info_length: int
    data_in: int
    reserved: int
    data_transfer_length: int
    payload: bytes
    reserve: int = 0
    queue_tag: int = 0
    queue_action: int = 0
    srb_flags: int = 0
    time_out_value: int = 0
    queue_sort_key: int = 0

    @property
    def cdb(self) -> bytes:
        return self.payload[: self.cdb_length]

    @property
    def sense(self) -> bytes:
        return self.payload[: self.sense_info_length]

    def to_request(self) -> ScsiRequest:
        return ScsiRequest(*self)


@dataclass(frozen=True, slots=True)
class ChannelProperties:
    """``vmstorage_channel_properties`` (24 bytes), the QUERY_PROPERTIES reply.

    ``max_sub_channels`` counts subchannels, the primary not included;
    ``max_transfer_bytes`` must be a non-zero multiple of 4096 (Linux derives
    max_sectors and sg_tablesize from it).
    """

    max_sub_channels: int = 0
    flags: int = 0
    max_transfer_bytes: int = 0x40000  # OpenVMM's 256 KiB

    def encode(self) -> bytes:
        try:
            return _PROPERTIES.pack(0, self.max_sub_channels, 0, self.flags,
                                    self.max_transfer_bytes, 0)
        except struct.error as e:
            raise VstorError(f"channel properties: {e}") from None

    @classmethod
    def decode(cls, b: bytes) -> ChannelProperties:
        _r0, count, _r1, flags, max_bytes, _r2 = _PROPERTIES.unpack_from(b)
        return cls(count, flags, max_bytes)


@dataclass(frozen=True, slots=True)
class ProtocolVersion:
    """``vmstorage_protocol_version``: major_minor u16, revision u16 (0 from Linux)."""

    major_minor: int
    revision: int = 0

    def encode(self) -> bytes:
        try:
            return _VERSION.pack(self.major_minor, self.revision)
        except struct.error as e:
            raise VstorError(f"protocol version: {e}") from None

    @classmethod
    def decode(cls, b: bytes) -> ProtocolVersion:
        return cls(*_VERSION.unpack_from(b))


#: What the 52-byte union holds: an SRB, a version, channel properties,
#: a sub_channel_count (int), or nothing the receiver reads.
Body = ScsiRequest | ProtocolVersion | ChannelProperties | int | None


@dataclass(frozen=True, slots=True)
class VstorPacket:
    """One ``vstor_packet``; ``status`` is an NTSTATUS (0 = success)."""

    operation: VstorOperation
    flags: int = 0
    status: int = 0
    body: Body = None


def _encode_body(body: Body, *, win8: bool) -> bytes:
    if body is None:
        return b""
    if isinstance(body, ScsiRequest):
        return body.encode(win8=win8)
    if isinstance(body, int):
        try:
            return _SUB_CHANNELS.pack(body)
        except struct.error as e:
            raise VstorError(f"sub_channel_count: {e}") from None
    return body.encode()


def encode_packet(packet: VstorPacket, *, size: int) -> bytes:
    """``packet`` as exactly ``size`` bytes: zero-padded, or truncated the way
    OpenVMM does for a reply to a short init request.  An SRB is encoded with
    the Win8 extension when ``size`` has room for it (64)."""
    if size < HEADER_BYTES:
        raise ValueError(f"a vstor_packet is at least {HEADER_BYTES} bytes, not {size}")
    try:
        head = _HEADER.pack(packet.operation, packet.flags, packet.status)
    except struct.error as e:
        raise VstorError(f"vstor_packet header: {e}") from None
    b = head + _encode_body(packet.body, win8=size >= VSTOR_PACKET_BYTES)
    return b[:size].ljust(size, b"\0")


def _srb(union: bytes, win8: bool) -> Body:
    return ScsiRequest.decode(union, win8=win8)


def _version(union: bytes, win8: bool) -> Body:
    return ProtocolVersion.decode(union)


def _properties(union: bytes, win8: bool) -> Body:
    return ChannelProperties.decode(union)


def _sub_channels(union: bytes, win8: bool) -> Body:
    return int(_SUB_CHANNELS.unpack_from(union)[0])


# What the union holds in each request, and (keyed by the request's operation)
# in the COMPLETE_IO that answers it; operations not listed carry nothing the
# receiver reads (FCHBA_DATA's WWNs included: there is no Fibre Channel here).
_REQUEST_BODY: dict[VstorOperation, Callable[[bytes, bool], Body]] = {
    VstorOperation.EXECUTE_SRB: _srb,
    VstorOperation.QUERY_PROTOCOL_VERSION: _version,
    VstorOperation.CREATE_SUB_CHANNELS: _sub_channels,
}
_REPLY_BODY: dict[VstorOperation, Callable[[bytes, bool], Body]] = {
    VstorOperation.EXECUTE_SRB: _srb,
    VstorOperation.QUERY_PROTOCOL_VERSION: _version,
    VstorOperation.QUERY_PROPERTIES: _properties,
}


def decode_packet(data: bytes | bytearray | memoryview, *, size: int,
                  completes: VstorOperation | None = None) -> VstorPacket:
    """The vstor_packet another partition wrote.

    Args:
        data: the packet payload (after the VMBus descriptor).
        size: the vstor_packet size in effect, 48 or 64: ``packet_size`` of the
            negotiated version, 48 (pre-Win8) before negotiation on the host.
            Shorter data is refused; longer data (a 64-byte init packet before
            negotiation) is read up to what ``size`` defines.
        completes: for a COMPLETE_IO, the operation of the request it answers
            (the sender knows it from trans_id); it says what the union holds.

    Raises:
        VstorError: shorter than ``size``, an unknown operation, or a field
            out of range (see the module docstring).
    """
    if size not in (VSTOR_PACKET_BYTES, VSTOR_PACKET_BYTES_PRE_WIN8):
        raise ValueError(f"size is {VSTOR_PACKET_BYTES} or {VSTOR_PACKET_BYTES_PRE_WIN8}")
    data = bytes(data[:size])  # one private copy: nothing below re-reads shared memory
    if len(data) < size:
        raise VstorError(f"a {len(data)}-byte vstor_packet (expected {size})")
    raw_op, flags, status = _HEADER.unpack_from(data)
    try:
        op = VstorOperation(raw_op)
    except ValueError:
        raise VstorError(f"unknown VSTOR operation {raw_op}") from None
    if op == VstorOperation.COMPLETE_IO:
        decode_body = _REPLY_BODY.get(completes) if completes is not None else None
    else:
        decode_body = _REQUEST_BODY.get(op)
    body = decode_body(data[HEADER_BYTES:], size == VSTOR_PACKET_BYTES) if decode_body else None
    return VstorPacket(op, flags, status, body)


_DATA_IN_VALUES = frozenset((DataIn.WRITE, DataIn.READ, DataIn.UNKNOWN))


def _check_srb_fields(cdb_length: int, sense_info_length: int, data_in: int) -> None:
    """The vmscsi_request fields a receiver acts on (ScsiRequest and decode_srb)."""
    if not 0 <= cdb_length <= CDB_MAX_BYTES:
        raise VstorError(f"cdb_length {cdb_length} > {CDB_MAX_BYTES}")
    if not 0 <= sense_info_length <= SENSE_BUFFER_BYTES:
        raise VstorError(f"sense_info_length {sense_info_length} > {SENSE_BUFFER_BYTES}")
    if data_in not in _DATA_IN_VALUES:
        raise VstorError(f"data_in {data_in} (0 write, 1 read, 2 none)")


def decode_srb(data: bytes | bytearray | memoryview, *, size: int,
               completion: bool = False) -> tuple[int, RawSrb] | None:
    """``decode_packet`` for the I/O path: (status, SRB) of an EXECUTE_SRB
    (``completion``: of the COMPLETE_IO answering one), in one unpack.

    Returns None when the packet holds another operation: the caller then
    uses ``decode_packet``.  Reads ``data`` once (the fields are copied out
    by the unpack) and refuses what ``decode_packet`` refuses: fewer than
    ``size`` bytes, cdb_length > 16, sense_info_length > 20, data_in > 2
    (``VstorError``); ``size`` other than 48 or 64 is a ValueError.
    """
    if size == VSTOR_PACKET_BYTES:
        if len(data) < VSTOR_PACKET_BYTES:
            raise VstorError(f"a {len(data)}-byte vstor_packet (expected {size})")
        f = _SRB_PACKET.unpack_from(data)
    elif size == VSTOR_PACKET_BYTES_PRE_WIN8:
        if len(data) < VSTOR_PACKET_BYTES_PRE_WIN8:
            raise VstorError(f"a {len(data)}-byte vstor_packet (expected {size})")
        f = _SRB_PACKET_PRE_WIN8.unpack_from(data) + _NO_WIN8
    else:
        raise ValueError(f"size is {VSTOR_PACKET_BYTES} or {VSTOR_PACKET_BYTES_PRE_WIN8}")
    if f[0] != (VstorOperation.COMPLETE_IO if completion else VstorOperation.EXECUTE_SRB):
        return None
    srb = RawSrb._make(f[3:])
    _check_srb_fields(srb.cdb_length, srb.sense_info_length, srb.data_in)
    return f[2], srb


# --- guest side (storvsc): the requests, as current Linux builds them ---


def _request(op: VstorOperation, body: Body = None, *, size: int) -> bytes:
    return encode_packet(VstorPacket(op, REQUEST_COMPLETION_FLAG, 0, body), size=size)


def build_begin_initialization(*, size: int = VSTOR_PACKET_BYTES) -> bytes:
    return _request(VstorOperation.BEGIN_INITIALIZATION, size=size)


def build_query_protocol_version(version: int, *, size: int = VSTOR_PACKET_BYTES) -> bytes:
    """Offer ``version`` (Linux offers 6.2, then 6.0, then 5.1, revision 0)."""
    return _request(VstorOperation.QUERY_PROTOCOL_VERSION, ProtocolVersion(version), size=size)


def build_query_properties(*, size: int = VSTOR_PACKET_BYTES) -> bytes:
    return _request(VstorOperation.QUERY_PROPERTIES, size=size)


def build_end_initialization(*, size: int = VSTOR_PACKET_BYTES) -> bytes:
    return _request(VstorOperation.END_INITIALIZATION, size=size)


def build_create_sub_channels(count: int, *, size: int = VSTOR_PACKET_BYTES) -> bytes:
    return _request(VstorOperation.CREATE_SUB_CHANNELS, count, size=size)


def build_execute_srb(cdb: bytes, *, data_in: DataIn, data_transfer_length: int, version: int,
                      lun: int = 0, target_id: int = 0, path_id: int = 0,
                      port_number: int = 0) -> bytes:
    """EXECUTE_SRB for ``cdb``; with data, the transport sends it GPA-direct
    with the buffer as the packet's range (``data_transfer_length`` bytes).

    Fields as Linux sets them: length = the vmscsi_request size at
    ``version``, sense_info_length = the sense the guest takes at ``version``,
    srb_flags = the direction, time_out_value = 60 s.
    """
    if len(cdb) > CDB_MAX_BYTES:
        raise VstorError(f"a {len(cdb)}-byte CDB (at most {CDB_MAX_BYTES})")
    if lun or target_id or path_id or port_number:
        for name, v in (("lun", lun), ("target_id", target_id), ("path_id", path_id),
                        ("port_number", port_number)):
            _u8(name, v)
    flags = _DIRECTION_FLAGS.get(data_in)
    if flags is None:
        raise VstorError(f"data_in {data_in} (0 write, 1 read, 2 none)")
    # One pack of the whole packet: the bytes encode_packet(VstorPacket(
    # EXECUTE_SRB, REQUEST_COMPLETION_FLAG, 0, ScsiRequest(...))) gives.
    try:
        if version >= VstorVersion.WIN8:
            return _SRB_PACKET.pack(
                VstorOperation.EXECUTE_SRB, REQUEST_COMPLETION_FLAG, 0, VMSCSI_REQUEST_BYTES,
                0, 0, port_number, path_id, target_id, lun, len(cdb), SENSE_BUFFER_BYTES,
                data_in, 0, data_transfer_length, bytes(cdb), 0, 0, 0, flags, 60, 0)
        return _SRB_PACKET_PRE_WIN8.pack(
            VstorOperation.EXECUTE_SRB, REQUEST_COMPLETION_FLAG, 0,
            VMSCSI_REQUEST_BYTES_PRE_WIN8, 0, 0, port_number, path_id, target_id, lun,
            len(cdb), SENSE_BUFFER_BYTES_PRE_WIN8, data_in, 0, data_transfer_length, bytes(cdb))
    except struct.error as e:
        raise VstorError(f"vmscsi_request: {e}") from None


_DIRECTION_FLAGS = {DataIn.READ: int(SrbFlags.DATA_IN), DataIn.WRITE: int(SrbFlags.DATA_OUT),
                    DataIn.UNKNOWN: 0}


# --- host side (storvsp): replies, sized by ``reply_size`` ---


def build_completion(*, size: int, status: int = VstorStatus.SUCCESS, body: Body = None) -> bytes:
    """COMPLETE_IO with ``status`` and ``body``, exactly ``size`` bytes (flags 0)."""
    return encode_packet(VstorPacket(VstorOperation.COMPLETE_IO, 0, status, body), size=size)


def build_version_reply(major_minor: int, *, accepted: bool, size: int) -> bytes:
    """QUERY_PROTOCOL_VERSION's completion: the version echoed (revision 0);
    a refusal is REVISION_MISMATCH, after which the guest offers an older one."""
    status = VstorStatus.SUCCESS if accepted else VstorStatus.REVISION_MISMATCH
    return build_completion(size=size, status=status, body=ProtocolVersion(major_minor))


def build_properties_reply(properties: ChannelProperties, *, size: int) -> bytes:
    return build_completion(size=size, body=properties)


def build_srb_reply(request: ScsiRequest | RawSrb, *, version: int, scsi_status: int,
                    data_transfer_length: int, sense: bytes = b"",
                    srb_status: int | None = None) -> bytes:
    """EXECUTE_SRB's completion, ``packet_size(version)`` bytes.

    ``srb_status`` defaults to SUCCESS for GOOD and ERROR otherwise.  Sense
    goes back only with CHECK CONDITION, cut to the guest's
    ``sense_info_length``, with AUTOSENSE_VALID: Linux copies sense only then,
    and without it takes the device offline.  The vstor status is 0 for
    SUCCESS and an NTSTATUS otherwise (as OpenVMM maps them).  The address
    (port, path, target, lun) and data_in are echoed from ``request``.
    """
    if srb_status is None:
        srb_status = SrbStatus.SUCCESS if scsi_status == _SCSI_GOOD else SrbStatus.ERROR
    if scsi_status != _SCSI_CHECK_CONDITION:
        sense = b""
    sense = bytes(sense[: request.sense_info_length])
    if sense:
        srb_status |= SRB_STATUS_AUTOSENSE_VALID
    code = srb_status & 0x3F
    status = (VstorStatus.SUCCESS if code == SrbStatus.SUCCESS
              else VstorStatus.DEVICE_DOES_NOT_EXIST if code == SrbStatus.INVALID_LUN
              else VstorStatus.IO_DEVICE_ERROR)
    # One pack of the whole packet: the bytes build_completion(body=ScsiRequest(
    # ...)) gives (the Win8 extension zero, reserved zero).
    try:
        if version >= VstorVersion.WIN8:
            return _SRB_PACKET.pack(
                VstorOperation.COMPLETE_IO, 0, status, VMSCSI_REQUEST_BYTES, srb_status,
                scsi_status, request.port_number, request.path_id, request.target_id,
                request.lun, request.cdb_length, len(sense), request.data_in, 0,
                data_transfer_length, sense, 0, 0, 0, 0, 0, 0)
        return _SRB_PACKET_PRE_WIN8.pack(
            VstorOperation.COMPLETE_IO, 0, status, VMSCSI_REQUEST_BYTES_PRE_WIN8, srb_status,
            scsi_status, request.port_number, request.path_id, request.target_id, request.lun,
            request.cdb_length, len(sense), request.data_in, 0, data_transfer_length, sense)
    except struct.error as e:
        raise VstorError(f"vmscsi_request: {e}") from None


def build_enumerate_bus(*, version: int) -> bytes:
    """Unsolicited rescan (trans_id 0, no completion requested); OpenVMM sends
    it only from 4.2 on."""
    return encode_packet(VstorPacket(VstorOperation.ENUMERATE_BUS), size=packet_size(version))
