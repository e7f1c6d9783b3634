"""Guest memory: ranges as sealed memfds, hot-add, balloon (really freed),
exact accounting, grants to the root, and the MEMORY wire message."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

from hv import wire as W
from hv.abi import PAGE_SIZE, HvStatus
from hv.memory import GrantError, GuestMemory, MemoryLimitError
from hv.memwire import GuestMemoryError, MemoryMessage, MemoryOp, MemorySegment
from hv.partition_memory import GpaError, GrantTable, GuestMemoryView
from hv.router import HypercallRouter
from hv.wire import Frame, FrameDecoder, FrameKind, WireError

MiB = 1 << 20
ROOT, CHILD1, CHILD2 = 0, 1, 2


def deliver(msg: MemoryMessage, view):
    """Send ``msg`` over a real socketpair, as the supervisor would, and
    apply what arrives to ``view`` (a GuestMemoryView or a GrantTable)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        W.send_frame(a, msg.frame())
        b.settimeout(5)
        (frame,) = W.recv_frames(b, FrameDecoder())
        return view.apply_frame(frame)
    finally:
        a.close()
        b.close()


@pytest.fixture
def mem():
    m = GuestMemory(CHILD1, 4 * MiB, minimum_bytes=1 * MiB, maximum_bytes=8 * MiB, name="child1")
    view = GuestMemoryView()
    deliver(m.map_message(), view)
    yield m, view
    view.close()
    m.close()


def test_limits_are_checked_with_clear_errors():
    with pytest.raises(MemoryLimitError, match="minimum <= startup <= maximum"):
        GuestMemory(1, 4 * MiB, minimum_bytes=8 * MiB, name="c")
    with pytest.raises(MemoryLimitError, match="minimum <= startup <= maximum"):
        GuestMemory(1, 4 * MiB, maximum_bytes=2 * MiB, name="c")
    with pytest.raises(GuestMemoryError, match="multiple of 4 KiB"):
        GuestMemory(1, 4 * MiB + 1)
    with pytest.raises(MemoryLimitError):
        GuestMemory(1, 0)


def test_startup_range_at_gpa_0_and_exact_accounting(mem):
    m, view = mem
    assert m.ranges == [(0, 1024)] == view.ranges
    assert m.assigned_bytes == 4 * MiB == view.visible_bytes
    assert m.resident_bytes() == 0  # nothing touched yet: the kernel allocated nothing
    view.translate(0, 4 * MiB)[:] = b"\x5a" * (4 * MiB)
    assert m.resident_bytes() == 4 * MiB
    assert m.owns(0) and m.owns(1023) and not m.owns(1024) and not m.owns(-1)


def test_hot_add_grows_accounting_and_the_view_sees_it_at_once(mem):
    m, view = mem
    msg = m.hot_add(2 * MiB)
    assert m.assigned_bytes == 6 * MiB and m.ranges == [(0, 1024), (1024, 512)]
    deliver(msg, view)
    assert view.visible_bytes == 6 * MiB
    view.translate(1024 * PAGE_SIZE, 8)[:] = b"hot-add!"
    # the supervisor's memfd holds what the partition wrote
    assert os.pread(msg.fds[0], 8, 0) == b"hot-add!"
    with pytest.raises(MemoryLimitError, match="would exceed its maximum of 8 MiB"):
        m.hot_add(4 * MiB)
    aligned = m.hot_add(1 * MiB, align_bytes=4 * MiB)
    assert aligned.segments[0].gpa_pfn == 2048  # the next 4 MiB boundary after 6 MiB
    assert m.assigned_bytes == 7 * MiB


def test_balloon_returns_memory_to_the_kernel(mem):
    m, view = mem
    view.translate(0, 4 * MiB)[:] = b"\x01" * (4 * MiB)
    fd = m.map_message().fds[0]
    blocks_before = os.fstat(fd).st_blocks
    deliver(m.balloon([(512, 256), (900, 100)]), view)
    freed = (256 + 100) * PAGE_SIZE
    assert (blocks_before - os.fstat(fd).st_blocks) * 512 == freed
    assert m.assigned_bytes == 4 * MiB - freed == view.visible_bytes
    assert m.resident_bytes() == 4 * MiB - freed
    with pytest.raises(GpaError, match="ballooned"):
        view.page(600)
    with pytest.raises(GpaError):
        view.translate(511 * PAGE_SIZE, 2 * PAGE_SIZE)  # straddles into the balloon
    assert bytes(view.page(511)[:1]) == b"\x01"
    assert not m.owns(600) and m.owns(511)


