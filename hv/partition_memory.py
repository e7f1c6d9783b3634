"""Guest memory as a partition sees it: its own ranges, and (the root) grants.

Layer: hv, the partition's side (the supervisor's is hv/memory.py).  A
partition receives exactly its own memory as MEMORY frames (hv/memwire.py)
with memfds and maps them with ``GuestMemoryView``: new ranges are visible at
once, ballooned pages stop translating (``GpaError``).  The root also keeps a
``GrantTable``: the pages children shared with it (GRANT / REVOKE messages),
each grant mapped alone (``GrantMapping``), the basis of GPADLs; it maps only
the granted pages.  Children never receive grants.

Trust: a partition trusts its supervisor; messages are still validated
(ranges may not overlap, fds must cover their segments) and a bad one raises
``WireError`` without changing the view.  ``GrantTable``'s lookups take PFNs
from a child's packets: any page not granted by that child gives None.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .abi import PAGE_SHIFT, PAGE_SIZE
from .memwire import NO_FD, GuestMemoryError, MemoryMessage, MemoryOp
from .wire import Frame, WireError

__all__ = [
    "SPAN_CACHE_ENTRIES",
    "SPAN_CACHE_KEY_BYTES",
    "GpaError",
    "GrantMapping",
    "GrantTable",
    "GuestMemoryView",
]


class GpaError(GuestMemoryError):
    """A GPA that is not (or no longer) mapped in this view."""


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
