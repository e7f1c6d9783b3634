"""Hypercalls: codes, statuses, byte-exact inputs, the wire, and the router.

Layer: hv.  Four parts, all sans-IO except the two small socket helpers:

1. **Codes and layouts from the spec** (``shared/spec/vmbus-protocol.md`` §4):
   ``HypercallCode``, ``HvStatus``, the hypercall input/output values
   (``encode_control`` / ``decode_control``, ``encode_result``), and the
   byte-exact inputs of HvPostMessage (256 bytes) and HvSignalEvent (8 bytes).

2. **The wire** between a partition and the supervisor, over the Unix socket
   the supervisor made for exactly that partition: length-prefixed frames,
   each with a 16-byte header::

       off size field
         0    4 length   whole frame, header included; 16 <= length <= MAX_FRAME
         4    2 kind     FrameKind (1 hypercall, 2 reply, 3 memory; >= 0x100 runtime)
         6    1 nfds     fds that travel with this frame (SCM_RIGHTS), <= MAX_FDS
         7    1 flags    bit0 NO_REPLY_ON_SUCCESS; other bits must be 0
         8    8 seq      request number, echoed by the reply

   A HYPERCALL body is ``u64 control`` (the hypercall input value) followed by
   the input block; a REPLY body is ``u64 result`` (the hypercall output
   value) followed by the output block.  fds ride on the ``sendmsg`` that
   carries the frame's first byte (``socket.send_fds``), so the decoder hands
   them to frames in order.  ``FrameDecoder`` works on stream and seqpacket
   sockets alike and raises ``WireError`` on anything malformed; the
   supervisor then drops that partition's connection, nothing else.

3. **The router** (``HypercallRouter``): partitions, connections and
   permission checks, pure logic over SynIC objects (``hv.synic.SynicHost``
   or anything with its ``post``/``signal_event`` methods).  Permission
   failures are statuses and nothing else happens: no message delivered, no
   flag set, no grant.

4. **The partition's client** (``HypercallClient``): blocking calls with a
   timeout over the partition's socket.

Trust: every frame comes from another process.  Bytes received from a socket
are already a private copy; they are parsed once, with explicit lengths, and
nothing is trusted that was not checked here.
"""

from __future__ import annotations

import enum
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from .memory import GuestMemory

__all__ = [
    "CONNECTION_ID_MASK",
    "HV_MESSAGE_SIZE",
    "HV_MESSAGE_TYPE_VMBUS",
    "MAX_FDS",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "MAX_SHARE_PAGES",
    "PORT_BUFFER_COUNT",
    "POST_MESSAGE_INPUT_SIZE",
    "SIGNAL_EVENT_INPUT_SIZE",
    "VMBUS_EVENT_CONNECTION_ID",
    "VMBUS_MESSAGE_CONNECTION_ID",
    "VMBUS_MESSAGE_CONNECTION_ID_4",
    "VMBUS_SINT",
    "Connection",
    "ConnectionKind",
    "Control",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "FrameWriter",
    "HvStatus",
    "HypercallClient",
    "HypercallCode",
    "HypercallRouter",
    "PostMessageInput",
    "Privilege",
    "SignalEventInput",
    "SynicTarget",
    "WireError",
    "decode_control",
    "decode_frame",
    "decode_post_message",
    "decode_reply",
    "decode_reply_output",
    "decode_share_pages",
    "decode_signal_event",
    "encode_control",
    "encode_post_message",
    "encode_request",
    "encode_result",
    "encode_share_pages",
    "encode_signal_event",
    "recv_frames",
    "request_post_message",
    "request_signal_event",
    "result_status",
    "send_frame",
]

# --- constants from the spec (§4) -------------------------------------------------

HV_MESSAGE_SIZE = 256  # one SynIC message slot
MAX_PAYLOAD = 240  # HV_MESSAGE_PAYLOAD_BYTE_COUNT
PORT_BUFFER_COUNT = 16  # HV_PORT_MESSAGE_BUFFER_COUNT
SINT_COUNT = 16
FLAGS_PER_SINT = 2048
VMBUS_SINT = 2
CONNECTION_ID_MASK = 0x00FFFFFF  # 24 valid bits
VMBUS_MESSAGE_CONNECTION_ID = 1  # well-known IDs (spec §4.3)
VMBUS_MESSAGE_CONNECTION_ID_4 = 4  # INITIATE_CONTACT for versions >= 5.0 (spec §3.1)
VMBUS_EVENT_CONNECTION_ID = 2
HV_MESSAGE_TYPE_VMBUS = 1
POST_MESSAGE_INPUT_SIZE = 256
SIGNAL_EVENT_INPUT_SIZE = 8


class HypercallCode(enum.IntEnum):
    """Hypercall call codes.  Codes >= 0x8000 are Viridian extensions (no
    Hyper-V call uses them): they carry what a real hypervisor does through
    its own memory management (sharing pages with the root for GPADLs)."""

    POST_MESSAGE = 0x005C
    SIGNAL_EVENT = 0x005D
    VIRIDIAN_SHARE_PAGES = 0x8001  # in: u32 count, u32 rsvdz, u64 pfn[count]; out: u64 grant id
    VIRIDIAN_REVOKE_GRANT = 0x8002  # in: u64 grant id; out: nothing
    # root only.  in: u32 child id, u32 relid; out: u64 doorbell-pair id, and
    # two eventfds on the reply (root's, child's); the child gets the same
    # two fds in a runtime frame {"op": "doorbells", "relid", "pair"}.
    VIRIDIAN_CHANNEL_DOORBELLS = 0x8003
    # Dynamic Memory, root only (the DM VSP asks; the supervisor owns memory):
    # in: u32 child, u32 rsvdz, u64 bytes; out: u64 start pfn, u64 page count
    VIRIDIAN_MEMORY_HOT_ADD = 0x8004
    # in: u32 child, u32 count, u64 range[count] (start pfn | pages << 40); out: u64 pages
    VIRIDIAN_MEMORY_BALLOON = 0x8005
    # in: u32 child, u32 rsvdz, u64 max pages; out: u32 count, u32 rsvdz, u64 range[count]
    VIRIDIAN_MEMORY_UNBALLOON = 0x8006


