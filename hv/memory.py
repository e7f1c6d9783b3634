"""Guest-physical memory, the supervisor's side: owned here, granted as memfds.

Layer: hv, the supervisor's side (a partition's is hv/partition_memory.py;
the MEMORY frames between them are hv/memwire.py).  The supervisor owns each
partition's memory (``GuestMemory``): a list of *ranges*, each one sealed
memfd, placed in the partition's guest-physical address (GPA) space in 4 KiB
pages (PFNs).  The startup range sits at GPA 0; every hot-add appends a new
range after the last one.  A partition receives exactly its own ranges as fds
over its socket (a MEMORY frame, ``MemoryMessage``) and maps them with
``GuestMemoryView``; it never receives a handle to another partition's memory.

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

Trust: requests reach this module through the router (hv/router.py), which
has already parsed them; every PFN a partition names is checked here against
the caller's own ranges before anything is granted or freed.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .abi import PAGE_SHIFT, PAGE_SIZE, HvStatus
from .memwire import MAX_SEGMENTS, GuestMemoryError, MemoryMessage, MemoryOp, MemorySegment
from .wire import Frame

__all__ = [
    "MAX_RANGES",
    "Grant",
    "GrantError",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryLimitError",
    "format_bytes",
]

MAX_RANGES = 64  # memfd ranges per partition (fds are a finite resource)
MAX_GRANTS = 1024  # live grants per partition

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


class MemoryLimitError(GuestMemoryError):
    """The operation would take a partition outside [minimum, maximum]."""


class GrantError(GuestMemoryError):
    """A share request was refused; ``status`` is the hypercall status."""

    def __init__(self, status: HvStatus, msg: str) -> None:
        super().__init__(msg)
        self.status = status


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def _check_size(what: str, n: int) -> None:
    if n < 0 or n % PAGE_SIZE:
        raise GuestMemoryError(f"{what} ({n} bytes) must be a non-negative multiple of 4 KiB")


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
