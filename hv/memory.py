"""Guest-physical memory: owned by the supervisor, granted as memfds.

Layer: hv.  The supervisor owns each partition's memory (``GuestMemory``):
a list of *ranges*, each one sealed memfd, placed in the partition's
guest-physical address (GPA) space in 4 KiB pages (PFNs).  The startup range
sits at GPA 0; every hot-add appends a new range after the last one.  A
partition receives exactly its own ranges as fds over its socket (a MEMORY
frame, ``MemoryMessage``) and maps them with ``GuestMemoryView``; it never
receives a handle to another partition's memory.

* **Hot-add** (``hot_add``): a new memfd range while the partition runs; the
  returned message, sent to the partition, makes it visible at once.
* **Balloon** (``balloon`` / ``balloon_bytes``): the supervisor takes pages
  back with ``fallocate(PUNCH_HOLE)`` on the memfd, so the kernel really
  frees them (``resident_bytes`` and the memfd's ``st_blocks`` fall); the
  partition's view stops translating them.  ``unballoon`` gives pages back.
* **Accounting** is exact: ``assigned_bytes`` = pages in ranges minus
  ballooned pages, always within [minimum, maximum] (``MemoryLimitError``
  names the rule otherwise).  ``resident_bytes`` is what the kernel has
  actually allocated (pages touched), for audits.
* **Grants** (``share_with_root``): a child shares pages of its own memory
  with the root, the basis of GPADLs.  Every PFN must be the caller's and
  not ballooned, or nothing is granted (``GrantError`` with
  ACCESS_DENIED).  Granted pages are pinned: they cannot be ballooned until
  the grant is revoked.  The root receives a GRANT message with the fds of
  the ranges holding those pages and maps only the granted pages
  (``GrantTable`` / ``GrantMapping``).  A memfd cannot be cut into pieces,
  so the fd itself reaches the whole range; the root is trusted with that,
  as Hyper-V's parent partition can map any child page.  Children never
  receive grants.

Every memfd is sealed (no shrink, no grow, no further seals): a partition
cannot truncate its memory under the root's mapping (which would SIGBUS the
root) nor seal it against the supervisor's hole punching.

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
"""

from __future__ import annotations

import ctypes
import enum
import fcntl
import itertools
import mmap
import os
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .abi import PAGE_SHIFT, PAGE_SIZE, HvStatus
from .wire import Frame, FrameKind, WireError

__all__ = [
    "MAX_RANGES",
    "GpaError",
    "Grant",
    "GrantError",
    "GrantMapping",
    "GrantTable",
    "GuestMemory",
    "GuestMemoryError",
    "GuestMemoryView",
    "MemoryLimitError",
    "MemoryMessage",
    "MemoryOp",
    "MemorySegment",
    "format_bytes",
]

MAX_RANGES = 64  # memfd ranges per partition (fds are a finite resource)
MAX_GRANTS = 1024  # live grants per partition
MAX_SEGMENTS = 4096  # segments per MEMORY message (fits a 64 KiB frame)
MAX_RANGE_PAGES = 1 << 28  # 1 TiB per range: a sanity bound on received sizes
NO_FD = 0xFFFFFFFF

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

_grant_ids = itertools.count(1)  # unique across the supervisor