class HvStatus(enum.IntEnum):
    """HV_STATUS values (TLFS; the spec's §4.2 list plus their neighbours)."""

    SUCCESS = 0x0000
    INVALID_HYPERCALL_CODE = 0x0002
    INVALID_HYPERCALL_INPUT = 0x0003
    INVALID_ALIGNMENT = 0x0004
    INVALID_PARAMETER = 0x0005
    ACCESS_DENIED = 0x0006
    INVALID_PARTITION_STATE = 0x0007
    OPERATION_DENIED = 0x0008
    INSUFFICIENT_MEMORY = 0x000B
    INVALID_PARTITION_ID = 0x000D
    INVALID_VP_INDEX = 0x000E
    NOT_FOUND = 0x0010
    INVALID_PORT_ID = 0x0011
    INVALID_CONNECTION_ID = 0x0012
    INSUFFICIENT_BUFFERS = 0x0013
    INVALID_SYNIC_STATE = 0x0018
    OBJECT_IN_USE = 0x0019


class Privilege(enum.IntFlag):
    """The bits of HV_PARTITION_PRIVILEGE_MASK the router checks."""

    POST_MESSAGES = 1 << 36
    SIGNAL_EVENTS = 1 << 37

    @classmethod
    def default(cls) -> Privilege:
        return cls.POST_MESSAGES | cls.SIGNAL_EVENTS


# --- hypercall input / output values ----------------------------------------------

# Input value (u64): call code bits 0-15, fast bit 16, variable header size
# bits 17-26, reserved 27-31, rep count 32-43, reserved 44-47, rep start index
# 48-59, reserved 60-63.  Output value: status bits 0-15, reserved 16-31, reps
# completed 32-43, reserved 44-63.
_CTRL_RESERVED = (0x1F << 27) | (0xF << 44) | (0xF << 60)


class Control(NamedTuple):
    code: int
    fast: bool
    var_header_size: int
    rep_count: int
    rep_start: int
    reserved: int  # reserved bits found set (must be 0)


def encode_control(code: int, *, fast: bool = False, rep_count: int = 0) -> int:
    """The hypercall input value for ``code`` (no variable header)."""
    if not 0 <= code <= 0xFFFF or not 0 <= rep_count <= 0xFFF:
        raise ValueError("call code or rep count out of range")
    return code | (int(fast) << 16) | (rep_count << 32)


def decode_control(value: int) -> Control:
    value &= 0xFFFFFFFFFFFFFFFF
    return Control(
        code=value & 0xFFFF,
        fast=bool(value >> 16 & 1),
        var_header_size=value >> 17 & 0x3FF,
        rep_count=value >> 32 & 0xFFF,
        rep_start=value >> 48 & 0xFFF,
        reserved=value & _CTRL_RESERVED,
    )


def encode_result(status: int, reps_completed: int = 0) -> int:
    """The hypercall output value."""
    return (int(status) & 0xFFFF) | ((reps_completed & 0xFFF) << 32)


def result_status(value: int) -> HvStatus | int:
    """The status in a hypercall output value (an int if not a known code)."""
    s = value & 0xFFFF
    try:
        return HvStatus(s)
    except ValueError:
        return s


# --- the byte-exact inputs ----------------------------------------------------

_POST = struct.Struct("<IIII240s")  # ConnectionId, RsvdZ, MessageType, PayloadSize, Message
_SIGNAL = struct.Struct("<IHH")  # ConnectionId, FlagNumber, RsvdZ
_SHARE_HDR = struct.Struct("<II")
_U64 = struct.Struct("<Q")
assert _POST.size == POST_MESSAGE_INPUT_SIZE and _SIGNAL.size == SIGNAL_EVENT_INPUT_SIZE

MAX_SHARE_PAGES = 4096  # PFNs per VIRIDIAN_SHARE_PAGES call (32 KiB of input)
MAX_MEMORY_RANGES = 510  # ranges per balloon / unballoon call (a DM message's worth)
HOT_ADD_ALIGN_BYTES = 128 << 20  # new ranges start on a 128 MiB boundary (spec §7.3)
HOST_RESERVE_BYTES = 256 << 20  # a hot-add leaves at least this much host memory available


class PostMessageInput(NamedTuple):
    connection_id: int  # the whole u32 as sent (bits above 24 must be 0)
    rsvdz: int
    message_type: int
    payload_size: int
    message: bytes  # all 240 bytes; only payload_size of them are delivered

    @property
    def payload(self) -> bytes:
        return self.message[: min(self.payload_size, MAX_PAYLOAD)]


class SignalEventInput(NamedTuple):
    connection_id: int
    flag_number: int
    rsvdz: int


