"""The child's page allocator over its guest memory view (hot-add included)."""

from __future__ import annotations

import pytest
from test_memory import deliver  # a MEMORY frame over a socketpair

from hv.memory import GuestMemory
from hv.partition_memory import GuestMemoryView
from partitions.guestmem import OutOfGuestMemory, PageAllocator

MiB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory(1, 1 * MiB, maximum_bytes=4 * MiB, name="child1")  # 256 pages
    view = GuestMemoryView()
    deliver(m.map_message(), view)
    yield m, view
    view.close()
    m.close()


def test_runs_are_contiguous_first_fit_and_never_page_zero(mem):
    _m, view = mem
    a = PageAllocator(view)
    assert a.free_pages == 255  # page 0 is never handed out
    p1 = a.alloc(10)
    p2 = a.alloc(20)
    assert p1 == 1 and p2 == 11
    a.free(p1)
    assert a.alloc(4) == 1  # first fit reuses the hole
    assert a.alloc(6) == 5
    assert a.used_pages == 30 and a.free_pages == 225


def test_freed_runs_merge_back(mem):
    _m, view = mem
    a = PageAllocator(view)
    runs = [a.alloc(50) for _ in range(5)]
    for p in (runs[1], runs[3], runs[2], runs[0], runs[4]):
        a.free(p)
    assert a.free_pages == 255
    assert a.alloc(255) == 1  # one run again


def test_exhaustion_and_bad_frees(mem):
    _m, view = mem
    a = PageAllocator(view)
    a.alloc(200)
    with pytest.raises(OutOfGuestMemory):
        a.alloc(100)
    with pytest.raises(ValueError):
        a.free(77)
    with pytest.raises(ValueError):
        a.alloc(0)


def test_hot_added_memory_is_usable_at_once(mem):
    m, view = mem
    a = PageAllocator(view)
    a.alloc(255)
    deliver(m.hot_add(1 * MiB), view)
    p = a.alloc(256)  # only fits in the new range
    assert p == 256
    buf = a.view_of(p, 256)
    buf[:5] = b"hello"
    assert bytes(view.translate(p * 4096, 5)) == b"hello"
    buf.release()


def test_a_run_never_straddles_two_ranges(mem):
    m, view = mem
    a = PageAllocator(view)
    deliver(m.hot_add(1 * MiB), view)  # pages 256..511, adjacent
    a.alloc(200)  # 1..200
    p = a.alloc(100)  # 201..300 would cross 255/256: must not
    assert p == 256


def test_balloon_takes_the_highest_free_pages_and_gives_them_back(mem):
    m, view = mem
    a = PageAllocator(view)
    deliver(m.hot_add(1 * MiB), view)  # pages 256..511
    a.alloc(10)
    runs = a.take_highest(300)
    # 256 pages of the hot-added range, then 44 at the top of the first range
    assert runs == [(212, 44), (256, 256)]
    assert a.ballooned_pages == 300 and a.free_pages == 511 - 10 - 300
    with pytest.raises(OutOfGuestMemory):
        a.alloc(250)  # ballooned pages are never handed out
    with pytest.raises(ValueError):
        a.give_back(11, 5)  # not ballooned
    a.give_back(256, 256)
    assert a.alloc(256) == 256
    assert a.total_pages == 511


def test_withdraw_takes_free_pages_out_and_counts_used_ones(mem):
    _m, view = mem
    a = PageAllocator(view)
    p = a.alloc(10)  # 1..10 in use
    assert a.withdraw(5, 20) == 6  # pages 5..10 were in use: lost
    assert a.ballooned_pages == 20 and a.free_pages == 255 - 10 - 14
    assert a.withdraw(5, 20) == 0  # again: nothing more
    with pytest.raises(OutOfGuestMemory):
        a.alloc(250)
    a.free(p)  # pages 1..4 come back; 5..10 stay with the balloon
    assert a.free_pages == 255 - 20 and a.used_pages == 0


def test_a_range_ballooned_before_it_is_synced_keeps_its_ballooned_pages(mem):
    m, view = mem
    a = PageAllocator(view)
    deliver(m.hot_add(1 * MiB), view)  # pages 256..511, not yet seen by the allocator
    a.withdraw(300, 10)  # its BALLOON frame arrives before the next sync
    a.sync()
    assert a.ballooned_pages == 10 and a.free_pages == 255 + 256 - 10
    assert a.total_pages == 511
    got = [a.alloc(1) for _ in range(a.free_pages)]  # every free page, one by one
    assert not set(got) & set(range(300, 310))  # never a ballooned one
    with pytest.raises(OutOfGuestMemory):
        a.alloc(1)
