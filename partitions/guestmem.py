"""The child's guest-physical page allocator.

Layer: partitions.  A child hands out pages of its own guest memory (the
``GuestMemoryView`` the supervisor mapped) for ring buffers and device
buffers.  ``PageAllocator`` keeps free runs of page numbers; ``sync()`` takes
in ranges the supervisor hot-added (usable at once) and ballooned pages
(withdrawn), so the allocator always agrees with the view.

Allocations are contiguous runs inside one mapped range, so a ring buffer is
one ``memoryview`` in the child and one mapping in the root.
"""

from __future__ import annotations

import bisect

from hv.abi import PAGE_SIZE
from hv.partition_memory import GuestMemoryView

__all__ = ["OutOfGuestMemory", "PageAllocator"]


class OutOfGuestMemory(MemoryError):
    """No run of free pages that long."""


class PageAllocator:
    """First-fit allocator of contiguous page runs over a ``GuestMemoryView``.

    Page 0 is never handed out (a zero PFN looks like "no page" to readers).
    """

    def __init__(self, view: GuestMemoryView) -> None:
        self.view = view
        self._free: list[tuple[int, int]] = []  # sorted (first pfn, count)
        self._used: dict[int, int] = {}  # first pfn -> count
        self._ballooned: set[int] = set()  # pages given up to the balloon
        self._known: set[tuple[int, int]] = set()
        self.sync()

    def sync(self) -> None:
        """Adopt ranges mapped since the last call (hot-add)."""
        for first, count in self.view.ranges:
            if (first, count) in self._known:
                continue
            self._known.add((first, count))
            if first == 0:
                first, count = 1, count - 1
            if count > 0:
                # pages of it may be ballooned already (its BALLOON frame came
                # before this sync): those stay with the balloon
                self._release_unballooned(first, count)

    @property
    def free_pages(self) -> int:
        return sum(n for _, n in self._free)

    @property
    def used_pages(self) -> int:
        return sum(self._used.values())

    def alloc(self, npages: int) -> int:
        """The first PFN of ``npages`` free contiguous pages in one range.

        Raises:
            OutOfGuestMemory: no such run.
        """
        if npages <= 0:
            raise ValueError(f"cannot allocate {npages} pages")
        self.sync()
        ranges = self.view.ranges
        for i, (first, count) in enumerate(self._free):
            # a run may span two adjacent ranges: only its part inside one counts
            for rfirst, rcount in ranges:
                lo, hi = max(first, rfirst), min(first + count, rfirst + rcount)
                if hi - lo >= npages:
                    self._take(i, lo, npages)
                    self._used[lo] = npages
                    return lo
        raise OutOfGuestMemory(
            f"no run of {npages} free pages ({self.free_pages} free in {len(self._free)} runs)"
        )

    def free(self, pfn: int) -> None:
        """Give back the run that ``alloc`` returned as ``pfn``."""
        n = self._used.pop(pfn, None)
        if n is None:
            raise ValueError(f"page {pfn:#x} was not allocated")
        self._release_unballooned(pfn, n)  # pages the host took meanwhile stay ballooned

    @property
    def ballooned_pages(self) -> int:
        return len(self._ballooned)

    @property
    def total_pages(self) -> int:
        """Pages this allocator manages (page 0 excluded): free + used + ballooned."""
        return self.free_pages + self.used_pages + len(self._ballooned)

    def take_highest(self, npages: int) -> list[tuple[int, int]]:
        """Give up to ``npages`` free pages to the balloon, highest first
        (the end of memory, which hot-add grew), as (pfn, count) runs each
        within one mapped range.  They are handed out no more until
        ``give_back``."""
        self.sync()
        out: list[tuple[int, int]] = []
        left = npages
        ranges = self.view.ranges
        while left > 0 and self._free:
            first, count = self._free[-1]
            # stay within one mapped range: cut at the range holding the run's end
            end = first + count
            lo = first
            for rfirst, rcount in ranges:
                if rfirst < end <= rfirst + rcount:
                    lo = max(first, rfirst)
            n = min(left, end - lo)
            start = end - n
            self._take(len(self._free) - 1, start, n)
            out.append((start, n))
            self._ballooned.update(range(start, start + n))
            left -= n
        return sorted(out)

    def withdraw(self, pfn: int, npages: int) -> int:
        """The host took pages [pfn, pfn+npages) (a BALLOON frame): free ones
        leave the free list and count as ballooned.  Returns how many of them
        were in use (the host took memory the guest was using: lost)."""
        end = pfn + npages
        taken = 0
        i = 0
        while i < len(self._free):
            first, count = self._free[i]
            lo, hi = max(first, pfn), min(first + count, end)
            if lo >= hi:
                i += 1
                continue
            self._take(i, lo, hi - lo)
            self._ballooned.update(range(lo, hi))
            taken += hi - lo
        already = sum(1 for p in range(pfn, end) if p in self._ballooned) - taken
        self._ballooned.update(range(pfn, end))
        return npages - taken - already

    def give_back(self, pfn: int, npages: int) -> None:
        """Pages the balloon held are usable again (unballoon).

        Raises:
            ValueError: a page was not in the balloon (nothing changes)."""
        pages = range(pfn, pfn + npages)
        if npages <= 0 or not all(p in self._ballooned for p in pages):
            raise ValueError(f"pages {pfn:#x}+{npages} are not all ballooned")
        self._ballooned.difference_update(pages)
        self._release(pfn, npages)

    def view_of(self, pfn: int, npages: int) -> memoryview:
        """A writable view of an allocated run."""
        return self.view.translate(pfn * PAGE_SIZE, npages * PAGE_SIZE)

    # -- free-list bookkeeping -----------------------------------------------
    def _take(self, i: int, lo: int, n: int) -> None:
        first, count = self._free.pop(i)
        rest = []
        if lo > first:
            rest.append((first, lo - first))
        if lo + n < first + count:
            rest.append((lo + n, first + count - lo - n))
        self._free[i:i] = rest

    def _release_unballooned(self, first: int, count: int) -> None:
        """Free pages [first, first+count) except the ballooned ones."""
        if not self._ballooned or not any(p in self._ballooned
                                          for p in range(first, first + count)):
            self._release(first, count)
            return
        run = None
        for p in range(first, first + count + 1):
            if p < first + count and p not in self._ballooned:
                run = p if run is None else run
            elif run is not None:
                self._release(run, p - run)
                run = None

    def _release(self, first: int, count: int) -> None:
        i = bisect.bisect_left(self._free, (first, 0))
        self._free.insert(i, (first, count))
        # merge with neighbours
        if i + 1 < len(self._free) and first + count == self._free[i + 1][0]:
            self._free[i] = (first, count + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == first:
            f, c = self._free.pop(i - 1)
            self._free[i - 1] = (f, c + self._free[i - 1][1])
