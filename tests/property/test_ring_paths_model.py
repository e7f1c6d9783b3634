"""Every public read and write path of the ring, interleaved on one ring,
against one pure-Python model (issue 14, point 3).

``test_ring_model.py`` drives the batch paths (try_read, drain, read_into,
peek); this machine drives all of them at random on one ring, and the two
ends of a second ring that ``exchange`` writes its requests on:

* writers: try_write, write (blocking), write_many (the joined, four-per-call
  and gather paths), try_write_gpa_direct (ranges or a prebuilt header),
  try_write_xfer_pages, request_space, wait_writable, and a raw peer that
  forges packets with long in-band extended headers (offset8 * 8 up to the
  largest the ring holds: the Python writer cannot make them);
* readers: try_read, read, try_read_payload, read_payload, drain, drain_into,
  read_into, peek (release, copy, hold across writes, stale), exchange,
  wait_readable, iteration, interrupt masking and unmasking.

The model is the spec's ring (vmbus-protocol.md §1): a FIFO of packets, each
using 16 + ext + payload padded to 8 + 8 trailer bytes; a write fits only if
strictly more bytes are free than it uses.  On top of it the model follows
which C path each call takes, because that decides what is observable: the
reader's private read-ahead (a batch copy frees the space of up to
``readahead_packets`` packets at once, stopping after the packet that
reaches ``readahead_bytes``), the latency reads (``read``, ``read_payload``,
``exchange``: one packet, interrupts left masked; types 7 and 9 go through a
batch), and the two signal decisions, checked exactly, per ring and
direction:

* writer -> reader: the ring was empty before the publication and
  interrupt_mask == 0;
* reader -> writer: pending = pending_send_sz & ~7 is non-zero and the free
  space went from <= pending to > pending with this publication.

Signals go, as in a channel, to the other end's doorbell (an eventfd).  A
blocking call the model says must block sleeps on a ``PeerBell``: its wait
first runs the peer's move queued for it (the peer writes a packet, or frees
space), so the wake-up itself is tested: a signal the ring failed to ask for
leaves the wait to time out, and the model notices.  A blocking call the
model says has its data must not wait at all.

Ring sizes go from one data page (8 KiB) to 4 MiB, each starting at a
random offset, so that wraps, a full ring and packets that exactly fill it
happen all the time.  Both rings live between two PROT_NONE pages.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from ringtools import (
    CONTROL,
    OFF_INTERRUPT_MASK,
    OFF_PENDING_SEND_SZ,
    OFF_READ_INDEX,
    OFF_WRITE_INDEX,
    desc,
    guarded_buffer,
    put_u32,
    trailer,
    u32,
)

from vmbus.doorbell import Doorbell
from vmbus.packet import (
    GpaRange,
    Packet,
    PacketType,
    TransferPageRange,
    build_gpa_direct_header,
    build_xfer_pages_header,
)
from vmbus.ring import (
    DEFAULT_SPIN_NS,
    IncomingRing,
    OutgoingRing,
    PacketView,
    ReadInfo,
    init_ring,
)

RING_SIZES = [8192, 12288, 16384, 69632, 135168, 266240, 1052672, 4198400]
REQUEST_RING_SIZES = [8192, 12288]
LARGEST_PACKET = 524280  # len8 is a u16
SPINS = [0, 2_000, DEFAULT_SPIN_NS]  # 0: the batch path; the others: the latency path
WAKE_S = 5.0  # a wait a queued peer move ends with a ring: it never gets near this
IDLE_S = 0.002  # a wait the model says nobody ends: it times out
#: extended-header sizes around the thresholds of the read paths: 4096 bytes
#: of header (read_into), 64 KiB and 128 KiB of payload offset (a packed result)
EXT_EDGES = [8, 4072, 4080, 4088, 65504, 65512, 65520, 65528, 131040, 131048, 131056, 262128]


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

    @property
    def plain(self) -> bool:  # the latency reads take it; 7 and 9 go through a batch
        return self.ptype not in (
            PacketType.DATA_USING_XFER_PAGES, PacketType.DATA_USING_GPA_DIRECT
        )


def pad8(b: bytes) -> bytes:
    return b + bytes(-len(b) % 8)


def content(seq: int, n: int) -> bytes:
    return (seq.to_bytes(4, "little") * (n // 4 + 1))[:n]


def as_kind(b: bytes, kind: str) -> Any:
    return {"bytes": b, "bytearray": bytearray(b), "memoryview": memoryview(b)}[kind]


class RingModel:
    """One ring as the spec describes it: packets, indices, mask, pending size."""

    def __init__(self, dsize: int, start: int) -> None:
        self.dsize = dsize
        self.ring: deque[Pkt] = deque()  # still in shared memory
        self.used = 0
        self.w = self.r = start
        self.mask = 0
        self.pending = 0  # pending_send_sz as stored
        self.pending_set = False  # the writer's own flag: its next write clears it
        self.wraps = 0

    def free(self) -> int:
        return self.dsize - self.used

    def publish(self, pkts: list[Pkt]) -> int:
        """One publication of write_index; the signals it owes the reader."""
        if not pkts:
            return 0
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

    def commit(self, n: int) -> int:
        """The reader frees the first n packets (one publication); the
        signals it owes the writer."""
        before = self.free()
        for _ in range(n):
            p = self.ring.popleft()
            self.used -= p.total
            self.r = (self.r + p.total) % self.dsize
        pend = self.pending & ~7
        return int(n > 0 and pend != 0 and before <= pend < self.free())

    def set_pending(self, need: int) -> None:
        self.pending = (need + 7) & ~7
        self.pending_set = self.pending != 0


class Wire:
    """An end's on_signal: counts the signals and rings the peer's doorbell."""

    def __init__(self, bell: Doorbell) -> None:
        self.bell = bell
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        self.bell.ring()

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


class PeerBell(Doorbell):
    """A doorbell whose waits first run the peer's moves queued for them, one
    per wait: what the peer does while this end sleeps."""

    def __init__(self) -> None:
        super().__init__()
        self.moves: list[Callable[[], None]] = []
        self.calls = 0
        self.woken: list[bool] = []

    def wait(self, timeout: float) -> bool:
        self.calls += 1
        if self.moves:
            self.moves.pop(0)()
        rung = super().wait(timeout)
        self.woken.append(rung)
        return rung


def poke(buf: memoryview, dsize: int, off: int, body: bytes) -> int:
    """Copy body into the data area at off (wrapping), as a peer would; the
    offset after it."""
    first = min(len(body), dsize - off)
    buf[CONTROL + off : CONTROL + off + first] = body[:first]
    if len(body) > first:
        buf[CONTROL : CONTROL + len(body) - first] = body[first:]
    return (off + len(body)) % dsize


class RingPathsMachine(RuleBasedStateMachine):
    """Ring 1 carries packets from ``out`` (the peer, B) to ``inc`` (us, A);
    ring 2 carries ``exchange``'s requests from ``out2`` (A) to ``inc2`` (B).
    A's doorbell is ``bell_a``, B's ``bell_b``."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.seq = 0
        self.view: PacketView | None = None  # a view held across other calls
        self.view_pkt: Pkt | None = None
        self.view_in_place = False
        self.view_stale = False

    # ------------------------------------------------------------------ setup
    @initialize(
        ring_bytes=st.sampled_from(RING_SIZES),
        ring2_bytes=st.sampled_from(REQUEST_RING_SIZES),
        start=st.one_of(st.integers(0, 2**26), st.integers(1, 64)),
        start2=st.integers(0, 2**20),
        readahead=st.sampled_from([1, 2, 5, 256]),
        readahead_bytes=st.sampled_from([1, 4096, 64 * 1024]),
    )
    def setup(
        self,
        ring_bytes: int,
        ring2_bytes: int,
        start: int,
        start2: int,
        readahead: int,
        readahead_bytes: int,
    ) -> None:
        dsize = ring_bytes - CONTROL
        # small starts count back from the end: a wrap comes soon in any ring
        start = (dsize - start * 8) % dsize if start <= 64 else start * 8 % dsize
        self.buf = self.make_ring(ring_bytes, start)
        dsize2 = ring2_bytes - CONTROL
        start2 = start2 * 8 % dsize2
        self.buf2 = self.make_ring(ring2_bytes, start2)
        self.bell_a = self.stack.enter_context(PeerBell())
        self.bell_b = self.stack.enter_context(PeerBell())
        self.w1, self.r1 = Wire(self.bell_a), Wire(self.bell_b)
        self.w2, self.r2 = Wire(self.bell_b), Wire(self.bell_a)
        self.out = OutgoingRing(self.buf, on_signal=self.w1)
        self.inc = IncomingRing(
            self.buf, on_signal=self.r1, readahead_packets=readahead,
            readahead_bytes=readahead_bytes,
        )
        self.out2 = OutgoingRing(self.buf2, on_signal=self.w2)
        self.inc2 = IncomingRing(self.buf2, on_signal=self.r2, readahead_packets=1)
        self.inc.bind_reply_ring(self.out2)
        self.stack.callback(lambda: self.out.close())  # (out is re-attached at times)
        for end in (self.inc, self.out2, self.inc2):
            self.stack.callback(end.close)
        # the model
        self.m = RingModel(dsize, start)
        self.m2 = RingModel(dsize2, start2)
        self.ahead: deque[Pkt] = deque()  # copied into the read-ahead, space freed
        self.maxpk = readahead
        self.batch = readahead_bytes
        self.outsize = max(readahead_bytes, self.inc.max_payload_bytes + 16)
        self.spin = DEFAULT_SPIN_NS  # the latency reads' C spin (the last non-zero asked)
        self.largest = min(LARGEST_PACKET, dsize - 16)  # len8 * 8 of the largest packet
        assert self.inc.max_payload_bytes == self.largest - 16
        event(f"ring of {ring_bytes} bytes")

    def make_ring(self, ring_bytes: int, start: int) -> memoryview:
        buf = self.stack.enter_context(guarded_buffer(ring_bytes))
        init_ring(buf)
        put_u32(buf, OFF_WRITE_INDEX, start)  # an empty ring that starts mid-way
        put_u32(buf, OFF_READ_INDEX, start)
        return buf

    def teardown(self) -> None:
        if self.view is not None:
            with contextlib.suppress(ValueError):
                self.view.release()
        self.stack.close()

    # ---------------------------------------------------------- model helpers
    def max_payload(self) -> int:
        return self.largest - 16

    def sizes(self) -> st.SearchStrategy[int]:
        m = self.max_payload()
        exact = max(0, self.m.free() - 32)  # leaves 8 bytes free: the ring is full
        return st.one_of(
            st.integers(0, 64),
            st.integers(0, min(m, 4200)),
            st.integers(0, m + 16),
            st.sampled_from([0, 1, 7, 8, 4095, 4096, m - 8, m - 1, m, m + 1, m + 8]),
            st.sampled_from([exact, exact + 1, exact + 8]),  # fits, just does not
        )

    def next_tid(self) -> int:
        self.seq += 1
        return self.seq

    def new_pkt(
        self, size: int, ptype: PacketType, flags: int, ext: bytes = b"", ranges: Any = None,
        tid: int | None = None,
    ) -> tuple[Pkt, bytes]:
        tid = self.next_tid() if tid is None else tid
        payload = content(self.seq, size)
        return Pkt(ptype, flags, tid, pad8(payload), ranges, len(ext)), payload

    def fill(self, limit: int) -> int:
        """What one batch copy (vmbr_drain_io) moves into the read-ahead;
        the signals it owes the writer."""
        k = pos = 0
        for p in self.m.ring:
            if k >= min(limit, self.maxpk) or pos >= self.batch or pos + p.copied > self.outsize:
                break
            k += 1
            pos += p.copied
        moved = [self.m.ring[i] for i in range(k)]
        sig = self.m.commit(k)
        self.ahead.extend(moved)
        return sig

    def take_batch(self) -> tuple[Pkt | None, int]:
        """try_read: the read-ahead first, else a batch copy."""
        sig = 0
        if not self.ahead:
            sig = self.fill(self.maxpk)
        return (self.ahead.popleft() if self.ahead else None), sig

    def take_latency(self) -> tuple[Pkt | None, int]:
        """vmbr_spin_read_io / vmbr_spin_read_payload_io: interrupts masked
        (and left so), one plain packet copied out and published; a type 7
        or 9 packet is left to a batch copy."""
        self.m.mask = 1
        if not self.m.ring:
            return None, 0
        head = self.m.ring[0]
        if not head.plain:
            return self.take_batch()
        sig = self.m.commit(1)
        if sig:
            event("a latency read owed the writer a signal")
        if head.ext_bytes + 16 >= 65536:
            event("a latency read of a payload offset >= 64 KiB")
        return head, sig

    def start_read(self, spin: int) -> tuple[Pkt | None, int, bool]:
        """A blocking read up to the point where it would sleep: (packet,
        signals owed the writer, blocks).  When it blocks, the state is the
        one the sleep sees (wait_readable unmasked before it)."""
        if self.ahead:
            return self.ahead.popleft(), 0, False
        if spin:
            self.spin = spin  # any non-zero spin becomes the C spin
            p, sig = self.take_latency()
            if p is None:
                sig += self.take_batch()[1]  # try_read's copy finds nothing
        else:
            p, sig = self.take_batch()
        if p is not None:
            return p, sig, False
        self.m.mask = 0
        return None, sig, True

    def finish_read(self, woken: bool) -> tuple[Pkt | None, int]:
        """After a sleep: woken by the peer's packet, the wake-up's re-check
        finds it and try_read copies a batch; else the read timed out."""
        if not woken:
            return None, 0
        return self.take_batch()

    def check_signals(self, **expect: int) -> None:
        """Signals since the last check, per wire (w1, r1, w2, r2); the
        wires not named are left for the caller."""
        for name, n in expect.items():
            assert getattr(self, name).take() == n, f"{name} signals"

    def quiet(self) -> None:
        """Before a blocking call: no rings left over in either doorbell (a
        left-over ring would wake a sleep the peer's move should wake)."""
        self.bell_a.clear()
        self.bell_b.clear()
        self.bell_a.moves.clear()
        self.bell_b.moves.clear()

    def same(self, p: Packet, m: Pkt) -> None:
        assert (p.packet_type, p.flags, p.trans_id) == (m.ptype, m.flags, m.tid)
        assert p.payload == m.payload, f"payload of packet {m.tid} ({len(m.payload)} bytes)"
        assert p.ranges == m.ranges

    def same_payload(self, got: Any, m: Pkt | None) -> None:
        if m is None:
            assert got is None
        else:
            assert got is not None, f"packet {m.tid} not delivered"
            assert bytes(got) == m.payload, f"payload of packet {m.tid} ({len(m.payload)} bytes)"

    def stale_view(self) -> None:
        """A reader call delivered a packet: a held view no longer shows the next one."""
        if self.view is not None:
            self.view_stale = True

    def no_view(self) -> bool:
        return self.view is None

    # ------------------------------------------------------- the peer's moves
    def peer_writes(self, data: st.DataObject) -> Callable[[], None]:
        """A move: the peer (B) writes one packet to the empty ring 1, by a
        random path; its signal wakes A's sleep."""

        def move() -> None:
            how = data.draw(st.sampled_from(["try_write", "gpa", "forge"]), label="peer writes")
            size = data.draw(st.integers(0, 300), label="peer size")
            if how == "forge" and self.forge_one(data, PacketType.DATA_INBAND, size):
                return
            if how == "gpa":
                ranges = (GpaRange(100, 8, (3,)),)
                m, payload = self.new_pkt(
                    size, PacketType.DATA_USING_GPA_DIRECT, 0,
                    build_gpa_direct_header(ranges), ranges,
                )
                assert self.out.try_write_gpa_direct(payload, ranges, trans_id=m.tid)
            else:
                m, payload = self.new_pkt(size, PacketType.DATA_INBAND, 0)
                assert self.out.try_write(payload, trans_id=m.tid)
            self.check_signals(w1=self.m.publish([m]))

        return move

    def peer_frees(self, need: int) -> Callable[[], None]:
        """A move: A reads (try_read) until ring 1 has more than need bytes free."""

        def move() -> None:
            while self.m.free() <= need:
                m, sig = self.take_batch()
                p = self.inc.try_read()
                assert p is not None and m is not None
                self.same(p, m)
                self.check_signals(r1=sig)

        return move

    def peer_answers(self, need: int) -> Callable[[], None]:
        """A move: B reads requests until ring 2 has more than need bytes free."""

        def move() -> None:
            while self.m2.free() <= need:
                self.read_request()

        return move

    # --------------------------------------------------------- writers (B)
    @rule(
        data=st.data(), comp=st.booleans(), ptype=st.sampled_from([6, 11]),
        kind=st.sampled_from(["bytes", "bytearray", "memoryview"]),
    )
    def try_write(self, data: st.DataObject, comp: bool, ptype: int, kind: str) -> None:
        size = data.draw(self.sizes(), label="size")
        m, payload = self.new_pkt(size, PacketType(ptype), int(comp))
        if size > self.max_payload():
            with pytest.raises(ValueError):
                self.out.try_write(
                    as_kind(payload, kind), packet_type=m.ptype, trans_id=m.tid,
                    completion_requested=comp,
                )
            self.check_signals(w1=0)
            return
        ok = self.out.try_write(
            as_kind(payload, kind), packet_type=m.ptype, trans_id=m.tid,
            completion_requested=comp,
        )
        fits = self.m.free() > m.total
        assert ok == fits
        if fits and self.m.free() == m.total + 8:
            event("a packet filled the ring exactly")
        self.check_signals(w1=self.m.publish([m]) if fits else 0)

    @rule(data=st.data(), spin=st.sampled_from([0, 2_000]), peer=st.booleans(),
          comp=st.booleans())
    def write(self, data: st.DataObject, spin: int, peer: bool, comp: bool) -> None:
        """Blocking write: no wait when it fits; else it sleeps with
        pending_send_sz published, and A's reads wake it (or it times out)."""
        self.quiet()
        size = data.draw(self.sizes().map(lambda n: min(n, self.max_payload())), label="size")
        m, payload = self.new_pkt(size, PacketType.DATA_INBAND, int(comp))
        calls = self.bell_b.calls
        if self.m.free() > m.total:
            assert self.out.write(
                payload, self.bell_b, WAKE_S, spin_ns=spin, trans_id=m.tid,
                completion_requested=comp,
            )
            assert self.bell_b.calls == calls, "write() waited with room in the ring"
            self.check_signals(w1=self.m.publish([m]), r1=0)
            return
        self.m.set_pending(m.total)  # what its sleep sees
        if peer and self.no_view():
            self.bell_b.moves.append(self.peer_frees(m.total))
            ok = self.out.write(
                payload, self.bell_b, WAKE_S, spin_ns=spin, trans_id=m.tid,
                completion_requested=comp,
            )
            assert ok
            assert self.bell_b.woken[-1], "the reader freed the space but never signalled"
            assert not self.bell_b.moves
            event("write() slept and was woken")
            self.check_signals(w1=self.m.publish([m]), r1=0)
        else:
            assert not self.out.write(
                payload, self.bell_b, IDLE_S, spin_ns=spin, trans_id=m.tid,
                completion_requested=comp,
            )
            self.m.set_pending(0)  # a writer that gives up withdraws its request
            self.check_signals(w1=0, r1=0)

    @rule(data=st.data(), ptype=st.sampled_from([6, 11]), comp=st.booleans(),
          kind=st.sampled_from(["bytes", "bytes", "bytearray"]))
    def write_many(self, data: st.DataObject, ptype: int, comp: bool, kind: str) -> None:
        sizes = data.draw(st.lists(self.sizes(), max_size=9), label="sizes")
        tid = self.next_tid()
        payloads = [content(tid + i, s) for i, s in enumerate(sizes)]
        # write_many gives every packet of the batch one type, flags and trans_id
        pkts = [Pkt(PacketType(ptype), int(comp), tid, pad8(b), None, 0) for b in payloads]
        args = [as_kind(b, kind) for b in payloads]
        if any(s > self.max_payload() for s in sizes):
            with pytest.raises(ValueError):
                self.out.write_many(
                    args, packet_type=PacketType(ptype), trans_id=tid, completion_requested=comp
                )
            self.check_signals(w1=0)
            return
        n = self.out.write_many(
            args, packet_type=PacketType(ptype), trans_id=tid, completion_requested=comp
        )
        k, free = 0, self.m.free()
        while k < len(pkts) and free > pkts[k].total:
            free -= pkts[k].total
            k += 1
        assert n == k
        if sizes and sizes[0] >= 4096:
            event("write_many: the gather paths")
        self.check_signals(w1=self.m.publish(pkts[:k]))

    @rule(data=st.data(), gpa=st.booleans(), prebuilt=st.booleans(), comp=st.booleans())
    def try_write_ext(self, data: st.DataObject, gpa: bool, prebuilt: bool, comp: bool) -> None:
        size = data.draw(st.one_of(st.integers(0, 300), self.sizes()), label="size")
        nr = data.draw(st.integers(1, 3), label="ranges")
        flags = int(comp)
        if gpa:
            ranges: Any = tuple(
                GpaRange(1 + 5000 * i, 8 * i, tuple(range(i, i + 1 + (8 * i + 5000 * i) // 4096)))
                for i in range(nr)
            )
            ext = build_gpa_direct_header(ranges)
            m, payload = self.new_pkt(size, PacketType.DATA_USING_GPA_DIRECT, flags, ext, ranges)
            call: Callable[[], bool] = lambda: self.out.try_write_gpa_direct(  # noqa: E731
                payload, ext if prebuilt else ranges, trans_id=m.tid, completion_requested=comp
            )
        else:
            ranges = tuple(TransferPageRange(10 * i, 4096 * i) for i in range(nr - 1))
            ext = build_xfer_pages_header(7, ranges)
            m, payload = self.new_pkt(size, PacketType.DATA_USING_XFER_PAGES, flags, ext, ranges)
            call = lambda: self.out.try_write_xfer_pages(  # noqa: E731
                payload, 7, ranges, trans_id=m.tid, completion_requested=comp
            )
        if m.copied > self.largest:
            with pytest.raises(ValueError):
                call()
            self.check_signals(w1=0)
            return
        ok = call()
        fits = self.m.free() > m.total
        assert ok == fits
        self.check_signals(w1=self.m.publish([m]) if fits else 0)

    @rule(data=st.data())
    def fill_exactly(self, data: st.DataObject) -> None:
        """Largest packets until the last one leaves exactly 8 bytes free."""
        while self.m.free() >= 32:
            size = min(self.max_payload(), self.m.free() - 32)
            m, payload = self.new_pkt(size, PacketType.DATA_INBAND, 0)
            assert self.out.try_write(payload, trans_id=m.tid)
            self.check_signals(w1=self.m.publish([m]))
        assert not self.out.try_write(b"", trans_id=0)  # 24 bytes: no room left
        event("filled the ring exactly")

    def forge_one(
        self, data: st.DataObject, ptype: PacketType, size: int | None = None, big: bool = False
    ) -> bool:
        """A peer's packet with a long extended header, written raw at the
        write index and published (the peer signals as the spec says); the
        writer end is then attached again, as after a hand-over."""
        room = min(self.largest, self.m.free() - 16) - 16  # ext + padded payload
        if room < 8:
            return False
        hdr = b""
        ranges: Any = None
        if ptype == PacketType.DATA_USING_GPA_DIRECT:
            ranges = (GpaRange(4000, 96, (7,)),)
            hdr = build_gpa_direct_header(ranges)
        elif ptype == PacketType.DATA_USING_XFER_PAGES:
            ranges = (TransferPageRange(3, 9),)
            hdr = build_xfer_pages_header(5, ranges)
        if len(hdr) + 8 > room:
            return False
        if size is None:
            edges = [e for e in [*EXT_EDGES, room - 8, room] if len(hdr) <= e <= room]
            big_edges = [e for e in edges if e >= 65504]  # the packed-result edges
            edges = big_edges if big and big_edges else edges + big_edges * 2
            ext = data.draw(
                st.sampled_from(edges or [room]) if big else st.one_of(
                    st.sampled_from(edges or [room]),
                    st.integers(max(1, len(hdr) // 8), room // 8).map(lambda k: 8 * k),
                ),
                label="ext bytes",
            )
            size = data.draw(st.integers(0, room - ext), label="size")
        else:
            ext = max(8, len(hdr))
            if ext + len(pad8(bytes(size))) > room:
                return False
        flags = data.draw(st.integers(0, 1), label="flags")
        m, _ = self.new_pkt(size, ptype, flags, bytes(ext), ranges)
        ext_bytes = hdr + bytes(range(256)) * ((ext - len(hdr)) // 256 + 1)
        body = (
            desc(m.ptype, (16 + ext) // 8, m.copied // 8, flags, m.tid)
            + ext_bytes[:ext]
            + m.payload
            + trailer(self.m.w)
        )
        end = poke(self.buf, self.m.dsize, self.m.w, body)
        put_u32(self.buf, OFF_WRITE_INDEX, end)
        self.m.pending_set = False  # a raw peer leaves pending_send_sz as it is
        if self.m.publish([m]):
            self.bell_a.ring()  # (a raw peer's signal: not the ring's decision)
        self.out.close()
        self.out = OutgoingRing(self.buf, on_signal=self.w1)
        if 16 + ext >= 65536:
            event("a payload offset >= 64 KiB")
        return True

    @rule(data=st.data(), ptype=st.sampled_from([6, 6, 11, 7, 9]))
    def forge_long_header(self, data: st.DataObject, ptype: int) -> None:
        self.forge_one(data, PacketType(ptype))
        self.check_signals(w1=0)

    @precondition(no_view)
    @rule(
        data=st.data(), ptype=st.sampled_from([6, 11]),
        how=st.sampled_from(["read", "read_payload", "exchange"]),
        spin=st.sampled_from(SPINS[1:]),
    )
    def forge_long_header_then_read(
        self, data: st.DataObject, ptype: int, how: str, spin: int
    ) -> None:
        """Empty the ring, write one packet with a long in-band header (past
        64 KiB when the ring has room), and read it at once by a latency path."""
        self.iterate()
        self.forge_one(data, PacketType(ptype), big=True)
        self.check_signals(w1=0)
        if how == "read":
            self.read(data, spin, peer=False)
        elif how == "read_payload":
            self.read_payload(data, spin, peer=False)
        else:
            self.exchange(data, spin, "bytes", peer=False)

    @rule(need=st.one_of(st.integers(0, 9000), st.integers(0, 2**23)))
    def request_space(self, need: int) -> None:
        assert self.out.request_space(need) == (self.m.free() > need)
        self.m.set_pending(need)
        self.check_signals(w1=0, r1=0)

    @rule(data=st.data())
    def request_space_near_the_crossing(self, data: st.DataObject) -> None:
        """A pending size the next read or two cross (or just miss)."""
        head = self.m.ring[0].total if self.m.ring else 0
        free = self.m.free()
        need = data.draw(
            st.sampled_from([free - 8, free, free + head - 8, free + head, free + 2 * head - 8])
            .map(lambda n: max(0, n)),
            label="need",
        )
        self.request_space(need)

    @rule(need=st.integers(0, 9000), spin=st.sampled_from([0, 2_000]), peer=st.booleans())
    def wait_writable(self, need: int, spin: int, peer: bool) -> None:
        self.quiet()
        calls = self.bell_b.calls
        if self.m.free() > need:
            assert self.out.wait_writable(need, self.bell_b, WAKE_S, spin_ns=spin)
            assert self.bell_b.calls == calls
            if not spin:  # (a spin that finds the room publishes nothing)
                self.m.set_pending(need)
            self.check_signals(r1=0)
            return
        self.m.set_pending(need)
        if peer and self.no_view() and need < self.m.dsize:
            self.bell_b.moves.append(self.peer_frees(need))
            assert self.out.wait_writable(need, self.bell_b, WAKE_S, spin_ns=spin)
            assert self.bell_b.woken[-1], "the reader freed the space but never signalled"
        else:
            assert not self.out.wait_writable(need, self.bell_b, IDLE_S, spin_ns=spin)
            self.m.set_pending(0)
        self.check_signals(r1=0)

    @rule(value=st.integers(0, 2**32 - 1))
    def peer_sets_odd_pending_send_sz(self, value: int) -> None:
        """Some peers write ring size - 1 and the like: the reader masks to 8."""
        put_u32(self.buf, OFF_PENDING_SEND_SZ, value)
        self.m.pending = value

    # ------------------------------------------------------------- readers (A)
    @precondition(no_view)
    @rule()
    def try_read(self) -> None:
        m, sig = self.take_batch()
        p = self.inc.try_read()
        if m is None:
            assert p is None
        else:
            assert p is not None
            self.same(p, m)
        self.check_signals(r1=sig, w1=0)

    @precondition(no_view)
    @rule()
    def try_read_payload(self) -> None:
        m, sig = self.take_batch()
        self.same_payload(self.inc.try_read_payload(), m)
        self.check_signals(r1=sig, w1=0)

    @precondition(no_view)
    @rule()
    def iterate(self) -> None:
        got = list(self.inc)
        sig = 0
        for p in got:
            m, s = self.take_batch()
            assert m is not None
            self.same(p, m)
            sig += s
        assert self.take_batch() == (None, 0)
        self.check_signals(r1=sig, w1=0)

    def blocking_read(
        self, data: st.DataObject, spin: int, peer: bool, call: Callable[[float], Any]
    ) -> tuple[Any, Pkt | None]:
        """Run a blocking read ``call(timeout)`` against the model: no wait
        when the model has a packet; else a sleep that the peer's packet
        ends (a signal the ring must ask for), or a timeout."""
        self.quiet()
        calls = self.bell_a.calls
        m, sig, blocks = self.start_read(spin)
        if not blocks:
            got = call(WAKE_S)
            assert self.bell_a.calls == calls, "a blocking read waited with data in the ring"
            self.check_signals(r1=sig)
            return got, m
        if peer:
            self.bell_a.moves.append(self.peer_writes(data))
        got = call(WAKE_S if peer else IDLE_S)
        if peer:
            assert not self.bell_a.moves, "the read never slept"
            assert self.bell_a.woken[-1], "the writer wrote to an empty ring but never signalled"
            event("a blocking read slept and was woken")
        m, sig2 = self.finish_read(peer)
        self.check_signals(r1=sig + sig2)
        return got, m

    @precondition(no_view)
    @rule(data=st.data(), spin=st.sampled_from(SPINS), peer=st.booleans())
    def read(self, data: st.DataObject, spin: int, peer: bool) -> None:
        p, m = self.blocking_read(
            data, spin, peer, lambda t: self.inc.read(self.bell_a, t, spin_ns=spin)
        )
        if m is None:
            assert p is None
        else:
            assert p is not None, f"packet {m.tid} not delivered"
            self.same(p, m)

    @precondition(no_view)
    @rule(data=st.data(), spin=st.sampled_from(SPINS), peer=st.booleans())
    def read_payload(self, data: st.DataObject, spin: int, peer: bool) -> None:
        got, m = self.blocking_read(
            data, spin, peer, lambda t: self.inc.read_payload(self.bell_a, t, spin_ns=spin)
        )
        self.same_payload(got, m)

    @precondition(no_view)
    @rule(data=st.data(), spin=st.sampled_from(SPINS), peer=st.booleans())
    def wait_readable(self, data: st.DataObject, spin: int, peer: bool) -> None:
        self.quiet()
        calls = self.bell_a.calls
        if self.ahead or self.m.ring:
            assert self.inc.wait_readable(self.bell_a, WAKE_S, spin_ns=spin)
            assert self.bell_a.calls == calls
            if not self.ahead:
                self.m.mask = int(spin != 0)  # a spin masks; the unmask's re-check finds it
            return
        self.m.mask = 0
        if peer:
            self.bell_a.moves.append(self.peer_writes(data))
            assert self.inc.wait_readable(self.bell_a, WAKE_S, spin_ns=spin)
            assert self.bell_a.woken[-1], "the writer wrote to an empty ring but never signalled"
        else:
            assert not self.inc.wait_readable(self.bell_a, IDLE_S, spin_ns=spin)
        self.check_signals(r1=0)

    @precondition(no_view)
    @rule(n=st.integers(0, 12))
    def drain(self, n: int) -> None:
        sig = self.fill(n) if not self.ahead else 0
        batch = self.inc.drain(n)
        expect = [self.ahead.popleft() for _ in range(min(n, len(self.ahead)))]
        assert len(batch) == len(expect)
        for p, m in zip(batch, expect, strict=True):
            self.same(p, m)
        assert batch.payloads() == [m.payload for m in expect]
        assert batch.total_bytes == sum(m.copied for m in expect)
        self.check_signals(r1=sig, w1=0)

    def next_pkt(self) -> Pkt | None:
        return self.ahead[0] if self.ahead else (self.m.ring[0] if self.m.ring else None)

    def caps(self, n: int) -> st.SearchStrategy[int]:
        return st.one_of(st.sampled_from([n, n + 8, max(0, n - 1), 0, 64]), st.integers(0, n + 64))

    @precondition(no_view)
    @rule(data=st.data())
    def read_into(self, data: st.DataObject) -> None:
        m = self.next_pkt()
        cap = data.draw(self.caps(len(m.payload) if m else 64), label="cap")
        dst = bytearray(cap)
        sig = 0
        if m is not None and not self.ahead and m.ext_bytes + 16 > 4096:
            sig = self.fill(self.maxpk)  # a huge header: read through a batch copy
        if m is not None and len(m.payload) > cap:
            with pytest.raises(ValueError):
                self.inc.read_into(dst)
            self.check_signals(r1=sig, w1=0)
            return
        info = self.inc.read_into(dst)
        if m is None:
            assert info is None
        else:
            if self.ahead:
                self.ahead.popleft()
            else:
                sig = self.m.commit(1)
            assert info == ReadInfo(m.ptype, m.flags, m.tid, len(m.payload), m.ranges)
            assert dst[: len(m.payload)] == m.payload
        self.check_signals(r1=sig, w1=0)

    @precondition(no_view)
    @rule(data=st.data(), n=st.integers(0, 12))
    def drain_into(self, data: st.DataObject, n: int) -> None:
        if self.ahead:  # the read-ahead first: one packet, as read_into
            m = self.ahead[0]
            dst = bytearray(data.draw(self.caps(len(m.payload)), label="cap"))
            if len(m.payload) > len(dst):
                with pytest.raises(ValueError):
                    self.inc.drain_into(dst, n)
            else:
                got = self.inc.drain_into(dst, n)
                assert self.ahead.popleft() is m
                assert list(got) == [ReadInfo(m.ptype, m.flags, m.tid, len(m.payload), m.ranges)]
                assert dst[: len(m.payload)] == m.payload
            self.check_signals(r1=0, w1=0)
            return
        # what the bulk copy takes: up to n (and readahead_packets) packets,
        # stopping before a type 7/9 and before a payload that does not fit
        ring = list(self.m.ring)[: min(n, self.maxpk)]
        sizes = [len(m.payload) for m in ring]
        cap = data.draw(
            st.one_of(st.sampled_from([sum(sizes[:k]) for k in range(len(sizes) + 1)]),
                      self.caps(sizes[0] if sizes else 64)),
            label="cap",
        )
        dst = bytearray(cap)
        k = pos = 0
        while k < len(ring) and ring[k].plain and pos + sizes[k] <= cap:
            pos += sizes[k]
            k += 1
        if k == 0 and ring and ring[0].plain:  # no room for the first payload
            with pytest.raises(ValueError):
                self.inc.drain_into(dst, n)
            self.check_signals(r1=0, w1=0)
            return
        if k == 0 and ring:  # a type 7/9 first: the validating path, one packet
            self.read_into_path_for(ring[0], dst, n)
            return
        got = self.inc.drain_into(dst, n)
        expect = ring[:k]
        sig = self.m.commit(k)
        assert list(got) == [
            ReadInfo(m.ptype, m.flags, m.tid, len(m.payload), None) for m in expect
        ]
        for off, m in zip(got.payload_offsets(), expect, strict=True):
            assert dst[off : off + len(m.payload)] == m.payload
        assert got.payload_bytes == pos
        self.check_signals(r1=sig, w1=0)

    def read_into_path_for(self, m: Pkt, dst: bytearray, n: int) -> None:
        sig = 0
        if m.ext_bytes + 16 > 4096:
            sig = self.fill(self.maxpk)
        if len(m.payload) > len(dst):
            with pytest.raises(ValueError):
                self.inc.drain_into(dst, n)
            self.check_signals(r1=sig, w1=0)
            return
        got = self.inc.drain_into(dst, n)
        if self.ahead:
            self.ahead.popleft()
        else:
            sig = self.m.commit(1)
        assert list(got) == [ReadInfo(m.ptype, m.flags, m.tid, len(m.payload), m.ranges)]
        assert dst[: len(m.payload)] == m.payload
        self.check_signals(r1=sig, w1=0)

    def peek_model(self) -> tuple[Pkt | None, bool, int]:
        """What peek shows: (packet, in place, signals owed by a copy)."""
        sig = 0
        in_place = not self.ahead and bool(self.m.ring) and self.m.ring[0].plain
        if not self.ahead and self.m.ring and not in_place:
            sig = self.fill(1)  # types 7/9 are validated on a copy
        return self.next_pkt(), in_place, sig

    def check_view(self, v: PacketView | None, m: Pkt | None, in_place: bool) -> None:
        if m is None:
            assert v is None
            return
        assert isinstance(v, PacketView)
        assert (v.packet_type, v.flags, v.trans_id) == (m.ptype, m.flags, m.tid)
        assert b"".join(bytes(s) for s in v.segments) == m.payload
        assert v.payload_bytes == len(m.payload)
        if in_place:  # one segment, or two when the payload wraps
            start = (self.m.r + 16 + m.ext_bytes) % self.m.dsize
            first = min(len(m.payload), self.m.dsize - start)
            lens = [first] + ([len(m.payload) - first] if len(m.payload) > first else [])
            assert [s.nbytes for s in v.segments] == lens
            if len(lens) == 2:
                event("peek of a wrapped payload")

    def consume_view(self, m: Pkt, in_place: bool) -> int:
        if in_place:
            return self.m.commit(1)
        assert self.ahead.popleft() is m
        return 0

    @precondition(no_view)
    @rule(copy=st.booleans())
    def peek_and_release(self, copy: bool) -> None:
        m, in_place, sig = self.peek_model()
        v = self.inc.peek()
        self.check_view(v, m, in_place)
        self.check_signals(r1=sig)
        if v is None or m is None:
            return
        if copy:
            dst = bytearray(len(m.payload))
            assert v.copy_into(dst) == len(m.payload) and dst == m.payload
        v.release()
        self.check_signals(r1=self.consume_view(m, in_place), w1=0)

    @precondition(no_view)
    @rule()
    def peek_and_hold(self) -> None:
        """Keep the view while the writer goes on (its space is not freed)."""
        m, in_place, sig = self.peek_model()
        v = self.inc.peek()
        self.check_view(v, m, in_place)
        self.check_signals(r1=sig)
        if v is not None:
            self.view, self.view_pkt, self.view_in_place = v, m, in_place
            self.view_stale = False

    @precondition(lambda self: self.view is not None and not self.view_stale)
    @rule()
    def read_past_the_view(self) -> None:
        """Another read delivers the packet the view shows: the view is stale."""
        self.try_read_any()
        self.stale_view()

    def try_read_any(self) -> None:
        m, sig = self.take_batch()
        p = self.inc.try_read()
        assert p is not None and m is not None
        self.same(p, m)
        self.check_signals(r1=sig, w1=0)

    @precondition(lambda self: self.view is not None)
    @rule()
    def release_the_view(self) -> None:
        v, m = self.view, self.view_pkt
        assert v is not None and m is not None
        self.view = self.view_pkt = None
        if self.view_stale:
            with pytest.raises(ValueError):
                v.release()
            self.check_signals(r1=0, w1=0)
            return
        # the writer could not touch the payload meanwhile
        assert b"".join(bytes(s) for s in v.segments) == m.payload
        v.release()
        self.check_signals(r1=self.consume_view(m, self.view_in_place), w1=0)

    @rule()
    def mask(self) -> None:
        self.inc.mask_interrupts()
        self.m.mask = 1

    @rule()
    def unmask(self) -> None:
        assert self.inc.unmask_interrupts() == self.m.used  # the re-check
        self.m.mask = 0

    # ------------------------------------------------ exchange and ring 2 (B)
    def read_request(self) -> None:
        """B reads one request off ring 2 (each is inband, trans_id 0, no flags)."""
        m = self.m2.ring[0] if self.m2.ring else None
        sig = self.m2.commit(1) if m is not None else 0
        p = self.inc2.try_read()
        if m is None:
            assert p is None
        else:
            assert p is not None
            self.same(p, m)
        self.check_signals(r2=sig)

    @rule(n=st.integers(1, 4))
    def peer_reads_requests(self, n: int) -> None:
        for _ in range(n):
            self.read_request()
        self.check_signals(w2=0)

    @rule(masked=st.booleans())
    def peer_masks_requests(self, masked: bool) -> None:
        """B polls ring 2 (masked: exchange then owes no signal) or sleeps."""
        if masked:
            self.inc2.mask_interrupts()
        else:
            assert self.inc2.unmask_interrupts() == self.m2.used
        self.m2.mask = int(masked)

    @precondition(no_view)
    @rule(
        data=st.data(), spin=st.sampled_from(SPINS), kind=st.sampled_from(["bytes", "bytearray"]),
        peer=st.booleans(),
    )
    def exchange(self, data: st.DataObject, spin: int, kind: str, peer: bool) -> None:
        """A request on ring 2, the answer (the next packet) from ring 1.
        With no room for the request it sleeps until B reads requests (or
        gives up, sending nothing); with no answer yet it sleeps until B
        writes one (or times out)."""
        self.quiet()
        exact = max(0, self.m2.free() - 32)
        size = data.draw(
            st.one_of(st.integers(0, 300), st.sampled_from([exact, exact + 8])), label="size"
        )
        payload = content(0xEEEE, size)
        req = Pkt(PacketType.DATA_INBAND, 0, 0, pad8(payload), None, 0)
        if req.total >= self.m2.dsize:
            with pytest.raises(ValueError):
                self.inc.exchange(as_kind(payload, kind), self.bell_a, IDLE_S, spin_ns=spin)
            self.check_signals(w1=0, r1=0, w2=0, r2=0)
            return
        calls = self.bell_a.calls
        waits = 0
        sent = True
        if self.m2.free() <= req.total:  # the request waits for room
            self.m2.set_pending(req.total)
            if peer:
                self.bell_a.moves.append(self.peer_answers(req.total))
                waits += 1
            else:
                sent = False
        published = False
        sig_w2 = 0
        if sent and not waits:
            sig_w2 = self.m2.publish([req])
            published = True
            if not sig_w2 and not self.ahead and spin == self.spin and kind == "bytes":
                event("exchange: request and answer in one C call")
        m: Pkt | None = None
        sig = 0
        blocks = False
        if sent:
            m, sig, blocks = self.start_read(spin)
            if blocks and (peer or waits):
                self.bell_a.moves.append(self.peer_writes(data))
                waits += 1
        timeout = WAKE_S if waits else IDLE_S
        got = self.inc.exchange(as_kind(payload, kind), self.bell_a, timeout, spin_ns=spin)
        assert not self.bell_a.moves, "exchange never slept"
        assert self.bell_a.calls >= calls + waits
        if not sent:
            assert got is None
            self.m2.set_pending(0)  # it gave up: nothing sent, its request withdrawn
            self.check_signals(w1=0, r1=0, w2=0, r2=0)
            return
        if not published:
            sig_w2 = self.m2.publish([req])  # after B made room
        if blocks:
            if waits:
                assert self.bell_a.woken[-1], "B wrote the answer but never signalled"
            m, sig2 = self.finish_read(bool(waits))
            sig += sig2
        if not waits and not blocks:
            assert self.bell_a.calls == calls, "exchange waited with its answer in the ring"
        self.same_payload(got, m)
        self.check_signals(w2=sig_w2, r1=sig)

    # ------------------------------------------------------------- invariants
    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "m"):
            return
        for inc, out, m in ((self.inc, self.out, self.m), (self.inc2, self.out2, self.m2)):
            assert inc.bytes_readable() == m.used
            assert out.bytes_writable() == m.free()
            assert 0 <= m.used <= m.dsize - 8  # never completely full
        assert self.inc.buffered_packets == len(self.ahead)
        assert self.inc2.buffered_packets == 0

    @invariant()
    def control_pages(self) -> None:
        if not hasattr(self, "m"):
            return
        for buf, m, inc, out in (
            (self.buf, self.m, self.inc, self.out), (self.buf2, self.m2, self.inc2, self.out2)
        ):
            assert u32(buf, OFF_WRITE_INDEX) == m.w
            assert u32(buf, OFF_READ_INDEX) == m.r
            assert (m.w - m.r) % m.dsize == m.used
            assert u32(buf, OFF_INTERRUPT_MASK) == m.mask
            assert u32(buf, OFF_PENDING_SEND_SZ) == m.pending
            assert out.corrupt is None and inc.corrupt is None
        # every signal was accounted by the rule that caused it
        assert (self.w1.count, self.r1.count, self.w2.count, self.r2.count) == (0, 0, 0, 0)
        if self.m.wraps:
            event("write index wrapped")


_FAST = settings(max_examples=120, stateful_step_count=60, deadline=None)
_SLOW = settings(max_examples=1000, stateful_step_count=150, deadline=None)

RingPathsMachine.TestCase.settings = _FAST
TestRingPathsModel = RingPathsMachine.TestCase


class SlowRingPathsMachine(RingPathsMachine):
    pass


SlowRingPathsMachine.TestCase.settings = _SLOW
TestRingPathsModelSoak = pytest.mark.slow(SlowRingPathsMachine.TestCase)
