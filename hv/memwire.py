"""The MEMORY frame: how the supervisor tells a partition about memory.

Layer: hv, shared by both sides: the supervisor (hv/memory.py) builds these
messages, a partition (hv/partition_memory.py) parses and applies them.  A
``MemoryMessage`` travels as the body of a ``FrameKind.MEMORY`` frame
(hv/wire.py), with the memfds of the ranges it names riding along.

Wire (body of a ``FrameKind.MEMORY`` frame, little endian)::

    u32 op  (1 MAP, 2 BALLOON, 3 UNBALLOON, 4 GRANT, 5 REVOKE)
    u32 segment count (<= MAX_SEGMENTS)
    u64 owner partition id
    u64 grant id (0 unless GRANT / REVOKE)
    segment[count]: u64 gpa_pfn, u64 npages, u64 file_pfn, u32 fd_index, u32 rsvdz

``fd_index`` indexes the frame's fds (0xFFFFFFFF: none; BALLOON and
UNBALLOON carry no fds).  For MAP, ``gpa_pfn`` is where the range sits in
the receiver's GPA space; for GRANT, the owner's PFN of the first page of
the run, in grant order (a GPADL's PFN list, run-length encoded).

``GuestMemoryError`` is here too: the base of both sides' memory refusals
(the supervisor's limits and grants, a partition's unmapped GPAs).

Trust: ``MemoryMessage.from_frame`` checks every length, count and fd index
of a received frame and raises ``WireError`` (closing the fds) otherwise.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field

from .wire import Frame, FrameKind, WireError

__all__ = [
    "MAX_RANGE_PAGES",
    "MAX_SEGMENTS",
    "NO_FD",
    "GuestMemoryError",
    "MemoryMessage",
    "MemoryOp",
    "MemorySegment",
]

MAX_SEGMENTS = 4096  # segments per MEMORY message (fits a 64 KiB frame)
MAX_RANGE_PAGES = 1 << 28  # 1 TiB per range: a sanity bound on received sizes
NO_FD = 0xFFFFFFFF


class GuestMemoryError(ValueError):
    """A memory operation was refused; the message says which rule."""


class MemoryOp(enum.IntEnum):
    MAP = 1
    BALLOON = 2
    UNBALLOON = 3
    GRANT = 4
    REVOKE = 5


_MSG = struct.Struct("<IIQQ")
_SEG = struct.Struct("<QQQII")


@dataclass(frozen=True)
class MemorySegment:
    gpa_pfn: int
    npages: int
    file_pfn: int = 0
    fd_index: int = NO_FD


@dataclass
class MemoryMessage:
    """One MEMORY frame's content.  ``fds`` of a received message are owned
    by the receiver; of one built by ``GuestMemory``, they stay owned by it
    (send, do not close)."""

    op: MemoryOp
    owner: int
    segments: list[MemorySegment]
    fds: list[int] = field(default_factory=list)
    grant_id: int = 0

    def frame(self, seq: int = 0) -> Frame:
        body = _MSG.pack(self.op, len(self.segments), self.owner, self.grant_id) + b"".join(
            _SEG.pack(s.gpa_pfn, s.npages, s.file_pfn, s.fd_index, 0) for s in self.segments
        )
        return Frame(FrameKind.MEMORY, seq, body, list(self.fds))

    @classmethod
    def from_frame(cls, frame: Frame) -> MemoryMessage:
        """Parse a received MEMORY frame (takes over its fds).  Raises
        WireError (closing the fds) if anything is malformed."""
        try:
            if frame.kind != FrameKind.MEMORY:
                raise WireError(f"frame kind {frame.kind} is not MEMORY")
            body = frame.body
            if len(body) < _MSG.size:
                raise WireError("MEMORY frame shorter than its header")
            op, nseg, owner, gid = _MSG.unpack_from(body)
            try:
                op = MemoryOp(op)
            except ValueError:
                raise WireError(f"unknown memory op {op}") from None
            if nseg > MAX_SEGMENTS or len(body) != _MSG.size + nseg * _SEG.size:
                raise WireError("MEMORY frame length does not match its segment count")
            segs = []
            for i in range(nseg):
                gpa, npages, fpfn, fdi, rsvd = _SEG.unpack_from(body, _MSG.size + i * _SEG.size)
                if rsvd or not 0 < npages <= MAX_RANGE_PAGES:
                    raise WireError(f"bad segment {i}")
                if gpa + npages > 1 << 52 or fpfn + npages > MAX_RANGE_PAGES:
                    raise WireError(f"segment {i} out of the address space")
                if fdi != NO_FD and fdi >= len(frame.fds):
                    raise WireError(f"segment {i} names fd {fdi} of {len(frame.fds)}")
                segs.append(MemorySegment(gpa, npages, fpfn, fdi))
        except WireError:
            frame.close_fds()
            raise
        fds, frame.fds = frame.fds, []
        return cls(op, owner, segs, fds, gid)

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
