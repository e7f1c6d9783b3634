"""The hypercall router: partitions, connections and permission checks (sans-IO).

Layer: hv, the supervisor's side.  ``HypercallRouter`` is pure logic over
SynIC objects (``hv.synic.SynicHost`` or anything with its ``post`` /
``signal_event`` methods) and each partition's ``hv.memory.GuestMemory``; it
takes HYPERCALL frames (hv/wire.py) a partition sent on its own link and
returns the REPLY.  What a call produces for another partition (a grant for
the root, a new memory range or doorbells for a child) is queued in
``outbox``.  Permission failures are statuses and nothing else happens: no
message delivered, no flag set, no grant.

Trust: the caller ID is the link's owner, never anything inside a frame;
every input block is parsed here (hv/wire.py) with explicit lengths before
any value in it is used.
"""

from __future__ import annotations

import enum
import os
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .abi import (
    CONNECTION_ID_MASK,
    FLAGS_PER_SINT,
    HOST_RESERVE_BYTES,
    HOT_ADD_ALIGN_BYTES,
    MAX_MEMORY_RANGES,
    MAX_PAYLOAD,
    MAX_SHARE_PAGES,
    PAGE_SIZE,
    SINT_COUNT,
    VMBUS_SINT,
    HvStatus,
    HypercallCode,
    Privilege,
)
from .link import runtime_frame
from .memory import GrantError, GuestMemory, GuestMemoryError, MemoryLimitError
from .proc import host_available
from .wire import (
    FLAG_NO_REPLY_ON_SUCCESS,
    Frame,
    FrameKind,
    WireError,
    decode_control,
    decode_frame,
    decode_post_message,
    decode_share_pages,
    decode_signal_event,
    encode_result,
)

__all__ = ["Connection", "ConnectionKind", "HypercallRouter", "SynicTarget"]

_U64 = struct.Struct("<Q")


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
        self.host_available = host_available  # bytes the host can still give (injectable)

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
        self.calls += 1
        st, target = self._dm_target(caller, child)
        if st != HvStatus.SUCCESS:
            return st, 0, 0
        if nbytes <= 0 or nbytes % PAGE_SIZE:
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
        self.calls += 1
        st, target = self._dm_target(caller, child)
        if st != HvStatus.SUCCESS:
            return st, []
        mem = target.memory
        room = max(0, (mem.maximum_bytes - mem.assigned_bytes) // PAGE_SIZE)
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