def test_balloon_rules_are_all_or_nothing(mem):
    m, _view = mem
    with pytest.raises(GuestMemoryError, match="not within one range"):
        m.balloon([(0, 1), (1000, 100)])
    m.balloon([(10, 1)])
    with pytest.raises(GuestMemoryError, match="already ballooned"):
        m.balloon([(9, 3)])
    with pytest.raises(MemoryLimitError, match="below its minimum of 1 MiB"):
        m.balloon([(100, 800)])
    assert m.assigned_bytes == 4 * MiB - PAGE_SIZE  # nothing else changed
    g = m.share_with_root(CHILD1, [20])
    with pytest.raises(GuestMemoryError, match="shared with the root"):
        m.balloon([(20, 1)])
    m.revoke(g.grant_id)
    m.balloon([(20, 1)])


def test_unballoon_and_balloon_bytes(mem):
    m, view = mem
    msg = m.balloon_bytes(1 * MiB)
    assert [(s.gpa_pfn, s.npages) for s in msg.segments] == [(768, 256)]  # the top pages
    deliver(msg, view)
    assert view.visible_bytes == 3 * MiB
    deliver(m.unballoon([(768, 256)]), view)
    assert m.assigned_bytes == 4 * MiB == view.visible_bytes
    assert bytes(view.page(1023)[:4]) == bytes(4)  # it comes back zero-filled
    with pytest.raises(GuestMemoryError, match="not all ballooned"):
        m.unballoon([(0, 1)])
    with pytest.raises(GuestMemoryError):
        m.balloon_bytes(4 * MiB)  # only 3 MiB may go (minimum 1 MiB)


def test_balloon_bytes_across_a_hot_added_range(mem):
    m, view = mem
    deliver(m.hot_add(2 * MiB), view)          # pfns 1024..1535, a second memfd
    msg = m.balloon_bytes(3 * MiB)             # all of it plus 1 MiB of the first range
    assert sorted((s.gpa_pfn, s.npages) for s in msg.segments) == [(768, 256), (1024, 512)]
    deliver(msg, view)
    assert m.assigned_bytes == 3 * MiB == view.visible_bytes
    with pytest.raises(GuestMemoryError, match="below its minimum"):
        m.balloon_bytes(3 * MiB)


def test_audit_catches_a_partition_touching_ballooned_pages(mem):
    m, _view = mem
    m.balloon([(100, 10)])
    fd = m.map_message().fds[0]
    os.pwrite(fd, b"sneaky", 105 * PAGE_SIZE)  # what a rogue partition could do
    assert m.resident_bytes() == PAGE_SIZE
    assert m.audit() == 1
    assert m.resident_bytes() == 0


def test_memfds_are_sealed(mem):
    m, _view = mem
    fd = m.map_message().fds[0]
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)  # would SIGBUS the root's mapping of a grant
    with pytest.raises(PermissionError):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # would block ballooning


