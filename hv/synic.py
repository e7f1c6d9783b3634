"""The SynIC of one partition: message slots, event flags, interrupt, EOM.

Layer: hv.  Faithful to Hyper-V's synthetic interrupt controller (spec §4):
the supervisor creates, per partition, one memfd of two pages that both sides
map, and two eventfds:

    page 0  SIMP  the message page: 16 SINT slots x 256 bytes (HV_MESSAGE)
    page 1  SIEFP the event-flags page: 16 SINT slots x 256 bytes (2048 flags)
    interrupt eventfd  supervisor -> partition ("look at your SynIC")
    EOM eventfd        partition -> supervisor (the end-of-message register)

HV_MESSAGE (256 bytes, little endian): MessageType u32 @0, PayloadSize u8 @4,
MessageFlags u8 @5 (bit0 MessagePending), reserved u16 @6, OriginationId
u64 @8, Payload[240] @16.  Viridian puts the sender's partition ID in
OriginationId (the supervisor writes it; a partition cannot forge it).

**Message slot protocol** (one message per SINT slot, as in Hyper-V):

* The supervisor (``SynicHost``) keeps the queue of each SINT.  It writes a
  slot only when it reads MessageType == 0 (the slot is free): payload,
  OriginationId and the size/flags word first, then MessageType last, each
  as whole aligned stores (never byte-wise).  It sets MessagePending in that
  first write when more messages are queued.
* The partition (``SynicGuest``) copies the 256 bytes out, then clears
  MessageType with an atomic op (a full barrier), then reads MessageFlags
  again: if MessagePending is set it signals EOM.
* When a message is queued while the slot is occupied, the supervisor sets
  MessagePending with an atomic OR (a full barrier) and then reads
  MessageType again; if the partition freed the slot meanwhile it delivers
  at once.  This is a Dekker handshake: with full barriers on both sides at
  least one of them sees the other's write, so a queued message is never
  stranded (``hv._atomic``).
* One writer per field: only the supervisor writes MessageType != 0, the
  size/flags word and the payload; only the partition writes MessageType = 0.

**Buffers.**  Every port has 16 message buffers (HV_PORT_MESSAGE_BUFFER_COUNT):
a message holds its buffer from ``post`` until the supervisor sees its slot
free again.  The 17th message to a port whose 16 are all in use gets
HV_STATUS_INSUFFICIENT_BUFFERS, as Hyper-V does.  The router passes a port
key per (connection, sender).

**Event flags.**  Flag n of a SINT is bit n % 8 of byte n / 8 of its slot
(TLFS).  The supervisor sets it with an atomic OR and then signals the
interrupt; the partition test-and-clears by reading the slot and atomically
clearing exactly the bits it saw (bits set meanwhile survive), so no signal
is ever lost and none is reported twice.

**Trust.**  The partition can write anything into its two pages at any time.
The supervisor reads only MessageType (to know whether the slot is free), so
garbage there can only stall the partition's own queue: senders then get
INSUFFICIENT_BUFFERS.  The memfd is sealed against shrinking and growing, so
no partition can make the supervisor's mapping fault.  The partition copies
a message out before parsing it and drops one with a bad size.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections import Counter, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import NamedTuple

from ._atomic import SharedWords
from .abi import (
    FLAGS_PER_SINT,
    HV_MESSAGE_SIZE,
    MAX_PAYLOAD,
    PAGE_SIZE,
    PORT_BUFFER_COUNT,
    SINT_COUNT,
    VMBUS_SINT,
    HvStatus,
)
from .eventfd import EventFd

__all__ = [
    "EVENT_PAGE_OFFSET",
    "MESSAGE_PENDING",
    "SYNIC_BYTES",
    "SynicError",
    "SynicGuest",
    "SynicHandles",
    "SynicHost",
    "SynicMessage",
    "decode_hv_message",
    "encode_hv_message",
    "sealed_memfd",
]

EVENT_PAGE_OFFSET = PAGE_SIZE
SYNIC_BYTES = 2 * PAGE_SIZE
MESSAGE_PENDING = 0x01  # MessageFlags bit0
_PENDING_IN_WORD = MESSAGE_PENDING << 8  # the flags byte is byte 1 of the u32 at +4
_HDR = struct.Struct("<IBBHQ")  # MessageType, PayloadSize, MessageFlags, reserved, OriginationId
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SynicError(Exception):
    """Bad SynIC handles or a malformed message (partition side)."""


class SynicMessage(NamedTuple):
    """A message copied out of a SynIC slot (validated)."""

    sint: int
    message_type: int
    payload: bytes  # exactly PayloadSize bytes
    flags: int
    origination_id: int

    @property
    def pending(self) -> bool:
        return bool(self.flags & MESSAGE_PENDING)


def encode_hv_message(
    message_type: int, payload: bytes, *, flags: int = 0, origination_id: int = 0
) -> bytes:
    """A 256-byte HV_MESSAGE (payload zero-padded to 240 bytes)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes > {MAX_PAYLOAD}")
    return _HDR.pack(message_type, len(payload), flags, 0, origination_id) + bytes(
        payload
    ).ljust(MAX_PAYLOAD, b"\0")