def encode_post_message(connection_id: int, message_type: int, payload: bytes) -> bytes:
    """The 256-byte HvPostMessage input (Message zero-padded to 240 bytes).

    Encodes what it is given as long as it fits the fields (a rogue caller's
    bad values included: it is the router that judges them)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes > {MAX_PAYLOAD}")
    return _POST.pack(connection_id, 0, message_type, len(payload), bytes(payload))


def decode_post_message(raw: bytes) -> PostMessageInput:
    """Parse an HvPostMessage input block (exactly 256 bytes).

    Raises ValueError if the length is wrong; field values are returned as
    they are for the router to judge."""
    if len(raw) != _POST.size:
        raise ValueError(f"HvPostMessage input is {len(raw)} bytes, not {_POST.size}")
    return PostMessageInput(*_POST.unpack(raw))


def encode_signal_event(connection_id: int, flag_number: int = 0) -> bytes:
    """The 8-byte HvSignalEvent input."""
    return _SIGNAL.pack(connection_id, flag_number, 0)


def decode_signal_event(raw: bytes) -> SignalEventInput:
    if len(raw) != _SIGNAL.size:
        raise ValueError(f"HvSignalEvent input is {len(raw)} bytes, not {_SIGNAL.size}")
    return SignalEventInput(*_SIGNAL.unpack(raw))


def encode_share_pages(pfns: Sequence[int]) -> bytes:
    """The VIRIDIAN_SHARE_PAGES input: u32 count, u32 rsvdz, u64 pfn[count]."""
    return _SHARE_HDR.pack(len(pfns), 0) + struct.pack(f"<{len(pfns)}Q", *pfns)


def decode_share_pages(raw: bytes) -> list[int]:
    """Parse a VIRIDIAN_SHARE_PAGES input; ValueError if malformed."""
    if len(raw) < _SHARE_HDR.size:
        raise ValueError("share input shorter than its header")
    count, rsvd = _SHARE_HDR.unpack_from(raw)
    if rsvd:
        raise ValueError("reserved field is not zero")
    if not 1 <= count <= MAX_SHARE_PAGES:
        raise ValueError(f"page count {count} not in 1..{MAX_SHARE_PAGES}")
    if len(raw) != _SHARE_HDR.size + 8 * count:
        raise ValueError("share input length does not match its page count")
    return list(struct.unpack_from(f"<{count}Q", raw, _SHARE_HDR.size))


# --- the wire --------------------------------------------------------------------

_FRAME_HDR = struct.Struct("<IHBBQ")
FRAME_HEADER_SIZE = _FRAME_HDR.size  # 16
MAX_FRAME = 64 * 1024
MAX_FDS = 16
FLAG_NO_REPLY_ON_SUCCESS = 0x01
_KNOWN_FLAGS = FLAG_NO_REPLY_ON_SUCCESS


class FrameKind(enum.IntEnum):
    HYPERCALL = 1  # partition -> supervisor
    REPLY = 2  # supervisor -> partition
    MEMORY = 3  # supervisor -> partition: ranges, balloon, grants (hv.memory)
    # kinds >= 0x100 belong to the partition runtime (control, status, ...)


class WireError(Exception):
    """A peer sent a malformed frame.  The connection is unusable after it."""


@dataclass
class Frame:
    """One frame.  ``fds`` received with it are owned by whoever holds the
    frame (close them with ``close_fds`` if not kept); fds of a frame being
    sent stay owned by the sender (the kernel duplicates them)."""

    kind: int
    seq: int = 0
    body: bytes = b""
    fds: list[int] = field(default_factory=list)
    flags: int = 0
    #: the sender made ``fds`` for this frame alone: close them once queued
    close_after_send: bool = False

    def encode(self) -> bytes:
        n = FRAME_HEADER_SIZE + len(self.body)
        if n > MAX_FRAME:
            raise ValueError(f"frame of {n} bytes > {MAX_FRAME}")
        if len(self.fds) > MAX_FDS:
            raise ValueError(f"{len(self.fds)} fds > {MAX_FDS}")
        return _FRAME_HDR.pack(n, self.kind, len(self.fds), self.flags, self.seq) + self.body

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


class FrameDecoder:
    """Turns received bytes and fds into frames (sans-IO).

    ``feed(data, fds)`` with what one ``recvmsg`` returned; it returns the
    frames completed so far.  Raises ``WireError`` on a bad header, an
    oversized frame, unknown flag bits, or a frame that claims fds that did
    not arrive; after an error every queued fd is closed (those of frames
    the same call completed too) and the decoder refuses more input.
    Bounded: it never buffers more than one frame.
    """

    __slots__ = ("_broken", "_buf", "_fds", "max_fds", "max_frame")

    def __init__(self, *, max_frame: int = MAX_FRAME, max_fds: int = MAX_FDS) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        self._broken = False
        self.max_frame = max_frame
        self.max_fds = max_fds

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> list[Frame]:
        self._fds.extend(fds)
        if self._broken:
            self.close()
            raise WireError("decoder already failed")
        if len(self._fds) > 4 * self.max_fds:
            self._fail("too many fds queued")
        self._buf += data
        out: list[Frame] = []
        try:
            self._frames(out)
        except WireError:
            for fr in out:  # completed before the error: their fds go with them
                fr.close_fds()
            raise
        return out

    def _frames(self, out: list[Frame]) -> None:
        while len(self._buf) >= FRAME_HEADER_SIZE:
            length, kind, nfds, flags, seq = _FRAME_HDR.unpack_from(self._buf)
            if not FRAME_HEADER_SIZE <= length <= self.max_frame:
                self._fail(f"frame length {length}")
            if nfds > self.max_fds:
                self._fail(f"frame claims {nfds} fds")
            if flags & ~_KNOWN_FLAGS:
                self._fail(f"unknown frame flags {flags:#x}")
            if kind == 0:
                self._fail("frame kind 0")
            if len(self._buf) < length:
                break
            if len(self._fds) < nfds:
                self._fail(f"frame claims {nfds} fds, {len(self._fds)} arrived")
            body = bytes(self._buf[FRAME_HEADER_SIZE:length])
            del self._buf[:length]
            frame_fds = [self._fds.popleft() for _ in range(nfds)]
            out.append(Frame(kind, seq, body, frame_fds, flags))
        if not self._buf and self._fds:
            # fds that no frame claimed: a confused or rogue peer
            self._fail(f"{len(self._fds)} fds arrived with no frame claiming them")

    def _fail(self, why: str) -> None:
        self._broken = True
        self.close()
        raise WireError(why)

    def close(self) -> None:
        """Close fds received but not yet handed out in a frame."""
        while self._fds:
            fd = self._fds.popleft()
            try:
                os.close(fd)
            except OSError:
                pass


def send_frame(sock: socket.socket, frame: Frame) -> None:
    """Send one frame (and its fds) on a blocking socket (the partition side).

    The fds go with the first chunk; a short write is completed with
    ``sendall``.  The supervisor, which must never block on a partition,
    uses ``FrameWriter`` instead."""
    data = frame.encode()
    sent = socket.send_fds(sock, [data], list(frame.fds)) if frame.fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


class FrameWriter:
    """A bounded, non-blocking outgoing frame queue for one socket (sans-IO
    apart from ``flush``).

    ``push(frame)`` queues a frame (its fds are duplicated, so the caller
    keeps its own); ``flush(sock)`` writes as much as the socket takes and
    returns True when the queue is empty.  A peer that stops reading makes
    ``push`` raise ``WireError`` once more than ``limit`` bytes are waiting:
    the supervisor then drops that partition instead of blocking on it.
    """

    __slots__ = ("_queue", "limit", "pending_bytes")

    def __init__(self, limit: int = 1 << 20) -> None:
        self._queue: deque[list[Any]] = deque()  # [data memoryview, fds]
        self.limit = limit
        self.pending_bytes = 0

    def push(self, frame: Frame) -> None:
        data = frame.encode()
        if self.pending_bytes + len(data) > self.limit:
            raise WireError(f"peer is not reading: {self.pending_bytes} bytes queued")
        fds = [os.dup(fd) for fd in frame.fds]
        self._queue.append([memoryview(data), fds])
        self.pending_bytes += len(data)

    def __len__(self) -> int:
        return len(self._queue)

    def flush(self, sock: socket.socket) -> bool:
        """Write queued frames until done or the socket would block.

        Returns True when nothing is left.  Raises OSError other than
        BlockingIOError (e.g. the peer is gone)."""
        while self._queue:
            item = self._queue[0]
            data, fds = item
            try:
                if fds:
                    n = socket.send_fds(sock, [data], fds, socket.MSG_DONTWAIT)
                else:
                    n = sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            if fds:  # the kernel has its own copies now
                for fd in fds:
                    os.close(fd)
                item[1] = []
            self.pending_bytes -= n
            if n < len(data):
                item[0] = data[n:]
                return False
            self._queue.popleft()
        return True

    def close(self) -> None:
        """Drop what is queued (closing the duplicated fds)."""
        for _data, fds in self._queue:
            for fd in fds:
                os.close(fd)
        self._queue.clear()
        self.pending_bytes = 0


def recv_frames(
    sock: socket.socket, decoder: FrameDecoder, *, bufsize: int = MAX_FRAME
) -> list[Frame] | None:
    """One ``recvmsg`` (fds included) fed to ``decoder``.

    Returns the completed frames (possibly none), or None at end of stream.
    Raises BlockingIOError on a non-blocking socket with nothing to read and
    WireError on malformed input."""
    data, fds, msg_flags, _addr = socket.recv_fds(sock, bufsize, decoder.max_fds)
    if msg_flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        decoder.close()
        raise WireError("more fds than allowed in one message")
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return decoder.feed(data, fds)


def decode_frame(data: bytes, fds: Iterable[int] = ()) -> Frame:
    """Exactly one frame from one message (SOCK_SEQPACKET / datagram users).

    WireError (fds closed) if ``data`` is not exactly one well-formed frame."""
    dec = FrameDecoder()
    frames = dec.feed(data, fds)
    if len(frames) != 1 or dec._buf:
        for fr in frames:
            fr.close_fds()
        dec.close()
        raise WireError(f"expected exactly one frame, got {len(frames)} and {len(dec._buf)} bytes")
    return frames[0]


def encode_request(code: int, inp: bytes, *, seq: int = 0, reply: bool = True) -> bytes:
    """A whole HYPERCALL frame: header, control value, input block.
    ``reply=False`` asks for a reply only on failure."""
    flags = 0 if reply else FLAG_NO_REPLY_ON_SUCCESS
    body = _U64.pack(encode_control(code)) + inp
    return Frame(FrameKind.HYPERCALL, seq, body, flags=flags).encode()


def request_post_message(
    connection_id: int, message_type: int, payload: bytes, *, seq: int = 0
) -> bytes:
    """HvPostMessage as a whole HYPERCALL frame (wraps ``encode_post_message``)."""
    inp = encode_post_message(connection_id, message_type, payload)
    return encode_request(HypercallCode.POST_MESSAGE, inp, seq=seq)


def request_signal_event(connection_id: int, flag_number: int = 0, *, seq: int = 0) -> bytes:
    """HvSignalEvent as a whole HYPERCALL frame (wraps ``encode_signal_event``)."""
    return encode_request(
        HypercallCode.SIGNAL_EVENT, encode_signal_event(connection_id, flag_number), seq=seq
    )


def decode_reply_output(data: bytes) -> tuple[HvStatus | int, bytes]:
    """(status, output block) of one REPLY frame's bytes; WireError if malformed."""
    fr = decode_frame(data)
    if fr.kind != FrameKind.REPLY or len(fr.body) < 8:
        raise WireError("not a hypercall reply")
    (result,) = _U64.unpack_from(fr.body)
    return result_status(result), fr.body[8:]