def test_share_with_root_grants_only_own_pages(mem):
    m, view = mem
    with pytest.raises(GrantError) as e:
        m.share_with_root(CHILD2, [0])  # someone else asks for child1's memory
    assert e.value.status == HvStatus.ACCESS_DENIED
    m.balloon([(50, 1)])
    for bad in ([1024], [50], [1, 2, 1], [-1], []):
        with pytest.raises(GrantError):
            m.share_with_root(CHILD1, bad)
    assert m.grants == {}
    view.translate(3 * PAGE_SIZE, 5)[:] = b"ring!"
    g = m.share_with_root(CHILD1, [3, 4, 5, 7])
    assert [(s.gpa_pfn, s.npages, s.file_pfn) for s in g.message.segments] == [
        (3, 3, 3),
        (7, 1, 7),
    ]
    table = GrantTable()
    try:
        deliver(g.message, table)
        gm = table.get(g.grant_id)
        assert gm.owner == CHILD1 and gm.pfns == [3, 4, 5, 7]
        assert bytes(gm.page(0)[:5]) == b"ring!"
        gm.page(3)[:4] = b"back"  # the root writes, the child sees it
        assert bytes(view.page(7)[:4]) == b"back"
        with pytest.raises(GpaError):
            gm.contiguous()  # two runs
        # views_packed: consecutive pages of one mapping are one view, a page
        # of another mapping (5 -> 7 is a new run) another; foreign pages None
        packed = struct.pack("<4Q", 3, 4, 5, 7)
        vs = table.views_packed(CHILD1, packed)
        assert [v.nbytes for v in vs] == [3 * PAGE_SIZE, PAGE_SIZE]
        assert bytes(vs[0][:5]) == b"ring!" and bytes(vs[1][:4]) == b"back"
        assert table.views_packed(CHILD1, packed) is vs  # cached
        big = struct.pack("<33Q", *([3] * 33))  # more than 32 pages: made each time
        assert table.views_packed(CHILD1, big) is not table.views_packed(CHILD1, big)
        assert [v.nbytes for v in table.views_packed(CHILD1, struct.pack("<2Q", 5, 4))] == [
            PAGE_SIZE, PAGE_SIZE]  # not in grant order: two views
        assert table.views_packed(CHILD2, packed) is None
        assert table.views_packed(CHILD1, struct.pack("<2Q", 5, 6)) is None
        del vs
        deliver(MemoryMessage.from_frame(m.revoke(g.grant_id)), table)
        assert table.get(g.grant_id) is None
        # a revoked grant's pages are gone from the cache at once
        assert table.views_packed(CHILD1, packed) is None
    finally:
        table.close()


def test_router_share_pages_rogue_gets_nothing():
    r = HypercallRouter(root_id=ROOT)
    m1 = GuestMemory(CHILD1, 1 * MiB, name="child1")
    m2 = GuestMemory(CHILD2, 1 * MiB, name="child2")
    try:
        r.add_partition(ROOT, None)
        r.add_partition(CHILD1, None, memory=m1)
        r.add_partition(CHILD2, None, memory=m2)
        # child2's GPA space has 256 pages: page 300 is not child2's (nor anyone's it may see)
        assert r.share_pages(CHILD2, [1, 300]) == (HvStatus.ACCESS_DENIED, 0)
        assert r.share_pages(ROOT, [1]) == (HvStatus.INVALID_PARAMETER, 0)
        assert not r.outbox and m2.grants == {}
        st, gid = r.share_pages(CHILD1, [1, 2])
        assert st == HvStatus.SUCCESS and gid
        ((to, frame),) = r.take_outbox()
        assert to == ROOT and frame.kind == FrameKind.MEMORY and len(frame.fds) == 1
        # only the owner may revoke
        assert r.revoke_grant(CHILD2, gid) == HvStatus.INVALID_PARAMETER
        assert r.revoke_grant(CHILD1, gid) == HvStatus.SUCCESS
        ((to, frame),) = r.take_outbox()
        assert MemoryMessage.from_frame(frame).op == MemoryOp.REVOKE
        # a child that goes away takes its grants with it
        r.share_pages(CHILD1, [5])
        r.take_outbox()
        r.remove_partition(CHILD1)
        ((to, frame),) = r.take_outbox()
        assert MemoryMessage.from_frame(frame).op == MemoryOp.REVOKE and m1.grants == {}
        # ... even if its memory was closed first
        _st, gid2 = r.share_pages(CHILD2, [7])
        r.take_outbox()
        m2.close()
        r.remove_partition(CHILD2)
        ((to, frame),) = r.take_outbox()
        msg = MemoryMessage.from_frame(frame)
        assert (to, msg.op, msg.grant_id) == (ROOT, MemoryOp.REVOKE, gid2)
    finally:
        m1.close()
        m2.close()