def decode_hv_message(raw: bytes, sint: int = VMBUS_SINT) -> SynicMessage:
    """Parse a private copy of an HV_MESSAGE; SynicError if malformed."""
    if len(raw) != HV_MESSAGE_SIZE:
        raise SynicError(f"HV_MESSAGE is {len(raw)} bytes, not 256")
    mtype, size, flags, _rsvd, origin = _HDR.unpack_from(raw)
    if mtype == 0:
        raise SynicError("empty slot (MessageType 0)")
    if size > MAX_PAYLOAD:
        raise SynicError(f"PayloadSize {size} > {MAX_PAYLOAD}")
    return SynicMessage(sint, mtype, bytes(raw[16 : 16 + size]), flags, origin)


class SynicHandles(NamedTuple):
    """The fds a partition needs for its SynIC (send them over its socket,
    in this order)."""

    page_fd: int
    interrupt_fd: int
    eom_fd: int


@dataclass
class _Queued:
    message_type: int
    payload: bytes
    origination_id: int
    port: Hashable


def sealed_memfd(nbytes: int, name: str) -> int:
    """A memfd of ``nbytes`` that nobody can shrink or grow: a partition holding
    it cannot truncate it under the supervisor's mapping (SIGBUS)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SynicHost:
    """The supervisor's side of one partition's SynIC.

    Create one per partition process; send ``handles()`` to the partition
    (``SynicGuest``); watch ``eom_fileno()`` in the supervisor's selector and
    call ``service()`` when it is readable.  ``post`` and ``signal_event``
    are what the router calls.  ``close()`` when the partition is gone:
    nothing of it outlives the two processes (memfd, eventfds).
    """

    def __init__(
        self, partition_id: int = 0, *, label: str = "", atomics: str | None = None
    ) -> None:
        self.partition_id = partition_id
        self._fd = sealed_memfd(SYNIC_BYTES, f"viridian-synic-{label or partition_id}")
        try:
            self._map = mmap.mmap(self._fd, SYNIC_BYTES, mmap.MAP_SHARED)
            self._words = SharedWords(self._map, atomics)
            self.interrupt = EventFd()
            self.eom = EventFd()
        except BaseException:
            os.close(self._fd)
            raise
        self.enabled = True
        self._queues: list[deque[_Queued]] = [deque() for _ in range(SINT_COUNT)]
        # the message each slot holds until the partition frees it (not its port:
        # a port may be None, the default)
        self._in_slot: list[_Queued | None] = [None] * SINT_COUNT
        self._pending_set = [False] * SINT_COUNT
        self._buffers: Counter[Hashable] = Counter()
        # statistics
        self.posted = 0
        self.delivered = 0
        self.rejected_full = 0
        self.events = 0
        self.eoms = 0

    # -- handles --

    def handles(self) -> SynicHandles:
        """The fds to pass to the partition (the host keeps its own)."""
        return SynicHandles(self._fd, self.interrupt.fileno(), self.eom.fileno())

    def eom_fileno(self) -> int:
        return self.eom.fileno()

    # -- messages --

    def post(
        self,
        sint: int,
        message_type: int,
        payload: bytes,
        origination_id: int = 0,
        port: Hashable = None,
    ) -> HvStatus:
        """Queue a message for ``sint`` and deliver it if the slot is free.

        The router has validated the caller; this checks the SynIC state and
        the port's 16 buffers."""
        if not self.enabled or self._map is None:
            return HvStatus.INVALID_SYNIC_STATE
        if not 0 <= sint < SINT_COUNT or len(payload) > MAX_PAYLOAD:
            return HvStatus.INVALID_PARAMETER
        self._pump(sint)  # a slot consumed without EOM frees its buffer now
        if self._buffers[port] >= PORT_BUFFER_COUNT:
            self.rejected_full += 1
            return HvStatus.INSUFFICIENT_BUFFERS
        self._buffers[port] += 1
        self._queues[sint].append(_Queued(message_type, bytes(payload), origination_id, port))
        self.posted += 1
        self._pump(sint)
        return HvStatus.SUCCESS

    def _release(self, port: Hashable) -> None:
        n = self._buffers[port] - 1
        if n > 0:
            self._buffers[port] = n
        else:
            del self._buffers[port]

    def _pump(self, sint: int) -> None:
        """Move the head of ``sint``'s queue into its slot if the slot is free."""
        base = sint * HV_MESSAGE_SIZE
        words = self._words
        queue = self._queues[sint]
        while True:
            if words.load(base) != 0:  # occupied (or garbage the partition wrote)
                if queue and not self._pending_set[sint]:
                    words.set_bits(base + 4, _PENDING_IN_WORD)  # full barrier
                    self._pending_set[sint] = True
                    continue  # read MessageType again: freed meanwhile?
                return
            held = self._in_slot[sint]
            if held is not None:  # the partition consumed it
                self._release(held.port)
                self._in_slot[sint] = None
                self.delivered += 1
            if not queue:
                return
            msg = queue.popleft()
            more = bool(queue)
            n = len(msg.payload)
            m = self._map
            m[base + 8 : base + 16] = msg.origination_id.to_bytes(8, "little")
            m[base + 16 : base + 16 + n] = msg.payload
            if n < MAX_PAYLOAD:
                m[base + 16 + n : base + HV_MESSAGE_SIZE] = bytes(MAX_PAYLOAD - n)
            words.store(base + 4, n | (_PENDING_IN_WORD if more else 0))
            words.store(base, msg.message_type)  # publish
            self._in_slot[sint] = msg
            self._pending_set[sint] = more
            self.interrupt.signal()
            return

    def service(self) -> int:
        """Handle an EOM: drain the EOM eventfd and refill freed slots.
        Returns how many messages were moved into slots."""
        if self.eom.clear():
            self.eoms += 1
        moved = 0
        for sint in range(SINT_COUNT):
            if self._queues[sint] or self._in_slot[sint] is not None:
                before = len(self._queues[sint])
                self._pump(sint)
                moved += before - len(self._queues[sint])
        return moved

    def queued(self, sint: int = VMBUS_SINT) -> int:
        """Messages waiting behind the slot of ``sint``."""
        return len(self._queues[sint])

    def buffers_in_use(self, port: Hashable) -> int:
        """Buffers of ``port`` in use (queued or in a slot not yet freed)."""
        for sint in range(SINT_COUNT):
            if self._in_slot[sint] is not None:
                self._pump(sint)
        return self._buffers[port]

    # -- events --

    def signal_event(self, sint: int, flag: int) -> HvStatus:
        """Set event flag ``flag`` of ``sint`` and raise the interrupt."""
        if not self.enabled or self._map is None:
            return HvStatus.INVALID_SYNIC_STATE
        if not 0 <= sint < SINT_COUNT or not 0 <= flag < FLAGS_PER_SINT:
            return HvStatus.INVALID_PARAMETER
        off = EVENT_PAGE_OFFSET + sint * 256 + (flag >> 5) * 4
        self._words.set_bits(off, 1 << (flag & 31))
        self.events += 1
        self.interrupt.signal()
        return HvStatus.SUCCESS

    def event_flags(self, sint: int = VMBUS_SINT) -> set[int]:
        """The flags currently set (a snapshot; for tests and status)."""
        base = EVENT_PAGE_OFFSET + sint * 256
        return _flags_of(self._map[base : base + 256])

    # -- lifetime --

    def drop_queued(self) -> int:
        """Discard queued messages (the partition stopped); returns how many."""
        n = 0
        for sint, q in enumerate(self._queues):
            n += len(q)
            for msg in q:
                self._release(msg.port)
            q.clear()
            held = self._in_slot[sint]
            if held is not None:
                self._release(held.port)
                self._in_slot[sint] = None
        return n

    def close(self) -> None:
        if self._map is None:
            return
        self.enabled = False
        self.drop_queued()
        self._words.close()
        self._map.close()
        self._map = None  # type: ignore[assignment]
        os.close(self._fd)
        self._fd = -1
        self.interrupt.close()
        self.eom.close()

    def __enter__(self) -> SynicHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flags_of(raw: bytes) -> set[int]:
    v = int.from_bytes(raw, "little")
    out = set()
    while v:
        low = v & -v
        out.add(low.bit_length() - 1)
        v ^= low
    return out


