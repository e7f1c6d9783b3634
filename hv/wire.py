"""The hypercall wire: hypercall input/output values, byte-exact inputs, frames.

Layer: hv.  Sans-IO apart from the small socket helpers (``send_frame``,
``recv_frames``, ``FrameWriter.flush``).  Both sides use it: the supervisor
(hv/router.py, hv/link.py) and every partition (hv/client.py).  The codes and
sizes it encodes are hv/abi.py's.

1. **Hypercall values and inputs** (``shared/spec/vmbus-protocol.md`` §4): the
   hypercall input/output values (``encode_control`` / ``decode_control``,
   ``encode_result``), and the byte-exact inputs of HvPostMessage (256 bytes),
   HvSignalEvent (8 bytes) and VIRIDIAN_SHARE_PAGES.

2. **Frames** between a partition and the supervisor, over the Unix socket
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

Trust: every frame comes from another process.  Bytes received from a socket
are already a private copy; they are parsed once, with explicit lengths, and
nothing is trusted that was not checked here.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .abi import (
    MAX_PAYLOAD,
    MAX_SHARE_PAGES,
    POST_MESSAGE_INPUT_SIZE,
    SIGNAL_EVENT_INPUT_SIZE,
    HvStatus,
    HypercallCode,
)

__all__ = [
    "FLAG_NO_REPLY_ON_SUCCESS",
    "FRAME_HEADER_SIZE",
    "MAX_FDS",
    "MAX_FRAME",
    "Control",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "FrameWriter",
    "PostMessageInput",
    "SignalEventInput",
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
    MEMORY = 3  # supervisor -> partition: ranges, balloon, grants (hv.memwire)
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