def decode_reply(data: bytes) -> HvStatus | int:
    """The status of one REPLY frame's bytes; WireError if malformed."""
    return decode_reply_output(data)[0]


# --- the router ---------------------------------------------------------------


def _host_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (what the host can still give)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class ConnectionKind(enum.IntEnum):
    MESSAGE = 1
    EVENT = 2


@dataclass(frozen=True)
class Connection:
    """A connection: what a connection ID means and who may use it.

    The connection's target port is (``target``, ``sint``).  For an event
    connection, flag ``n`` (0 <= n < ``flag_count``) sets event flag
    ``flag_base + n`` of the target's SINT.  Message buffers are counted per
    (connection, sender): each sender has its own 16, as each child has its
    own port into the root in Hyper-V, so one child flooding a shared
    connection cannot make another child's messages fail.
    """

    connection_id: int
    target: int
    kind: ConnectionKind
    allowed: frozenset[int]
    sint: int = VMBUS_SINT
    flag_base: int = 0
    flag_count: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.connection_id <= CONNECTION_ID_MASK:
            raise ValueError(f"connection id {self.connection_id:#x} not in 1..0xFFFFFF")
        if not 0 <= self.sint < SINT_COUNT:
            raise ValueError(f"SINT {self.sint} not in 0..15")
        if self.kind == ConnectionKind.EVENT and not (
            self.flag_count >= 1
            and self.flag_base >= 0
            and self.flag_base + self.flag_count <= FLAGS_PER_SINT
        ):
            raise ValueError(f"event flags {self.flag_base}+{self.flag_count} exceed 2048")
        object.__setattr__(self, "allowed", frozenset(self.allowed))


class SynicTarget(Protocol):
    """What the router needs from a partition's SynIC (``hv.synic.SynicHost``)."""

    def post(
        self, sint: int, message_type: int, payload: bytes, origination_id: int, port: Any
    ) -> HvStatus: ...

    def signal_event(self, sint: int, flag: int) -> HvStatus: ...


@dataclass
class _Partition:
    partition_id: int
    synic: SynicTarget | None
    privileges: Privilege
    memory: GuestMemory | None
    denied: int = 0  # calls refused for permission (ACCESS_DENIED / INVALID_CONNECTION_ID)