def format_bytes(n: int) -> str:
    """IEC units, as tables show them (``128 MiB``)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n} B"


class GuestMemoryError(ValueError):
    """A memory operation was refused; the message says which rule."""


class MemoryLimitError(GuestMemoryError):
    """The operation would take a partition outside [minimum, maximum]."""


class GrantError(GuestMemoryError):
    """A share request was refused; ``status`` is the hypercall status."""

    def __init__(self, status: HvStatus, msg: str) -> None:
        super().__init__(msg)
        self.status = status


class GpaError(GuestMemoryError):
    """A GPA that is not (or no longer) mapped in this view."""


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def _check_size(what: str, n: int) -> None:
    if n < 0 or n % PAGE_SIZE:
        raise GuestMemoryError(f"{what} ({n} bytes) must be a non-negative multiple of 4 KiB")


# --- the wire ---------------------------------------------------------------------


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


# --- the supervisor side --------------------------------------------------------------


@dataclass
class _Range:
    gpa_pfn: int
    npages: int
    fd: int
    ballooned: bytearray  # 1 per ballooned page
    nballooned: int = 0

    @property
    def end_pfn(self) -> int:
        return self.gpa_pfn + self.npages


@dataclass(frozen=True)
class Grant:
    """Pages of ``owner`` shared with the root, in the order asked."""

    grant_id: int
    owner: int
    pfns: tuple[int, ...]
    message: MemoryMessage

    def frame(self) -> Frame:
        """The GRANT frame for the root (fds borrowed from the owner's memory)."""
        return self.message.frame()

    @property
    def nbytes(self) -> int:
        return len(self.pfns) * PAGE_SIZE


class GuestMemory:
    """One partition's guest-physical memory (supervisor side).

    Args:
        partition_id: the owner.
        startup_bytes: the first range, at GPA 0.
        minimum_bytes / maximum_bytes: limits for balloon / hot-add
            (default: startup).  Minimum <= startup <= maximum, all
            multiples of 4 KiB.
        name: for messages ("child1").
    """

    def __init__(
        self,
        partition_id: int,
        startup_bytes: int,
        *,
        minimum_bytes: int | None = None,
        maximum_bytes: int | None = None,
        name: str = "",
    ) -> None:
        self.partition_id = partition_id
        self.name = name or f"partition {partition_id}"
        minimum = startup_bytes if minimum_bytes is None else minimum_bytes
        maximum = startup_bytes if maximum_bytes is None else maximum_bytes
        for what, v in (("startup", startup_bytes), ("minimum", minimum), ("maximum", maximum)):
            _check_size(f"{self.name}: {what} memory", v)
        if startup_bytes <= 0:
            raise MemoryLimitError(f"{self.name}: startup memory must be > 0")
        if not minimum <= startup_bytes <= maximum:
            raise MemoryLimitError(
                f"{self.name}: memory must satisfy minimum <= startup <= maximum "
                f"(got {format_bytes(minimum)} / {format_bytes(startup_bytes)} / "
                f"{format_bytes(maximum)})"
            )
        self.minimum_bytes = minimum
        self.maximum_bytes = maximum
        self._ranges: list[_Range] = []
        self._pinned: Counter[int] = Counter()  # pfn -> grants holding it
        self._grants: dict[int, Grant] = {}
        self._closed_grants: set[int] = set()
        self._closed = False
        self._add_range(0, startup_bytes >> PAGE_SHIFT)

    # -- accounting --

    @property
    def assigned_bytes(self) -> int:
        """Bytes the partition owns: range pages minus ballooned pages."""
        return sum(r.npages - r.nballooned for r in self._ranges) * PAGE_SIZE

    @property
    def ballooned_bytes(self) -> int:
        return sum(r.nballooned for r in self._ranges) * PAGE_SIZE

    def resident_bytes(self) -> int:
        """Bytes the kernel has actually allocated for this memory (touched
        pages; memfd ``st_blocks``).  At most ``assigned_bytes`` unless the
        partition touched ballooned pages again (see ``audit``)."""
        return sum(os.fstat(r.fd).st_blocks * 512 for r in self._ranges)

    def audit(self) -> int:
        """Ballooned pages the partition has touched since (it broke the
        balloon protocol); they are punched again.  Returns how many."""
        bad = 0
        for r in self._ranges:
            if not r.nballooned:
                continue
            for start, n in _runs(i for i, b in enumerate(r.ballooned) if b):
                data = _data_pages(r.fd, start, n)
                if data:
                    bad += data
                    _punch_hole(r.fd, start * PAGE_SIZE, n * PAGE_SIZE)
        return bad

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """(gpa_pfn, npages) of every range, in GPA order."""
        return [(r.gpa_pfn, r.npages) for r in self._ranges]

    def _find(self, pfn: int) -> _Range | None:
        for r in self._ranges:
            if r.gpa_pfn <= pfn < r.end_pfn:
                return r
        return None

    def owns(self, pfn: int) -> bool:
        """True if ``pfn`` is one of this partition's pages (in a range and
        not ballooned)."""
        r = self._find(pfn)
        return r is not None and not r.ballooned[pfn - r.gpa_pfn]

    def set_limits(
        self, *, minimum_bytes: int | None = None, maximum_bytes: int | None = None
    ) -> None:
        """Change the limits while running: maximum may not drop below what
        is assigned, minimum may not rise above it."""
        lo = self.minimum_bytes if minimum_bytes is None else minimum_bytes
        hi = self.maximum_bytes if maximum_bytes is None else maximum_bytes
        _check_size("minimum", lo)
        _check_size("maximum", hi)
        a = self.assigned_bytes
        if hi < a:
            raise MemoryLimitError(
                f"{self.name}: maximum {format_bytes(hi)} is below the "
                f"{format_bytes(a)} assigned now"
            )
        if lo > a:
            raise MemoryLimitError(
                f"{self.name}: minimum {format_bytes(lo)} is above the "
                f"{format_bytes(a)} assigned now"
            )
        self.minimum_bytes, self.maximum_bytes = lo, hi

    # -- ranges --

    def _add_range(self, gpa_pfn: int, npages: int) -> _Range:
        fd = os.memfd_create(
            f"viridian-mem-{self.name}-{len(self._ranges)}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        )
        try:
            os.ftruncate(fd, npages * PAGE_SIZE)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(fd)
            raise
        r = _Range(gpa_pfn, npages, fd, bytearray(npages))
        self._ranges.append(r)
        return r

    def map_message(self) -> MemoryMessage:
        """MAP message with every range (for a partition that just started),
        followed by the ballooned pages if any (call ``balloon_state``)."""
        self._check_open()
        segs = [MemorySegment(r.gpa_pfn, r.npages, 0, i) for i, r in enumerate(self._ranges)]
        return MemoryMessage(
            MemoryOp.MAP, self.partition_id, segs, [r.fd for r in self._ranges]
        )

    def balloon_state(self) -> MemoryMessage | None:
        """BALLOON message listing every ballooned page (None if none)."""
        segs = [
            MemorySegment(r.gpa_pfn + s, n)
            for r in self._ranges
            for s, n in _runs(i for i, b in enumerate(r.ballooned) if b)
        ]
        return MemoryMessage(MemoryOp.BALLOON, self.partition_id, segs) if segs else None

    def hot_add(self, nbytes: int, *, align_bytes: int = PAGE_SIZE) -> MemoryMessage:
        """Add a range of ``nbytes`` after the last one (its GPA aligned to
        ``align_bytes``).  Returns the MAP message for the partition."""
        self._check_open()
        _check_size("hot-add size", nbytes)
        _check_size("hot-add alignment", align_bytes)
        if nbytes == 0:
            raise GuestMemoryError("hot-add of 0 bytes")
        a = self.assigned_bytes
        if a + nbytes > self.maximum_bytes:
            raise MemoryLimitError(
                f"hot-add of {format_bytes(nbytes)} to {self.name} would exceed its maximum "
                f"of {format_bytes(self.maximum_bytes)} (assigned {format_bytes(a)})"
            )
        if len(self._ranges) >= MAX_RANGES:
            raise GuestMemoryError(f"{self.name} already has {MAX_RANGES} memory ranges")
        align = max(1, align_bytes >> PAGE_SHIFT)
        end = self._ranges[-1].end_pfn
        gpa = -(-end // align) * align
        r = self._add_range(gpa, nbytes >> PAGE_SHIFT)
        return MemoryMessage(
            MemoryOp.MAP, self.partition_id, [MemorySegment(r.gpa_pfn, r.npages, 0, 0)], [r.fd]
        )

    # -- balloon --

    def _resolve(self, pfn_ranges: Iterable[tuple[int, int]]) -> list[tuple[_Range, int, int]]:
        out = []
        for pfn, n in pfn_ranges:
            if n <= 0 or pfn < 0:
                raise GuestMemoryError(f"bad page range ({pfn}, {n})")
            r = self._find(pfn)
            if r is None or pfn + n > r.end_pfn:
                raise GuestMemoryError(
                    f"pages {pfn:#x}..{pfn + n - 1:#x} are not within one range of {self.name}"
                )
            out.append((r, pfn - r.gpa_pfn, n))
        return out

    def balloon(self, pfn_ranges: Iterable[tuple[int, int]]) -> MemoryMessage:
        """Take back the pages (pfn, count) ...: the kernel frees them
        (PUNCH_HOLE) and the partition's view stops translating them.
        All-or-nothing; refuses pages that are not the partition's, already
        ballooned, shared with the root, or that would go below the minimum.
        Returns the BALLOON message for the partition."""
        self._check_open()
        pfn_ranges = list(pfn_ranges)
        spans = self._resolve(pfn_ranges)
        seen: set[int] = set()
        total = 0
        for r, off, n in spans:
            for i in range(off, off + n):
                pfn = r.gpa_pfn + i
                if r.ballooned[i] or pfn in seen:
                    raise GuestMemoryError(f"page {pfn:#x} of {self.name} is already ballooned")
                if self._pinned[pfn]:
                    raise GuestMemoryError(
                        f"page {pfn:#x} of {self.name} is shared with the root; revoke first"
                    )
                seen.add(pfn)
            total += n * PAGE_SIZE
        a = self.assigned_bytes
        if a - total < self.minimum_bytes:
            raise MemoryLimitError(
                f"ballooning {format_bytes(total)} from {self.name} would go below its minimum "
                f"of {format_bytes(self.minimum_bytes)} (assigned {format_bytes(a)})"
            )
        for r, off, n in spans:
            _punch_hole(r.fd, off * PAGE_SIZE, n * PAGE_SIZE)
            r.ballooned[off : off + n] = b"\x01" * n
            r.nballooned += n
        return MemoryMessage(
            MemoryOp.BALLOON, self.partition_id, [MemorySegment(p, n) for p, n in pfn_ranges]
        )

    def balloon_bytes(self, nbytes: int) -> MemoryMessage:
        """Balloon ``nbytes`` chosen by the supervisor: the highest pages
        that are neither ballooned nor shared (for a partition without a
        cooperating balloon driver)."""
        self._check_open()
        _check_size("balloon size", nbytes)
        a = self.assigned_bytes
        if a - nbytes < self.minimum_bytes:  # the limit first: no page scan to refuse
            raise MemoryLimitError(
                f"ballooning {format_bytes(nbytes)} from {self.name} would go below its "
                f"minimum of {format_bytes(self.minimum_bytes)} (assigned {format_bytes(a)})"
            )
        want = nbytes >> PAGE_SHIFT
        runs: list[tuple[int, int]] = []
        found = 0
        for r in reversed(self._ranges):
            picked: list[int] = []
            for i in range(r.npages - 1, -1, -1):
                if found + len(picked) == want:
                    break
                if not r.ballooned[i] and not self._pinned[r.gpa_pfn + i]:
                    picked.append(r.gpa_pfn + i)
            # runs per range: adjacent ranges are separate memfds (``balloon``
            # takes runs within one range)
            runs += _runs(sorted(picked))
            found += len(picked)
            if found == want:
                break
        if found < want:
            raise GuestMemoryError(f"{self.name} has only {found} pages that can be ballooned")
        return self.balloon(runs)

    def ballooned_runs(self, max_pages: int, max_runs: int) -> list[tuple[int, int]]:
        """Up to ``max_pages`` ballooned pages, lowest first, as at most
        ``max_runs`` (pfn, count) runs, each within one range."""
        out: list[tuple[int, int]] = []
        left = max_pages
        for r in self._ranges:
            if not r.nballooned or left <= 0:
                continue
            for start, n in _runs(i for i, b in enumerate(r.ballooned) if b):
                if left <= 0 or len(out) >= max_runs:
                    return out
                take = min(n, left)
                out.append((r.gpa_pfn + start, take))
                left -= take
        return out

    def unballoon(self, pfn_ranges: Iterable[tuple[int, int]]) -> MemoryMessage:
        """Give ballooned pages back (they come back zero-filled).  Refuses
        pages that are not ballooned or going above the maximum."""
        self._check_open()
        pfn_ranges = list(pfn_ranges)
        spans = self._resolve(pfn_ranges)
        total = 0
        for r, off, n in spans:
            if not all(r.ballooned[off : off + n]):
                raise GuestMemoryError(
                    f"pages {r.gpa_pfn + off:#x}+{n} of {self.name} are not all ballooned"
                )
            total += n * PAGE_SIZE
        a = self.assigned_bytes
        if a + total > self.maximum_bytes:
            raise MemoryLimitError(
                f"giving {format_bytes(total)} back to {self.name} would exceed its maximum "
                f"of {format_bytes(self.maximum_bytes)} (assigned {format_bytes(a)})"
            )
        for r, off, n in spans:
            r.ballooned[off : off + n] = bytes(n)
            r.nballooned -= n
        return MemoryMessage(
            MemoryOp.UNBALLOON, self.partition_id, [MemorySegment(p, n) for p, n in pfn_ranges]
        )

    # -- grants --

    def share_with_root(self, caller: int, pfns: Sequence[int]) -> Grant:
        """Grant the root access to ``pfns`` (in that order) of this memory.

        ``caller`` must be this memory's owner and every page must be one of
        its own, not ballooned, listed once; otherwise GrantError
        (ACCESS_DENIED / INVALID_PARAMETER) and nothing is granted."""
        self._check_open()
        if caller != self.partition_id:
            raise GrantError(
                HvStatus.ACCESS_DENIED,
                f"partition {caller} asked to share memory of {self.name}",
            )
        if not pfns:
            raise GrantError(HvStatus.INVALID_PARAMETER, "no pages to share")
        if len(set(pfns)) != len(pfns):
            raise GrantError(HvStatus.INVALID_PARAMETER, "a page is listed twice")
        if len(self._grants) >= MAX_GRANTS:
            raise GrantError(HvStatus.INSUFFICIENT_MEMORY, f"{self.name} has {MAX_GRANTS} grants")
        segs: list[MemorySegment] = []
        fd_index: dict[int, int] = {}
        fds: list[int] = []
        for pfn in pfns:
            r = self._find(pfn) if isinstance(pfn, int) else None
            if r is None or r.ballooned[pfn - r.gpa_pfn]:
                raise GrantError(
                    HvStatus.ACCESS_DENIED, f"page {pfn!r} is not owned by {self.name}"
                )
            fi = fd_index.get(r.fd)
            if fi is None:
                fi = fd_index[r.fd] = len(fds)
                fds.append(r.fd)
            last = segs[-1] if segs else None
            if (
                last is not None
                and last.fd_index == fi
                and last.gpa_pfn + last.npages == pfn
            ):
                segs[-1] = MemorySegment(last.gpa_pfn, last.npages + 1, last.file_pfn, fi)
            else:
                segs.append(MemorySegment(pfn, 1, pfn - r.gpa_pfn, fi))
        if len(segs) > MAX_SEGMENTS or len(fds) > 16:
            raise GrantError(HvStatus.INVALID_PARAMETER, "grant too fragmented for one message")
        gid = next(_grant_ids)
        msg = MemoryMessage(MemoryOp.GRANT, self.partition_id, segs, fds, gid)
        grant = Grant(gid, self.partition_id, tuple(pfns), msg)
        self._grants[gid] = grant
        self._pinned.update(pfns)
        return grant

    @property
    def grants(self) -> dict[int, Grant]:
        return dict(self._grants)

    def revoke(self, grant_id: int) -> Frame | None:
        """End a grant; returns the REVOKE frame for the root (None if no
        such grant)."""
        g = self._grants.pop(grant_id, None)
        if g is None:
            if grant_id not in self._closed_grants:
                return None
            self._closed_grants.discard(grant_id)  # closed before the root was told
        else:
            self._pinned.subtract(g.pfns)
            self._pinned = +self._pinned
        return MemoryMessage(MemoryOp.REVOKE, self.partition_id, [], [], grant_id).frame()

    # -- lifetime --

    def _check_open(self) -> None:
        if self._closed:
            raise GuestMemoryError(f"memory of {self.name} is closed")

    def close(self) -> None:
        """Close every range fd.  Pages stay alive while a partition still
        maps them and are freed by the kernel when the last mapping goes."""
        if self._closed:
            return
        self._closed = True
        self._closed_grants.update(self._grants)  # revoke() still tells the root
        self._grants.clear()
        self._pinned.clear()
        for r in self._ranges:
            os.close(r.fd)
        self._ranges.clear()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ints -> (start, count) runs."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def _data_pages(fd: int, start: int, n: int) -> int:
    """Pages of [start, start+n) that hold data (SEEK_DATA / SEEK_HOLE)."""
    pos, end, count = start * PAGE_SIZE, (start + n) * PAGE_SIZE, 0
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        count += (hole - data) // PAGE_SIZE
        pos = hole
    return count


# --- the partition side -------------------------------------------------------------


def _map_fd(fd: int, file_pfn: int, npages: int) -> mmap.mmap:
    size = os.fstat(fd).st_size
    if (file_pfn + npages) * PAGE_SIZE > size:
        raise WireError(f"segment pages {file_pfn}+{npages} exceed the {size}-byte memfd")
    return mmap.mmap(
        fd, npages * PAGE_SIZE, mmap.MAP_SHARED, offset=file_pfn * PAGE_SIZE
    )


@dataclass
class _Mapped:
    gpa_pfn: int
    npages: int
    map: mmap.mmap
    ballooned: bytearray
    nballooned: int = 0

    @property
    def end_pfn(self) -> int:
        return self.gpa_pfn + self.npages


def _close_map(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:
        pass  # a memoryview still uses it: the GC unmaps it later


class _AppliesFrames:
    """What receives MEMORY frames: decode one, apply it, close its fds."""

    def apply(self, msg: MemoryMessage) -> None:
        raise NotImplementedError

    def apply_frame(self, frame: Frame) -> MemoryMessage:
        msg = MemoryMessage.from_frame(frame)
        try:
            self.apply(msg)
        finally:
            msg.close_fds()
        return msg


class GuestMemoryView(_AppliesFrames):
    """A partition's view of its own memory (partition side).

    Feed it every MEMORY message the supervisor sends (``apply``); it maps
    new ranges at once and stops translating ballooned pages.  Messages are
    validated (ranges may not overlap, fds must cover their segments) and a
    bad one raises WireError without changing the view.
    """

    def __init__(self) -> None:
        self._ranges: list[_Mapped] = []

    @property
    def visible_bytes(self) -> int:
        """What the partition can use (``guest_visible_bytes``)."""
        return sum(r.npages - r.nballooned for r in self._ranges) * PAGE_SIZE

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(r.gpa_pfn, r.npages) for r in self._ranges]

    def apply(self, msg: MemoryMessage) -> None:
        """Apply a MAP / BALLOON / UNBALLOON message (fds are not closed:
        the mapping does not need them)."""
        if msg.op == MemoryOp.MAP:
            new: list[_Mapped] = []
            try:
                for s in msg.segments:
                    if s.fd_index == NO_FD:
                        raise WireError("MAP segment without an fd")
                    for r in self._ranges + new:
                        if s.gpa_pfn < r.end_pfn and r.gpa_pfn < s.gpa_pfn + s.npages:
                            raise WireError(f"range at {s.gpa_pfn:#x} overlaps a mapped range")
                    m = _map_fd(msg.fds[s.fd_index], s.file_pfn, s.npages)
                    new.append(_Mapped(s.gpa_pfn, s.npages, m, bytearray(s.npages)))
            except (WireError, OSError, ValueError) as e:
                for r in new:
                    _close_map(r.map)
                raise WireError(f"bad MAP message: {e}") from None
            self._ranges.extend(new)
            self._ranges.sort(key=lambda r: r.gpa_pfn)
        elif msg.op in (MemoryOp.BALLOON, MemoryOp.UNBALLOON):
            spans = []
            for s in msg.segments:
                r = self._find(s.gpa_pfn)
                if r is None or s.gpa_pfn + s.npages > r.end_pfn:
                    raise WireError(f"balloon pages {s.gpa_pfn:#x}+{s.npages} not in one range")
                spans.append((r, s.gpa_pfn - r.gpa_pfn, s.npages))
            val = 1 if msg.op == MemoryOp.BALLOON else 0
            for r, off, n in spans:
                before = sum(r.ballooned[off : off + n])
                r.ballooned[off : off + n] = bytes([val]) * n
                r.nballooned += (n if val else 0) - before
        else:
            raise WireError(f"{msg.op.name} is not for a partition's own memory")

    def _find(self, pfn: int) -> _Mapped | None:
        for r in self._ranges:
            if r.gpa_pfn <= pfn < r.end_pfn:
                return r
        return None

    def translate(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length): it must lie within one
        range and touch no ballooned page (GpaError otherwise)."""
        if length <= 0 or gpa < 0:
            raise GpaError(f"bad GPA span {gpa:#x}+{length}")
        pfn = gpa >> PAGE_SHIFT
        r = self._find(pfn)
        end = gpa + length
        if r is None or end > r.end_pfn * PAGE_SIZE:
            raise GpaError(f"GPA {gpa:#x}+{length} is not mapped")
        first, last = pfn - r.gpa_pfn, ((end - 1) >> PAGE_SHIFT) - r.gpa_pfn
        if r.nballooned and any(r.ballooned[first : last + 1]):
            raise GpaError(f"GPA {gpa:#x}+{length} touches a ballooned page")
        off = gpa - r.gpa_pfn * PAGE_SIZE
        return memoryview(r.map)[off : off + length]

    def page(self, pfn: int) -> memoryview:
        return self.translate(pfn << PAGE_SHIFT, PAGE_SIZE)

    def close(self) -> None:
        for r in self._ranges:
            _close_map(r.map)
        self._ranges.clear()


# --- the root side: grants ----------------------------------------------------------------


class GrantMapping:
    """The pages of one grant, mapped in the root (only those pages).

    ``page(i)`` is the i-th page in grant order; ``contiguous()`` is one
    view of the whole grant when its pages form one run in one range."""

    def __init__(self, msg: MemoryMessage) -> None:
        if msg.op != MemoryOp.GRANT:
            raise WireError(f"{msg.op.name} is not a grant")
        self.grant_id = msg.grant_id
        self.owner = msg.owner
        self.pfns: list[int] = []
        self._runs: list[tuple[int, mmap.mmap]] = []  # (first index, mapping)
        try:
            for s in msg.segments:
                if s.fd_index == NO_FD:
                    raise WireError("GRANT segment without an fd")
                m = _map_fd(msg.fds[s.fd_index], s.file_pfn, s.npages)
                self._runs.append((len(self.pfns), m))
                self.pfns.extend(range(s.gpa_pfn, s.gpa_pfn + s.npages))
        except (WireError, OSError, ValueError) as e:
            self.close()
            raise WireError(f"bad GRANT message: {e}") from None

    @property
    def npages(self) -> int:
        return len(self.pfns)

    def page(self, i: int) -> memoryview:
        return self.pages(i, 1)

    def _run_of(self, i: int) -> int:
        for k in range(len(self._runs) - 1, -1, -1):
            if i >= self._runs[k][0]:
                return k
        raise AssertionError("unreachable")

    def same_run(self, i: int, j: int) -> bool:
        """Pages i and j of the grant lie in one mapping (one view can hold both)."""
        return self._run_of(i) == self._run_of(j)

    def pages(self, i: int, n: int) -> memoryview:
        """One view of pages i .. i+n-1, which must lie in one mapping."""
        if n <= 0 or i < 0 or i + n > len(self.pfns):
            raise GpaError(f"pages {i}..{i + n - 1} of a {len(self.pfns)}-page grant")
        k = self._run_of(i)
        first, m = self._runs[k]
        if self._run_of(i + n - 1) != k:
            raise GpaError(f"pages {i}..{i + n - 1} span two mappings")
        off = (i - first) * PAGE_SIZE
        return memoryview(m)[off : off + n * PAGE_SIZE]

    def contiguous(self) -> memoryview:
        if len(self._runs) != 1:
            raise GpaError(f"grant {self.grant_id} has {len(self._runs)} runs, not 1")
        return memoryview(self._runs[0][1])

    def close(self) -> None:
        for _, m in self._runs:
            _close_map(m)
        self._runs.clear()


#: Most cached (owner, pfn array) entries of GrantTable.views_packed, and the
#: largest pfn array cached (32 pages, a 128 KiB buffer): at most 4096 entries
#: of at most 32 views each, whatever a peer names.
SPAN_CACHE_ENTRIES = 4096
SPAN_CACHE_KEY_BYTES = 8 * 32


class GrantTable(_AppliesFrames):
    """The root's grants, fed with GRANT / REVOKE messages."""

    def __init__(self) -> None:
        self._grants: dict[int, GrantMapping] = {}
        self._index: dict[int, dict[int, tuple[GrantMapping, int]]] = {}  # owner -> pfn ->
        # (owner, packed pfns) -> views, for views_packed: dropped with any
        # change to the grants, so no view outlives the grant it was made from
        self._spans: dict[tuple[int, bytes], list[memoryview]] = {}

    def apply(self, msg: MemoryMessage) -> None:
        self._index.pop(msg.owner, None)
        self._spans.clear()
        if msg.op == MemoryOp.GRANT:
            if msg.grant_id in self._grants:
                raise WireError(f"grant {msg.grant_id} already exists")
            self._grants[msg.grant_id] = GrantMapping(msg)
        elif msg.op == MemoryOp.REVOKE:
            g = self._grants.pop(msg.grant_id, None)
            if g is not None:
                g.close()
        else:
            raise WireError(f"{msg.op.name} is not a grant message")

    def get(self, grant_id: int) -> GrantMapping | None:
        return self._grants.get(grant_id)

    def locate(self, owner: int, pfn: int) -> tuple[GrantMapping, int] | None:
        """The grant from ``owner`` holding page ``pfn`` and its index there
        (None: ``owner`` did not grant that page)."""
        index = self._index.get(owner)
        if index is None:
            index = {}
            for g in self._grants.values():
                if g.owner == owner:
                    for i, p in enumerate(g.pfns):
                        index[p] = (g, i)
            self._index[owner] = index
        return index.get(pfn)

    def views(self, owner: int, pfns: Sequence[int]) -> list[memoryview] | None:
        """One 4 KiB view per page of ``pfns``, each in a grant from ``owner``;
        None if any page is not granted by ``owner`` (a device then refuses
        the request: it may touch only what the child shared)."""
        out = []
        for pfn in pfns:
            loc = self.locate(owner, pfn)
            if loc is None:
                return None
            out.append(loc[0].page(loc[1]))
        return out

    def views_packed(self, owner: int, packed: bytes) -> list[memoryview] | None:
        """``views`` of the pages whose pfns ``packed`` holds as little-endian
        u64s (a GPA-direct range's pfn array, as it is in the packet), with
        consecutive pages of one mapping joined into one view: one view for a
        contiguous buffer however many pages it spans.

        Cached per (owner, packed) until the grants change, for buffers of up
        to 32 pages: a device that names the same buffers again and again
        (storvsc's slots) pays one dict lookup.  None if any page is not
        granted by ``owner``.
        """
        key = (owner, packed)
        got = self._spans.get(key)
        if got is not None:
            return got
        out: list[memoryview] = []
        run: tuple[GrantMapping, int, int] | None = None  # (grant, first index, pages)
        for (pfn,) in struct.iter_unpack("<Q", packed):
            loc = self.locate(owner, pfn)
            if loc is None:
                return None
            g, i = loc
            if run is not None and run[0] is g and run[1] + run[2] == i \
                    and g.same_run(run[1], i):
                run = (g, run[1], run[2] + 1)
                continue
            if run is not None:
                out.append(run[0].pages(run[1], run[2]))
            run = (g, i, 1)
        if run is not None:
            out.append(run[0].pages(run[1], run[2]))
        if len(packed) <= SPAN_CACHE_KEY_BYTES:  # (a big buffer is not kept: bounded memory)
            if len(self._spans) >= SPAN_CACHE_ENTRIES:
                self._spans.clear()  # (a peer naming ever new buffers: bounded, not grown)
            self._spans[key] = out
        return out

    def find(self, owner: int, pfns: Sequence[int], exclude: Iterable[int] = ()) -> int | None:
        """The id of a grant from ``owner`` of exactly ``pfns`` (in order),
        not in ``exclude``; None if there is none."""
        skip = set(exclude)
        want = list(pfns)
        for gid, g in self._grants.items():
            if g.owner == owner and gid not in skip and g.pfns == want:
                return gid
        return None

    def __len__(self) -> int:
        return len(self._grants)

    def close(self) -> None:
        self._spans.clear()  # (their views would keep the mappings open)
        self._index.clear()
        for g in self._grants.values():
            g.close()
        self._grants.clear()
