"""The ring against a pure-Python model, one operation at a time.

The model is what the spec says a ring is (vmbus-protocol.md §1): a FIFO of
packets, each using 16 + ext + payload padded to 8 + 8 trailer bytes of a data
area of ``dsize`` bytes; a write fits only if strictly more bytes are free
than it uses; indices advance by those sizes modulo ``dsize``.  On top of
that it models the reader's private read-ahead (packets already copied out
and their space already freed), the interrupt mask, pending_send_sz and the
two signal decisions:

* writer -> reader: the ring (read_index == old write_index) was empty before
  the publication and interrupt_mask == 0;
* reader -> writer: the feature bit is set, pending = pending_send_sz & ~7 is
  non-zero, and the free space went from <= pending to > pending with this
  publication of read_index.

Small rings (8192 / 12288 bytes) starting at random offsets make wraps and a
full ring happen all the time.  The ring lives between two PROT_NONE pages.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from ringtools import (
    CONTROL,
    OFF_INTERRUPT_MASK,
    OFF_PENDING_SEND_SZ,
    OFF_READ_INDEX,
    OFF_WRITE_INDEX,
    guarded_buffer,
    put_u32,
    u32,
)
from vmbus._ring_cffi import lib

from vmbus.doorbell import Doorbell
from vmbus.packet import (
    GpaRange,
    Packet,
    PacketType,
    TransferPageRange,
    build_gpa_direct_header,
    build_xfer_pages_header,
)
from vmbus.ring import IncomingRing, OutgoingRing, PacketView, ReadInfo, init_ring


@dataclass(frozen=True)
class Pkt:
    ptype: PacketType
    flags: int
    tid: int
    payload: bytes  # padded to 8, as a reader sees it
    ranges: Any
    ext_bytes: int

    @property
    def copied(self) -> int:  # len8 * 8: what a batch copies out
        return 16 + self.ext_bytes + len(self.payload)

    @property
    def total(self) -> int:  # what it uses in the ring
        return self.copied + 8


def pad8(b: bytes) -> bytes:
    return b + bytes(-len(b) % 8)


def content(seq: int, n: int) -> bytes:
    return (seq.to_bytes(4, "little") * (n // 4 + 1))[:n]


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.seq = 0

    # ------------------------------------------------------------------ setup
    @initialize(
        ring_bytes=st.sampled_from([8192, 12288]),
        start8=st.integers(0, 2**20),
        readahead=st.sampled_from([1, 2, 5, 256]),
    )
    def setup(self, ring_bytes: int, start8: int, readahead: int) -> None:
        self.buf = self.stack.enter_context(guarded_buffer(ring_bytes))
        init_ring(self.buf)
        self.dsize = ring_bytes - CONTROL
        start = start8 * 8 % self.dsize
        put_u32(self.buf, OFF_WRITE_INDEX, start)  # an empty ring that starts mid-way
        put_u32(self.buf, OFF_READ_INDEX, start)
        self.out = OutgoingRing(self.buf)
        self.inc = IncomingRing(self.buf, readahead_packets=readahead)
        self.stack.callback(self.out.close)
        self.stack.callback(self.inc.close)
        self.bell = self.stack.enter_context(Doorbell())
        self.maxpk = readahead
        self.outsize = max(64 * 1024, self.inc.max_payload_bytes + 16)
        # the model
        self.ring: deque[Pkt] = deque()  # still in shared memory
        self.ahead: deque[Pkt] = deque()  # copied into the read-ahead, space freed
        self.used = 0
        self.w = self.r = start
        self.mask = 0
        self.pending = 0
        self.pending_set = False  # the writer's own flag: it clears what it set
        self.wraps = 0

    def teardown(self) -> None:
        self.stack.close()

    # ------------------------------------------------------------- model ops
    def free(self) -> int:
        return self.dsize - self.used

    def max_payload(self) -> int:
        return self.dsize - 32

    def sizes(self) -> st.SearchStrategy[int]:
        m = self.max_payload()
        return st.one_of(
            st.integers(0, 64),
            st.integers(0, m + 16),
            st.sampled_from([0, 1, 7, 8, m - 8, m - 1, m, m + 1, m + 8]),
            st.just(max(0, self.free() - 32)),  # the exact-fit neighbourhood
            st.just(max(0, self.free() - 24)),
        )

    def model_publish_write(self, pkts: list[Pkt]) -> int:
        """Account a publication of pkts; returns the expected signal count."""
        was_empty = self.used == 0
        for p in pkts:
            self.ring.append(p)
            self.used += p.total
            self.w += p.total
            if self.w >= self.dsize:
                self.w -= self.dsize
                self.wraps += 1
        if self.pending_set:
            self.pending, self.pending_set = 0, False
        return int(was_empty and self.mask == 0)

    def model_commit(self, n: int) -> int:
        """The reader frees the first n ring packets; returns expected signals."""
        before = self.free()
        for _ in range(n):
            p = self.ring.popleft()
            self.used -= p.total
            self.r = (self.r + p.total) % self.dsize
        after = self.free()
        pend = self.pending & ~7
        return int(n > 0 and pend != 0 and before <= pend < after)

    def model_fill(self, n: int) -> int:
        """What one drain C call moves into the read-ahead; returns signals."""
        k, pos = 0, 0
        for p in self.ring:
            if k == min(n, self.maxpk) or pos + p.copied > self.outsize:
                break
            k += 1
            pos += p.copied
        moved = [self.ring[i] for i in range(k)]
        sig = self.model_commit(k)
        self.ahead.extend(moved)
        return sig

    def new_pkt(
        self, size: int, ptype: PacketType, flags: int, ext: bytes = b"", ranges: Any = None
    ) -> Pkt:
        self.seq += 1
        return Pkt(ptype, flags, self.seq, pad8(content(self.seq, size)), ranges, len(ext))

    def check_signals(self, expect_writer: int, expect_reader: int) -> None:
        assert self.out.take_signals() == expect_writer
        assert self.inc.take_signals() == expect_reader

    @staticmethod
    def same(p: Packet, m: Pkt) -> None:
        assert (p.packet_type, p.flags, p.trans_id) == (m.ptype, m.flags, m.tid)
        assert p.payload == m.payload
        assert p.ranges == m.ranges

    # ----------------------------------------------------------------- writer
    @rule(data=st.data(), comp=st.booleans(), ptype=st.sampled_from([6, 11]))
    def try_write(self, data: st.DataObject, comp: bool, ptype: int) -> None:
        size = data.draw(self.sizes(), label="size")
        m = self.new_pkt(size, PacketType(ptype), int(comp))
        payload = content(m.tid, size)
        if m.total >= self.dsize:
            with contextlib.suppress(ValueError):
                self.out.try_write(
                    payload, packet_type=m.ptype, trans_id=m.tid, completion_requested=comp
                )
                raise AssertionError("a packet that can never fit was accepted")
            self.check_signals(0, 0)
            return
        ok = self.out.try_write(
            payload, packet_type=m.ptype, trans_id=m.tid, completion_requested=comp
        )
        fits = self.free() > m.total
        assert ok == fits
        self.check_signals(self.model_publish_write([m]) if fits else 0, 0)

    @rule(data=st.data(), gpa=st.booleans())
    def try_write_ext(self, data: st.DataObject, gpa: bool) -> None:
        size = data.draw(st.integers(0, 300), label="size")
        nr = data.draw(st.integers(1, 3), label="ranges")
        if gpa:
            ranges = tuple(GpaRange(1 + 100 * i, 8 * i, (i,)) for i in range(nr))
            ext = build_gpa_direct_header(ranges)
            m = self.new_pkt(size, PacketType.DATA_USING_GPA_DIRECT, 0, ext, ranges)
            ok = self.out.try_write_gpa_direct(content(m.tid, size), ranges, trans_id=m.tid)
        else:
            ranges = tuple(TransferPageRange(10 * i, 4096 * i) for i in range(nr))
            ext = build_xfer_pages_header(7, ranges)
            m = self.new_pkt(size, PacketType.DATA_USING_XFER_PAGES, 0, ext, ranges)
            ok = self.out.try_write_xfer_pages(content(m.tid, size), 7, ranges, trans_id=m.tid)
        fits = self.free() > m.total
        assert ok == fits
        self.check_signals(self.model_publish_write([m]) if fits else 0, 0)

    @rule(data=st.data())
    def write_many(self, data: st.DataObject) -> None:
        sizes = data.draw(st.lists(self.sizes(), max_size=8), label="sizes")
        payloads = []
        for s in sizes:
            self.seq += 1
            payloads.append(content(self.seq, s))
        # write_many gives every packet of the batch one type and trans_id
        pkts = [Pkt(PacketType.DATA_INBAND, 0, 42, pad8(b), None, 0) for b in payloads]
        if any(p.total >= self.dsize for p in pkts):
            with contextlib.suppress(ValueError):
                self.out.write_many(payloads, trans_id=42)
                raise AssertionError("a packet that can never fit was accepted")
            self.check_signals(0, 0)
            return
        n = self.out.write_many(payloads, trans_id=42)
        k, free = 0, self.free()
        while k < len(pkts) and free > pkts[k].total:
            free -= pkts[k].total
            k += 1
        assert n == k
        self.check_signals(self.model_publish_write(pkts[:k]) if k else 0, 0)

    @rule(need=st.one_of(st.integers(0, 9000), st.sampled_from([0, 8, 24, 4088, 8184])))
    def set_pending_send_sz(self, need: int) -> None:
        """What a writer does before it sleeps (the C call wait_writable makes)."""
        assert lib.vmbr_set_pending(self.out._r, need) == self.free()
        self.pending = (need + 7) & ~7
        self.pending_set = self.pending != 0
        self.check_signals(0, 0)

    @rule(need=st.integers(0, 9000))
    def wait_writable_now(self, need: int) -> None:
        ok = self.out.wait_writable(need, self.bell, 0, spin_ns=0)
        assert ok == (self.free() > need)
        # it leaves its pending size published only when it returns True
        self.pending = (need + 7) & ~7 if ok else 0
        self.pending_set = self.pending != 0
        self.check_signals(0, 0)

    @rule(value=st.integers(0, 2**32 - 1))
    def peer_sets_odd_pending_send_sz(self, value: int) -> None:
        """Some peers write ring size - 1 and the like: the reader masks to 8."""
        put_u32(self.buf, OFF_PENDING_SEND_SZ, value)
        self.pending = value

    # ----------------------------------------------------------------- reader
    @rule()
    def try_read(self) -> None:
        sig = 0
        if not self.ahead:
            sig = self.model_fill(self.maxpk)
        p = self.inc.try_read()
        if not self.ahead:
            assert p is None
        else:
            assert p is not None
            self.same(p, self.ahead.popleft())
        self.check_signals(0, sig)

    @rule(n=st.integers(0, 12))
    def drain(self, n: int) -> None:
        sig = 0
        if not self.ahead:
            sig = self.model_fill(n)
        batch = self.inc.drain(n)
        expect = [self.ahead.popleft() for _ in range(min(n, len(self.ahead)))]
        assert len(batch) == len(expect)
        for p, m in zip(batch, expect, strict=True):
            self.same(p, m)
        assert batch.total_bytes == sum(m.copied for m in expect)
        self.check_signals(0, sig)

    @rule(cap=st.one_of(st.integers(0, 64), st.integers(0, 8192)))
    def read_into(self, cap: int) -> None:
        dst = bytearray(cap)
        sig = 0
        m = self.ahead[0] if self.ahead else (self.ring[0] if self.ring else None)
        if m is not None and len(m.payload) > cap:
            with contextlib.suppress(ValueError):
                self.inc.read_into(dst)
                raise AssertionError("read_into wrote past the caller's buffer")
            self.check_signals(0, 0)
            return
        info = self.inc.read_into(dst)
        if m is None:
            assert info is None
        else:
            if self.ahead:
                self.ahead.popleft()
            else:
                sig = self.model_commit(1)
            assert info == ReadInfo(m.ptype, m.flags, m.tid, len(m.payload), m.ranges)
            assert dst[: len(m.payload)] == m.payload
        self.check_signals(0, sig)

    @rule()
    def peek_and_release(self) -> None:
        sig = 0
        in_place = not self.ahead and bool(self.ring) and self.ring[0].ext_bytes == 0
        if not self.ahead and self.ring and not in_place:
            sig = self.model_fill(1)  # types 7/9 are validated on a copy
        m = self.ahead[0] if self.ahead else (self.ring[0] if self.ring else None)
        v = self.inc.peek()
        if m is None:
            assert v is None
            self.check_signals(0, sig)
            return
        assert isinstance(v, PacketView)
        assert (v.packet_type, v.flags, v.trans_id) == (m.ptype, m.flags, m.tid)
        assert b"".join(bytes(s) for s in v.segments) == m.payload
        if in_place:  # one segment, or two when the payload wraps
            start = (self.r + 16) % self.dsize
            first = min(len(m.payload), self.dsize - start)
            lens = [first] + ([len(m.payload) - first] if len(m.payload) > first else [])
            assert [s.nbytes for s in v.segments] == lens
            if len(lens) == 2:
                event("peek of a wrapped payload")
        self.check_signals(0, sig)
        v.release()
        if in_place:
            sig = self.model_commit(1)
        else:
            self.ahead.popleft()
            sig = 0
        self.check_signals(0, sig)

    @rule()
    def mask(self) -> None:
        self.inc.mask_interrupts()
        self.mask = 1

    @rule()
    def unmask(self) -> None:
        assert self.inc.unmask_interrupts() == self.used  # the re-check
        self.mask = 0

    # ------------------------------------------------------------- invariants
    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "out"):
            return
        assert self.inc.bytes_readable() == self.used
        assert self.out.bytes_writable() == self.free()
        assert self.inc.buffered_packets == len(self.ahead)
        assert 0 <= self.used <= self.dsize - 8  # never completely full

    @invariant()
    def control_page(self) -> None:
        if not hasattr(self, "out"):
            return
        assert u32(self.buf, OFF_WRITE_INDEX) == self.w
        assert u32(self.buf, OFF_READ_INDEX) == self.r
        assert (self.w - self.r) % self.dsize == self.used
        assert u32(self.buf, OFF_INTERRUPT_MASK) == self.mask
        assert u32(self.buf, OFF_PENDING_SEND_SZ) == self.pending
        assert self.out.corrupt is None and self.inc.corrupt is None
        if self.wraps:
            event("write index wrapped")


RingMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=80, deadline=None)
TestRingModel = RingMachine.TestCase