def test_memory_message_bytes():
    msg = MemoryMessage(MemoryOp.BALLOON, 3, [MemorySegment(0x10, 2), MemorySegment(0x20, 1)])
    f = msg.frame()
    assert f.kind == FrameKind.MEMORY
    # op u32, count u32, owner u64, grant u64, then {gpa u64, npages u64, file_pfn u64, fd u32, 0}
    assert f.body == bytes.fromhex(
        "02000000" "02000000" "0300000000000000" "0000000000000000"
        "1000000000000000" "0200000000000000" "0000000000000000" "ffffffff" "00000000"
        "2000000000000000" "0100000000000000" "0000000000000000" "ffffffff" "00000000"
    )
    back = MemoryMessage.from_frame(f)
    assert (back.op, back.owner, back.segments) == (msg.op, 3, msg.segments)


@pytest.mark.parametrize(
    "body",
    [
        bytes.fromhex("09000000" "00000000") + bytes(16),  # unknown op
        bytes.fromhex("01000000" "01000000") + bytes(16),  # count 1, no segment
        bytes.fromhex("01000000" "01000000") + bytes(16) + bytes(8) + (1).to_bytes(8, "little")
        + bytes(8) + bytes(4) + b"\x01\0\0\0",  # rsvdz set
        bytes.fromhex("01000000" "01000000") + bytes(16) + bytes(40),  # 0 pages
        bytes.fromhex("01000000" "01000000") + bytes(16) + bytes(8) + (1).to_bytes(8, "little")
        + bytes(8) + (1).to_bytes(4, "little") + bytes(4),  # fd index 1 of 1
    ],
)
def test_malformed_memory_messages_are_rejected_and_fds_closed(body):
    fd = os.eventfd(0)
    with pytest.raises(WireError):
        MemoryMessage.from_frame(Frame(FrameKind.MEMORY, 0, body, [fd]))
    with pytest.raises(OSError):
        os.fstat(fd)


def test_view_rejects_overlaps_and_short_memfds(mem):
    m, view = mem
    with pytest.raises(WireError, match="overlaps"):
        deliver(m.map_message(), view)  # the same ranges again
    fd = os.memfd_create("short")
    os.ftruncate(fd, PAGE_SIZE)
    bad = MemoryMessage(MemoryOp.MAP, CHILD1, [MemorySegment(5000, 2, 0, 0)], [fd])
    try:
        with pytest.raises(WireError, match="exceed"):
            deliver(bad, view)
    finally:
        os.close(fd)
    with pytest.raises(WireError):
        deliver(MemoryMessage(MemoryOp.BALLOON, CHILD1, [MemorySegment(5000, 1)]), view)
    with pytest.raises(WireError):
        deliver(MemoryMessage(MemoryOp.GRANT, CHILD1, []), view)  # grants are for the root
    assert view.visible_bytes == 4 * MiB  # unchanged


# --- the partition's RSS really falls ---------------------------------------------------

TOUCHER = textwrap.dedent(
    """
    import mmap, os, sys
    from hv.proc import die_with_parent
    die_with_parent()
    fd, size = int(sys.argv[1]), int(sys.argv[2])
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    os.close(fd)
    m[:] = b"\\x77" * size  # touch every page

    def rss_shmem():
        for line in open("/proc/self/status"):
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
        return -1

    print(rss_shmem(), flush=True)
    sys.stdin.readline()  # the parent balloons now
    print(rss_shmem(), flush=True)
    """
)


@pytest.mark.multiprocess
def test_balloon_makes_the_partitions_rss_fall():
    with GuestMemory(CHILD1, 16 * MiB, minimum_bytes=4 * MiB, name="child1") as m:
        fd = m.map_message().fds[0]
        proc = subprocess.Popen(
            [sys.executable, "-c", TOUCHER, str(fd), str(16 * MiB)],
            pass_fds=(fd,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            before = int(proc.stdout.readline())
            m.balloon([(1024, 2048)])  # 8 MiB back
            proc.stdin.write("\n")
            proc.stdin.flush()
            after = int(proc.stdout.readline())
            proc.wait(timeout=10)
        finally:
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()
        assert before >= 16 * MiB
        assert before - after >= 8 * MiB - 64 * 1024
        assert m.resident_bytes() == 8 * MiB == m.assigned_bytes