class SynicGuest:
    """The partition's side of its SynIC.

    Adopts the three fds (``SynicHandles`` order) and closes them on
    ``close()``.  Wait on ``fileno()`` (or ``wait``), then drain with
    ``read_message`` and ``take_events``.  ``atomics`` picks the
    ``hv._atomic`` backend (for tests; both have full barriers, so the two
    sides of one SynIC may even differ).
    """

    def __init__(
        self, page_fd: int, interrupt_fd: int, eom_fd: int, *, atomics: str | None = None
    ) -> None:
        try:
            st = os.fstat(page_fd)
            if st.st_size < SYNIC_BYTES:
                raise SynicError(f"SynIC memfd is {st.st_size} bytes, need {SYNIC_BYTES}")
            self._map = mmap.mmap(page_fd, SYNIC_BYTES, mmap.MAP_SHARED)
        except BaseException:
            for fd in (page_fd, interrupt_fd, eom_fd):
                os.close(fd)
            raise
        os.close(page_fd)  # the mapping keeps the memory
        self._words = SharedWords(self._map, atomics)
        self.interrupt = EventFd(interrupt_fd)
        self.eom = EventFd(eom_fd)
        self.malformed = 0
        self.received = 0

    def fileno(self) -> int:
        """The interrupt fd, for selectors."""
        return self.interrupt.fileno()

    def wait(self, timeout: float) -> bool:
        """Wait for the interrupt (consumes it); True if it fired."""
        return self.interrupt.wait(timeout)

    def read_message(self, sint: int = VMBUS_SINT) -> SynicMessage | None:
        """Take the message in ``sint``'s slot, or None if the slot is empty.

        Copies the slot once, frees it, signals EOM if MessagePending was
        set, then validates the copy (a malformed one is counted in
        ``malformed`` and skipped: the next one is returned if present)."""
        base = sint * HV_MESSAGE_SIZE
        words = self._words
        while words.load(base) != 0:
            raw = bytes(self._map[base : base + HV_MESSAGE_SIZE])  # copy once
            words.clear_bits(base, 0xFFFFFFFF)  # MessageType = 0; full barrier
            if (words.load(base + 4) & _PENDING_IN_WORD) or (raw[5] & MESSAGE_PENDING):
                self.eom.signal()
            try:
                msg = decode_hv_message(raw, sint)
            except SynicError:
                self.malformed += 1
                continue
            self.received += 1
            return msg
        return None

    def read_messages(self, sint: int = VMBUS_SINT, limit: int = 64) -> list[SynicMessage]:
        out: list[SynicMessage] = []
        while len(out) < limit:
            m = self.read_message(sint)
            if m is None:
                break
            out.append(m)
        return out

    def take_events(self, sint: int = VMBUS_SINT) -> list[int]:
        """Test-and-clear the event flags of ``sint``; returns the flags that
        were set, in ascending order."""
        base = EVENT_PAGE_OFFSET + sint * 256
        raw = bytes(self._map[base : base + 256])
        v = int.from_bytes(raw, "little")
        if not v:
            return []
        out: list[int] = []
        for w in range(FLAGS_PER_SINT // 32):
            word = (v >> (32 * w)) & 0xFFFFFFFF
            if not word:
                continue
            self._words.clear_bits(base + 4 * w, word)
            while word:
                low = word & -word
                out.append(32 * w + low.bit_length() - 1)
                word ^= low
        return out

    def close(self) -> None:
        if self._map is None:
            return
        self._words.close()
        self._map.close()
        self._map = None  # type: ignore[assignment]
        self.interrupt.close()
        self.eom.close()

    def __enter__(self) -> SynicGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