class HypercallRouter:
    """Routes hypercalls between partitions (sans-IO).

    Partitions are known by a numeric ID (the root's is ``root_id``).  The
    supervisor registers each partition with its SynIC (``add_partition``),
    declares connections (``add_connection``), and calls ``handle_frame``
    for every frame a partition sends on its own socket; the caller ID is
    the socket's owner, never anything inside the frame.  Replies are
    returned; notifications for other partitions (a grant for the root) are
    queued in ``outbox`` as ``(partition_id, Frame)``.

    A partition without a SynIC (crashed, restarting) is *inactive*: posts
    and signals to it get ``INVALID_PORT_ID`` (spec: "port deleted or
    partition not active").
    """

    def __init__(self, root_id: int = 0) -> None:
        self.root_id = root_id
        self._parts: dict[int, _Partition] = {}
        self._conns: dict[int, Connection] = {}
        self._grants: dict[int, int] = {}  # grant id -> owner partition id
        self.outbox: deque[tuple[int, Frame]] = deque()
        self.calls = 0
        self.doorbell_pairs = 0
        self._reply_fds: list[int] = []
        self.host_available = _host_available  # bytes the host can still give (injectable)

    # -- configuration --

    def add_partition(
        self,
        partition_id: int,
        synic: SynicTarget | None,
        *,
        memory: GuestMemory | None = None,
        privileges: Privilege | None = None,
    ) -> None:
        if partition_id in self._parts:
            raise ValueError(f"partition {partition_id} already registered")
        self._parts[partition_id] = _Partition(
            partition_id, synic, Privilege.default() if privileges is None else privileges, memory
        )

    def set_synic(self, partition_id: int, synic: SynicTarget | None) -> None:
        """Attach a (new) SynIC, e.g. after a restart, or None while the
        partition is down (it becomes inactive)."""
        self._parts[partition_id].synic = synic

    def set_memory(self, partition_id: int, memory: GuestMemory | None) -> None:
        self._parts[partition_id].memory = memory

    def remove_partition(self, partition_id: int) -> None:
        """Forget a partition: its grants are revoked (the root is told in
        ``outbox``); connections naming it stay and answer INVALID_PORT_ID."""
        part = self._parts.pop(partition_id, None)
        if part is None:
            return
        for gid, owner in list(self._grants.items()):
            if owner == partition_id:
                self._revoke(gid, part)

    def add_connection(self, conn: Connection) -> None:
        if conn.connection_id in self._conns:
            raise ValueError(f"connection {conn.connection_id:#x} already exists")
        self._conns[conn.connection_id] = conn

    def remove_connection(self, connection_id: int) -> None:
        self._conns.pop(connection_id, None)

    def connection(self, connection_id: int) -> Connection | None:
        return self._conns.get(connection_id)

    def denied(self, partition_id: int) -> int:
        """How many of this partition's calls were refused for permission."""
        p = self._parts.get(partition_id)
        return p.denied if p else 0

    # -- the hypercalls --

    def _caller(self, caller: int, need: Privilege) -> _Partition | None:
        part = self._parts.get(caller)
        if part is None or not (part.privileges & need):
            if part is not None:
                part.denied += 1
            return None
        return part

    def _from_root(self, caller: int) -> bool:
        """Whether ``caller`` is the root; any other partition's call counts as denied."""
        part = self._parts.get(caller)
        if part is None or caller != self.root_id:
            if part is not None:
                part.denied += 1
            return False
        return True

    def _lookup(self, part: _Partition, connection_id: int) -> Connection | None:
        conn = self._conns.get(connection_id)
        if conn is None or part.partition_id not in conn.allowed:
            part.denied += 1
            return None
        return conn

    def post_message(
        self, caller: int, connection_id: int, message_type: int, payload: bytes
    ) -> HvStatus:
        """HvPostMessage from ``caller``: deliver ``payload`` to the SynIC of
        the partition behind ``connection_id``.

        ACCESS_DENIED: the caller lacks the PostMessages privilege.
        INVALID_PARAMETER: MessageType 0 or with its MSB set, payload > 240.
        INVALID_HYPERCALL_INPUT: connection ID bits above 24 set.
        INVALID_CONNECTION_ID: no such connection, or not one the caller may use.
        INVALID_PORT_ID: not a message connection, or the target is inactive.
        INSUFFICIENT_BUFFERS: the caller's 16 buffers at that port are in use.
        INVALID_SYNIC_STATE: the target's SynIC is disabled.
        """
        self.calls += 1
        part = self._caller(caller, Privilege.POST_MESSAGES)
        if part is None:
            return HvStatus.ACCESS_DENIED
        if message_type == 0 or message_type & 0x80000000 or message_type > 0xFFFFFFFF:
            return HvStatus.INVALID_PARAMETER
        if len(payload) > MAX_PAYLOAD:
            return HvStatus.INVALID_PARAMETER
        if connection_id & ~CONNECTION_ID_MASK:
            return HvStatus.INVALID_HYPERCALL_INPUT
        conn = self._lookup(part, connection_id)
        if conn is None:
            return HvStatus.INVALID_CONNECTION_ID
        if conn.kind != ConnectionKind.MESSAGE:
            return HvStatus.INVALID_PORT_ID
        target = self._parts.get(conn.target)
        if target is None or target.synic is None:
            return HvStatus.INVALID_PORT_ID
        return target.synic.post(
            conn.sint, message_type, bytes(payload), caller, (connection_id, caller)
        )

    def signal_event(self, caller: int, connection_id: int, flag_number: int = 0) -> HvStatus:
        """HvSignalEvent from ``caller``: set event flag ``flag_base +
        flag_number`` of the connection's target and wake it.

        ACCESS_DENIED: no SignalEvents privilege.  INVALID_CONNECTION_ID: no
        such connection or the caller does not belong to it.
        INVALID_PORT_ID: not an event connection or the target is inactive.
        INVALID_PARAMETER: flag number out of the connection's range.
        """
        self.calls += 1
        part = self._caller(caller, Privilege.SIGNAL_EVENTS)
        if part is None:
            return HvStatus.ACCESS_DENIED
        if connection_id & ~CONNECTION_ID_MASK:
            return HvStatus.INVALID_HYPERCALL_INPUT
        conn = self._lookup(part, connection_id)
        if conn is None:
            return HvStatus.INVALID_CONNECTION_ID
        if conn.kind != ConnectionKind.EVENT:
            return HvStatus.INVALID_PORT_ID
        if not 0 <= flag_number < conn.flag_count:
            return HvStatus.INVALID_PARAMETER
        target = self._parts.get(conn.target)
        if target is None or target.synic is None:
            return HvStatus.INVALID_PORT_ID
        return target.synic.signal_event(conn.sint, conn.flag_base + flag_number)

    def share_pages(self, caller: int, pfns: Sequence[int]) -> tuple[HvStatus, int]:
        """A child shares pages of its own memory with the root (GPADL basis).

        Only pages the caller owns are granted (``GuestMemory.share_with_root``
        checks); on success the root gets a MEMORY frame with the grant in
        ``outbox`` and the caller gets the grant id.  ACCESS_DENIED: a page is
        not the caller's (nothing is granted); INVALID_PARAMETER: the root
        asked, or the list is empty or too long; INSUFFICIENT_MEMORY: the
        caller has no memory registered or too many grants.
        """
        from .memory import GrantError  # local: memory imports this module

        self.calls += 1
        part = self._parts.get(caller)
        if part is None:
            return HvStatus.ACCESS_DENIED, 0
        if caller == self.root_id or not 1 <= len(pfns) <= MAX_SHARE_PAGES:
            return HvStatus.INVALID_PARAMETER, 0
        if part.memory is None:
            return HvStatus.INSUFFICIENT_MEMORY, 0
        if self.root_id not in self._parts:
            return HvStatus.INVALID_PARTITION_STATE, 0
        try:
            grant = part.memory.share_with_root(caller, pfns)
        except GrantError as e:
            part.denied += int(e.status == HvStatus.ACCESS_DENIED)
            return e.status, 0
        self._grants[grant.grant_id] = caller
        self.outbox.append((self.root_id, grant.frame()))
        return HvStatus.SUCCESS, grant.grant_id

    def revoke_grant(self, caller: int, grant_id: int) -> HvStatus:
        """The owner withdraws a grant; the root is told (``outbox``)."""
        self.calls += 1
        part = self._parts.get(caller)
        if part is None or self._grants.get(grant_id) != caller:
            if part is not None:
                part.denied += 1
            return HvStatus.INVALID_PARAMETER
        self._revoke(grant_id, part)
        return HvStatus.SUCCESS

    def channel_doorbells(self, caller: int, child: int, relid: int) -> tuple[HvStatus, int]:
        """The root opens channel ``relid`` of ``child``: make its two doorbells.

        Two eventfds, one each way; the root gets both on the reply and the
        child gets both in a runtime frame (``outbox``), sent before the
        reply, so it is in the child's link before the root can post
        OPENCHANNEL_RESULT.  The supervisor keeps no copy: the doorbells live
        exactly as long as the two channel ends hold them.  Only the root may
        ask, and only for a running child (else ACCESS_DENIED /
        INVALID_PARTITION_ID)."""
        from .link import runtime_frame  # local: link imports this module

        self.calls += 1
        if not self._from_root(caller):
            return HvStatus.ACCESS_DENIED, 0
        target = self._parts.get(child)
        if child == self.root_id or target is None or target.synic is None:
            return HvStatus.INVALID_PARTITION_ID, 0
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        to_root = os.eventfd(0, flags)
        try:
            to_child = os.eventfd(0, flags)
        except OSError:
            os.close(to_root)
            return HvStatus.INSUFFICIENT_MEMORY, 0
        self.doorbell_pairs += 1
        pair = self.doorbell_pairs
        fds = [to_root, to_child]
        frame = runtime_frame({"op": "doorbells", "relid": relid, "pair": pair}, fds)
        frame.close_after_send = True  # the supervisor keeps no copy
        self.outbox.append((child, frame))
        self._reply_fds = [os.dup(fd) for fd in fds]
        return HvStatus.SUCCESS, pair

    # -- Dynamic Memory (root only) --

    def _dm_target(self, caller: int, child: int) -> tuple[HvStatus, Any]:
        if not self._from_root(caller):
            return HvStatus.ACCESS_DENIED, None
        target = self._parts.get(child)
        if child == self.root_id or target is None or target.memory is None:
            return HvStatus.INVALID_PARTITION_ID, None
        return HvStatus.SUCCESS, target

    def memory_hot_add(self, caller: int, child: int, nbytes: int) -> tuple[HvStatus, int, int]:
        """Grow ``child``'s memory by a new range (GPA on a 128 MiB boundary)
        and send it the MAP frame (``outbox``) before answering.  Returns
        (status, first pfn, pages).  OPERATION_DENIED: above its maximum;
        INSUFFICIENT_MEMORY: the host cannot give that much; INVALID_PARAMETER:
        not whole pages."""
        from .memory import GuestMemoryError, MemoryLimitError

        self.calls += 1
        st, target = self._dm_target(caller, child)
        if st != HvStatus.SUCCESS:
            return st, 0, 0
        if nbytes <= 0 or nbytes % 4096:
            return HvStatus.INVALID_PARAMETER, 0, 0
        avail = self.host_available()
        if nbytes > avail - HOST_RESERVE_BYTES:
            return HvStatus.INSUFFICIENT_MEMORY, 0, 0
        try:
            msg = target.memory.hot_add(nbytes, align_bytes=HOT_ADD_ALIGN_BYTES)
        except MemoryLimitError:
            return HvStatus.OPERATION_DENIED, 0, 0
        except (GuestMemoryError, OSError):
            return HvStatus.INSUFFICIENT_MEMORY, 0, 0
        seg = msg.segments[0]
        self.outbox.append((child, msg.frame()))
        return HvStatus.SUCCESS, seg.gpa_pfn, seg.npages

    def memory_balloon(self, caller: int, child: int,
                       ranges: Sequence[tuple[int, int]]) -> tuple[HvStatus, int]:
        """Take back pages the child gave up (its DM balloon response): the
        kernel frees them and the child's view stops translating them
        (BALLOON frame in ``outbox``).  All or nothing.  OPERATION_DENIED:
        below its minimum; ACCESS_DENIED: a page not the child's, already
        ballooned or shared with the root."""
        from .memory import GuestMemoryError, MemoryLimitError

        self.calls += 1
        st, target = self._dm_target(caller, child)
        if st != HvStatus.SUCCESS:
            return st, 0
        if not ranges:
            return HvStatus.INVALID_PARAMETER, 0
        try:
            msg = target.memory.balloon(ranges)
        except MemoryLimitError:
            return HvStatus.OPERATION_DENIED, 0
        except GuestMemoryError:
            return HvStatus.ACCESS_DENIED, 0
        self.outbox.append((child, msg.frame()))
        return HvStatus.SUCCESS, sum(n for _, n in ranges)

    def memory_unballoon(self, caller: int, child: int,
                         max_pages: int) -> tuple[HvStatus, list[tuple[int, int]]]:
        """Give up to ``max_pages`` ballooned pages back to ``child`` (lowest
        first, within its maximum); UNBALLOON frame in ``outbox``.  Returns
        the ranges (empty: nothing ballooned)."""
        from .memory import GuestMemoryError

        self.calls += 1
        st, target = self._dm_target(caller, child)
        if st != HvStatus.SUCCESS:
            return st, []
        mem = target.memory
        room = max(0, (mem.maximum_bytes - mem.assigned_bytes) // 4096)
        ranges = mem.ballooned_runs(min(max_pages, room), MAX_MEMORY_RANGES)
        if not ranges:
            return HvStatus.SUCCESS, []
        try:
            msg = mem.unballoon(ranges)
        except GuestMemoryError:
            return HvStatus.OPERATION_DENIED, []
        self.outbox.append((child, msg.frame()))
        return HvStatus.SUCCESS, ranges

    def _revoke(self, grant_id: int, part: _Partition) -> None:
        self._grants.pop(grant_id, None)
        if part.memory is not None:
            frame = part.memory.revoke(grant_id)
            if frame is not None and self.root_id in self._parts:
                self.outbox.append((self.root_id, frame))

    # -- the wire --

    def call(self, caller: int, control: int, inp: bytes) -> tuple[int, bytes]:
        """One hypercall as a partition issues it: the input value and the
        input block.  Returns the output value and the output block."""
        c = decode_control(control)
        if c.reserved or c.var_header_size or c.rep_start:
            return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
        code = c.code
        if code in (HypercallCode.POST_MESSAGE, HypercallCode.SIGNAL_EVENT) and c.rep_count:
            return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
        if code == HypercallCode.POST_MESSAGE:
            try:
                pm = decode_post_message(inp)
            except ValueError:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            if pm.rsvdz or pm.connection_id & ~CONNECTION_ID_MASK:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            if pm.payload_size > MAX_PAYLOAD:
                return encode_result(HvStatus.INVALID_PARAMETER), b""
            st = self.post_message(caller, pm.connection_id, pm.message_type, pm.payload)
            return encode_result(st), b""
        if code == HypercallCode.SIGNAL_EVENT:
            try:
                se = decode_signal_event(inp)
            except ValueError:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            if se.rsvdz or se.connection_id & ~CONNECTION_ID_MASK:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            return encode_result(self.signal_event(caller, se.connection_id, se.flag_number)), b""
        if code == HypercallCode.VIRIDIAN_SHARE_PAGES:
            try:
                pfns = decode_share_pages(inp)
            except ValueError:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            st, gid = self.share_pages(caller, pfns)
            return encode_result(st), _U64.pack(gid) if st == HvStatus.SUCCESS else b""
        if code == HypercallCode.VIRIDIAN_REVOKE_GRANT:
            if len(inp) != 8:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            return encode_result(self.revoke_grant(caller, _U64.unpack(inp)[0])), b""
        if code == HypercallCode.VIRIDIAN_MEMORY_HOT_ADD:
            if len(inp) != 16:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            child, rsvd, nbytes = struct.unpack("<IIQ", inp)
            if rsvd:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            st, start, count = self.memory_hot_add(caller, child, nbytes)
            return encode_result(st), struct.pack("<QQ", start, count) if st == 0 else b""
        if code == HypercallCode.VIRIDIAN_MEMORY_BALLOON:
            if len(inp) < 8:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            child, count = struct.unpack_from("<II", inp)
            if not 1 <= count <= MAX_MEMORY_RANGES or len(inp) != 8 + 8 * count:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            words = struct.unpack_from(f"<{count}Q", inp, 8)
            ranges = [(w & (1 << 40) - 1, w >> 40) for w in words]
            st, pages = self.memory_balloon(caller, child, ranges)
            return encode_result(st), _U64.pack(pages) if st == 0 else b""
        if code == HypercallCode.VIRIDIAN_MEMORY_UNBALLOON:
            if len(inp) != 16:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            child, rsvd, max_pages = struct.unpack("<IIQ", inp)
            if rsvd:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            st, rr = self.memory_unballoon(caller, child, max_pages)
            if st:
                return encode_result(st), b""
            return encode_result(st), struct.pack("<II", len(rr), 0) + b"".join(
                _U64.pack(p | n << 40) for p, n in rr)
        if code == HypercallCode.VIRIDIAN_CHANNEL_DOORBELLS:
            if len(inp) != 8:
                return encode_result(HvStatus.INVALID_HYPERCALL_INPUT), b""
            child, relid = struct.unpack("<II", inp)
            st, pair = self.channel_doorbells(caller, child, relid)
            return encode_result(st), _U64.pack(pair) if st == HvStatus.SUCCESS else b""
        return encode_result(HvStatus.INVALID_HYPERCALL_CODE), b""

    def handle_frame(self, caller: int, frame: Frame) -> Frame | None:
        """Handle a HYPERCALL frame received on ``caller``'s socket.

        Returns the REPLY frame to send back (None when the request asked for
        no reply on success and got SUCCESS).  fds sent by a partition are
        never needed here: they are closed.  Raises WireError for a frame of
        another kind or one too short to hold a control value (the
        supervisor drops the connection)."""
        frame.close_fds()
        if frame.kind != FrameKind.HYPERCALL:
            raise WireError(f"frame kind {frame.kind} is not a hypercall")
        if len(frame.body) < 8:
            raise WireError("hypercall frame without a control value")
        (control,) = _U64.unpack_from(frame.body)
        result, out = self.call(caller, control, frame.body[8:])
        fds, self._reply_fds = self._reply_fds, []
        if frame.flags & FLAG_NO_REPLY_ON_SUCCESS and result & 0xFFFF == HvStatus.SUCCESS:
            for fd in fds:
                os.close(fd)
            return None
        return Frame(FrameKind.REPLY, frame.seq, _U64.pack(result) + out, fds,
                     close_after_send=bool(fds))

    def handle_bytes(self, caller: int, data: bytes, fds: Iterable[int] = ()) -> bytes | None:
        """``handle_frame`` for a transport that keeps message boundaries:
        one request frame's bytes in, the reply frame's bytes (or None) out.
        Raises WireError for a malformed frame (fds are closed)."""
        reply = self.handle_frame(caller, decode_frame(data, fds))
        return None if reply is None else reply.encode()

    def take_outbox(self) -> list[tuple[int, Frame]]:
        out = list(self.outbox)
        self.outbox.clear()
        return out


# --- the partition's client ---------------------------------------------------------


class HypercallClient:
    """A partition's side of the hypercall wire: blocking calls with timeouts.

    Owns the frame decoder of ``sock`` (the partition's socket to the
    supervisor).  Frames that are not the reply being waited for (memory
    notifications, runtime frames, late replies) are queued in
    ``unsolicited`` in arrival order; the partition's loop reads them with
    ``poll(timeout)``.  Not thread-safe: use it from one thread.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.decoder = FrameDecoder()
        self.unsolicited: deque[Frame] = deque()
        self._seq = 0
        self.calls = 0  # hypercalls this partition made
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._eof = False

    def _read_some(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout``); False on timeout."""
        if self._eof:
            raise ConnectionError("the supervisor closed the connection")
        if not self._poll.poll(max(0, int(timeout * 1000 + 0.999))):
            return False
        was_blocking = self.sock.getblocking()
        self.sock.setblocking(False)
        try:
            frames = recv_frames(self.sock, self.decoder)
        except BlockingIOError:
            return True
        finally:
            self.sock.setblocking(was_blocking)
        if frames is None:
            self._eof = True
            raise ConnectionError("the supervisor closed the connection")
        self.unsolicited.extend(frames)
        return True

    def call(
        self, code: int, inp: bytes, *, rep_count: int = 0, wait: bool = True
    ) -> tuple[HvStatus | int, bytes]:
        """Issue a hypercall; returns (status, output block) (see ``call_fds``)."""
        st, out, fds = self.call_fds(code, inp, rep_count=rep_count, wait=wait)
        for fd in fds:
            os.close(fd)
        return st, out

    def call_fds(
        self, code: int, inp: bytes, *, rep_count: int = 0, wait: bool = True
    ) -> tuple[HvStatus | int, bytes, list[int]]:
        """Issue a hypercall; returns (status, output block).

        With ``wait=False`` the supervisor replies only on failure (the reply
        then shows up in ``unsolicited``) and this returns (SUCCESS, b"")
        at once.  Raises TimeoutError if no reply comes within the timeout."""
        self._seq += 1
        self.calls += 1
        seq = self._seq
        body = _U64.pack(encode_control(code, rep_count=rep_count)) + inp
        flags = 0 if wait else FLAG_NO_REPLY_ON_SUCCESS
        send_frame(self.sock, Frame(FrameKind.HYPERCALL, seq, body, flags=flags))
        if not wait:
            return HvStatus.SUCCESS, b"", []
        deadline = time.monotonic() + self.timeout
        while True:
            for i, fr in enumerate(self.unsolicited):
                if fr.kind == FrameKind.REPLY and fr.seq == seq:
                    del self.unsolicited[i]
                    if len(fr.body) < 8:
                        raise WireError("reply without a result value")
                    (result,) = _U64.unpack_from(fr.body)
                    fds, fr.fds = fr.fds, []
                    return result_status(result), fr.body[8:], fds
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to hypercall {code:#x} within {self.timeout} s")
            self._read_some(left)

    def post_message(
        self, connection_id: int, message_type: int, payload: bytes, *, wait: bool = True
    ) -> HvStatus | int:
        inp = encode_post_message(connection_id, message_type, payload)
        return self.call(HypercallCode.POST_MESSAGE, inp, wait=wait)[0]

    def signal_event(
        self, connection_id: int, flag_number: int = 0, *, wait: bool = True
    ) -> HvStatus | int:
        inp = encode_signal_event(connection_id, flag_number)
        return self.call(HypercallCode.SIGNAL_EVENT, inp, wait=wait)[0]

    def share_pages(self, pfns: Sequence[int]) -> tuple[HvStatus | int, int]:
        st, out = self.call(HypercallCode.VIRIDIAN_SHARE_PAGES, encode_share_pages(pfns))
        gid = _U64.unpack(out)[0] if st == HvStatus.SUCCESS and len(out) == 8 else 0
        return st, gid

    def revoke_grant(self, grant_id: int) -> HvStatus | int:
        return self.call(HypercallCode.VIRIDIAN_REVOKE_GRANT, _U64.pack(grant_id))[0]

    def channel_doorbells(self, child: int, relid: int) -> tuple[HvStatus | int, list[int]]:
        """Root only: the two doorbell eventfds of a channel being opened
        (root's, child's); the caller owns them."""
        st, _out, fds = self.call_fds(HypercallCode.VIRIDIAN_CHANNEL_DOORBELLS,
                                      struct.pack("<II", child, relid))
        if st != HvStatus.SUCCESS or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return (st if st != HvStatus.SUCCESS else HvStatus.INVALID_PARAMETER), []
        return st, fds

    def memory_hot_add(self, child: int, nbytes: int) -> tuple[HvStatus | int, int, int]:
        """Root only: (status, first pfn, pages) of a new range for ``child``."""
        st, out = self.call(HypercallCode.VIRIDIAN_MEMORY_HOT_ADD,
                            struct.pack("<IIQ", child, 0, nbytes))
        if st != HvStatus.SUCCESS or len(out) != 16:
            return st, 0, 0
        start, count = struct.unpack("<QQ", out)
        return st, start, count

    def memory_balloon(self, child: int,
                       ranges: Sequence[tuple[int, int]]) -> tuple[HvStatus | int, int]:
        """Root only: take back ``ranges`` (pfn, pages) the child gave up."""
        inp = struct.pack("<II", child, len(ranges)) + b"".join(
            _U64.pack(p | n << 40) for p, n in ranges)
        st, out = self.call(HypercallCode.VIRIDIAN_MEMORY_BALLOON, inp)
        return st, (_U64.unpack(out)[0] if st == HvStatus.SUCCESS and len(out) == 8 else 0)

    def memory_unballoon(self, child: int,
                         max_pages: int) -> tuple[HvStatus | int, list[tuple[int, int]]]:
        """Root only: up to ``max_pages`` ballooned pages given back, as ranges."""
        st, out = self.call(HypercallCode.VIRIDIAN_MEMORY_UNBALLOON,
                            struct.pack("<IIQ", child, 0, max_pages))
        if st != HvStatus.SUCCESS or len(out) < 8:
            return st, []
        (n, _r) = struct.unpack_from("<II", out)
        words = struct.unpack_from(f"<{n}Q", out, 8) if len(out) == 8 + 8 * n else ()
        return st, [(w & (1 << 40) - 1, w >> 40) for w in words]

    def read_available(self, limit: int = 256) -> None:
        """Read every frame already waiting in the socket into ``unsolicited``
        (no waiting; at most ``limit`` reads)."""
        for _ in range(limit):
            if not self._read_some(0.0):
                return

    def poll(self, timeout: float) -> list[Frame]:
        """Frames other than awaited replies: those queued, else wait up to
        ``timeout`` for more."""
        if not self.unsolicited:
            deadline = time.monotonic() + timeout
            while not self.unsolicited:
                left = max(0.0, deadline - time.monotonic())
                # one read even when no time is left: poll(0) must not ignore
                # frames already waiting in the socket
                if not self._read_some(left) or left == 0.0:
                    break
        out = list(self.unsolicited)
        self.unsolicited.clear()
        return out

    def close(self) -> None:
        """Close fds of queued frames (the socket belongs to the caller)."""
        for fr in self.unsolicited:
            fr.close_fds()
        self.unsolicited.clear()
        self.decoder.close()

