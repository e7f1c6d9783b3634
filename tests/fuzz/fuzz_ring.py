"""Fuzz the ring's reader (the C core behind ``vmbus.ring.IncomingRing``) as a
hostile writer sees it: the input lays out a ring (packets a real writer put
there, or raw indices and data), scribbles on the control page and the data
area between calls, and drives every public read path: ``try_read``,
``drain``, ``try_read_payload``, ``read_into``, ``drain_into``, ``peek`` /
``release``, ``read`` / ``read_payload`` / ``wait_readable`` with a zero
timeout, ``exchange``, ``bytes_readable`` and the interrupt mask.

Allowed: ``RingCorruptError``; ``ValueError`` where the API documents it for
the caller's side (a buffer too small for ``read_into`` / ``drain_into``, a
stale ``PacketView``).  The ring sits between PROT_NONE guard pages, so an
out-of-bounds access in C is a crash.  Also checked: every packet handed out
passes the ring's validation rules (type, flags, lengths, extended header);
a corrupt ring stays corrupt; the reader writes nothing of the shared ring
but its own words (read_index, interrupt_mask, its barrier promise).

Coverage: atheris sees the Python layer only (the C core is not built with
sanitizer coverage), so ``_feedback`` turns each call's outcome (how many
packets of which type, which corruption reason) into Python branches for
libFuzzer to tell apart.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from typing import Any

from _fuzzlib import Reader, Writer, instrument, instrumented, main

with instrumented():
    from vmbus.doorbell import Doorbell
    from vmbus.errors import RingCorruptError
    from vmbus.packet import GpaRange, PacketType, TransferPageRange
    from vmbus.ring import DEFAULT_SPIN_NS, IncomingRing, OutgoingRing, init_ring

from ringtools import CONTROL, guarded_buffer  # (tests/, on sys.path via _fuzzlib)

RING_BYTES = [8192, 12288]
READAHEAD = [256, 1, 3, 256]
TYPES = [6, 7, 9, 11]
GPA_SETS = [
    [GpaRange(4097, 5, (1, 2))],
    [GpaRange(1, 0, (9,))],
    [GpaRange(4096, 0, (3,)), GpaRange(100, 4000, (4, 5))],
]
XFER_SETS = [[TransferPageRange(8, 0), TransferPageRange(8, 8)], [], [TransferPageRange(1, 7)]]
(TRY_READ, DRAIN, PAYLOAD, READ_INTO, DRAIN_INTO, PEEK, RELEASE, READ, READ_PAYLOAD, WAIT,
 READABLE, MASK, UNMASK, EXCHANGE, SCRIBBLE_WORD, SCRIBBLE_BYTES) = range(16)
OPS = [TRY_READ, TRY_READ, DRAIN, PAYLOAD, READ_INTO, DRAIN_INTO, PEEK, RELEASE, READ,
       READ_PAYLOAD, WAIT, READABLE, MASK, UNMASK, EXCHANGE, SCRIBBLE_WORD, SCRIBBLE_BYTES]
CONTROL_WORDS = [0x0, 0x4, 0x8, 0xC, 0x40, 0x80]  # write/read index, mask, pending, feats, ours
SPINS = [0, DEFAULT_SPIN_NS]
BUF_SIZES = [0, 8, 64, 4096, 1 << 16]
OWN_WORDS = (slice(4, 12), slice(0x80, 0x84))  # what the reader may write


_seen: dict[str, int] = {}


@instrument
def _feedback(what: str, n: int = 0, ptype: int = 0) -> None:
    """One branch per outcome of the C core, for the coverage-guided fuzzer
    (each body differs: they count under different names)."""
    if what == "bad_write_index":
        _seen["bad_write_index"] = _seen.get("bad_write_index", 0) + 1
    elif what == "bad_read_index":
        _seen["bad_read_index"] = _seen.get("bad_read_index", 0) + 1
    elif what == "partial_packet":
        _seen["partial_packet"] = _seen.get("partial_packet", 0) + 1
    elif what == "bad_lengths":
        _seen["bad_lengths"] = _seen.get("bad_lengths", 0) + 1
    elif what == "bad_packet_type":
        _seen["bad_packet_type"] = _seen.get("bad_packet_type", 0) + 1
    elif what == "bad_flags":
        _seen["bad_flags"] = _seen.get("bad_flags", 0) + 1
    elif what == "packet_too_big":
        _seen["packet_too_big"] = _seen.get("packet_too_big", 0) + 1
    elif what == "gpa_direct_header":
        _seen["gpa_direct_header"] = _seen.get("gpa_direct_header", 0) + 1
    elif what == "xfer_pages_header":
        _seen["xfer_pages_header"] = _seen.get("xfer_pages_header", 0) + 1
    elif what == "packets":
        if n == 1:
            _seen["1 packet"] = _seen.get("1 packet", 0) + 1
        elif n == 2:
            _seen["2 packets"] = _seen.get("2 packets", 0) + 1
        elif n < 8:
            _seen["< 8 packets"] = _seen.get("< 8 packets", 0) + 1
        else:
            _seen["more packets"] = _seen.get("more packets", 0) + 1
        if ptype == 6:
            _seen["type 6"] = _seen.get("type 6", 0) + 1
        elif ptype == 7:
            _seen["type 7"] = _seen.get("type 7", 0) + 1
        elif ptype == 9:
            _seen["type 9"] = _seen.get("type 9", 0) + 1
        else:
            _seen["type 11"] = _seen.get("type 11", 0) + 1


def _check_packet(p: Any, dsize: int) -> None:
    assert p.packet_type in TYPES and p.flags in (0, 1), p
    assert 2 <= p.offset8 <= p.len8 and p.len8 * 8 + 8 <= dsize - 8, p
    assert len(p.payload) == (p.len8 - p.offset8) * 8
    ranges = p.ranges  # validated before it was handed out: cannot raise
    assert (ranges is not None) == (p.packet_type in (7, 9))
    _feedback("packets", 1, p.packet_type)


def _fill(r: Reader, buf: Any, dsize: int) -> None:
    """A ring as a real writer left it, or raw indices and bytes."""
    if r.flag():
        start = r.below(dsize // 8) * 8
        struct.pack_into("<II", buf, 0, start, start)
        with OutgoingRing(buf) as out:
            for i in range(r.below(13)):
                ptype, size = r.pick(TYPES), r.below(600) * r.pick([1, 1, 8])
                size = min(size, out.max_payload_bytes - 64)  # (room for any ext header)
                payload, tid = bytes([i]) * size, r.u8()
                creq = r.flag()
                if ptype == 9:
                    ok = out.try_write_gpa_direct(payload, r.pick(GPA_SETS), trans_id=tid,
                                                  completion_requested=creq)
                elif ptype == 7:
                    ok = out.try_write_xfer_pages(payload, 3, r.pick(XFER_SETS), trans_id=tid,
                                                  completion_requested=creq)
                else:
                    ok = out.try_write(payload, packet_type=PacketType(ptype), trans_id=tid,
                                       completion_requested=creq)
                if not ok:
                    break
    else:
        for off in (0, 4):
            v = r.u32()
            struct.pack_into("<I", buf, off, v % dsize & ~7 if v & 1 else v)
        _scribble_bytes(r, buf, dsize)


def _scribble_word(r: Reader, buf: Any) -> None:
    struct.pack_into("<I", buf, r.pick(CONTROL_WORDS), r.u32())


def _scribble_bytes(r: Reader, buf: Any, dsize: int) -> None:
    """Bytes into the data area at any offset, wrapping as packets do."""
    off = r.below(dsize)
    b = r.chunk(2048)
    first = b[: dsize - off]
    buf[CONTROL + off : CONTROL + off + len(first)] = first
    rest = b[len(first) :]
    buf[CONTROL : CONTROL + len(rest)] = rest


def _one(inc: IncomingRing, op: int, r: Reader, bell: Doorbell, dsize: int,
         held: list[Any]) -> None:
    """One read call; checks what it hands out."""
    if op == TRY_READ:
        p = inc.try_read()
        if p is not None:
            _check_packet(p, dsize)
    elif op == DRAIN:
        for p in inc.drain(r.pick([1, 2, 256])):
            _check_packet(p, dsize)
    elif op == PAYLOAD:
        b = inc.try_read_payload()
        assert b is None or (len(b) % 8 == 0 and len(b) <= dsize)
    elif op in (READ_INTO, DRAIN_INTO):
        out = bytearray(r.pick(BUF_SIZES))
        try:
            if op == READ_INTO:
                info = inc.read_into(out)
                infos = [] if info is None else [info]
            else:
                infos = list(inc.drain_into(out, r.pick([1, 2, 256])))
        except ValueError as e:
            if "buffer too small" not in str(e):
                raise
            return
        assert sum(i.payload_bytes for i in infos) <= len(out)
        for info in infos:
            assert info.packet_type in TYPES and info.flags in (0, 1)
            assert (info.ranges is not None) == (info.packet_type in (7, 9))
            _feedback("packets", len(infos), info.packet_type)
    elif op == PEEK:
        v = inc.peek()
        if v is not None:
            assert v.packet_type in TYPES and v.flags in (0, 1)
            assert v.payload_bytes <= dsize and len(v.segments) in (1, 2)
            if r.flag():
                held.append(v)  # released later, maybe after other reads (stale)
            else:
                v.release()
    elif op == RELEASE:
        while held:
            try:
                held.pop().release()
            except ValueError as e:
                if "stale PacketView" not in str(e):
                    raise
    elif op == READ:
        p = inc.read(bell, 0.0, spin_ns=r.pick(SPINS))
        if p is not None:
            _check_packet(p, dsize)
    elif op == READ_PAYLOAD:
        inc.read_payload(bell, 0.0, spin_ns=r.pick(SPINS))
    elif op == WAIT:
        assert inc.wait_readable(bell, 0.0, spin_ns=r.pick(SPINS)) in (True, False)
    elif op == READABLE:
        assert 0 <= inc.bytes_readable() < dsize
    elif op == MASK:
        inc.mask_interrupts()
    elif op == UNMASK:
        assert 0 <= inc.unmask_interrupts() < dsize
    elif op == EXCHANGE:
        inc.exchange(r.chunk(64), bell, 0.0, spin_ns=r.pick(SPINS))


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    cfg = r.u8()
    ring_bytes = RING_BYTES[cfg & 1]
    dsize = ring_bytes - CONTROL
    with contextlib.ExitStack() as stack:  # rings close before their buffers go
        buf = stack.enter_context(guarded_buffer(ring_bytes))
        reply_buf = bytearray(8192)
        bell = stack.enter_context(Doorbell())
        init_ring(buf)
        init_ring(reply_buf)
        attach_first = bool(cfg & 2)
        ahead = {"readahead_packets": READAHEAD[cfg >> 2 & 3]}
        if cfg & 16:
            ahead["readahead_bytes"] = 64
        inc = stack.enter_context(IncomingRing(buf, **ahead)) if attach_first else None
        _fill(r, buf, dsize)
        if inc is None:
            try:
                inc = stack.enter_context(IncomingRing(buf, **ahead))
            except RingCorruptError as e:
                assert e.reason == "bad_read_index", e
                _feedback(e.reason)
                return
        inc.bind_reply_ring(stack.enter_context(OutgoingRing(reply_buf)))
        held: list[Any] = []
        stack.callback(held.clear)  # (views go before the ring)
        corrupt: RingCorruptError | None = None
        for _ in range(24):
            if not r.left():
                break
            op = r.pick(OPS)
            if op == SCRIBBLE_WORD:
                _scribble_word(r, buf)
                continue
            if op == SCRIBBLE_BYTES:
                _scribble_bytes(r, buf, dsize)
                continue
            before = bytes(buf)
            buffered = inc.buffered_packets
            try:
                _one(inc, op, r, bell, dsize, held)
            except RingCorruptError as e:
                assert inc.corrupt is not None or corrupt is not None, e
                corrupt = e
                _feedback(e.reason)
            else:
                # (packets copied out before the damage are still delivered)
                assert corrupt is None or buffered or op in (MASK, RELEASE), \
                    "a corrupt ring read again"
            after = bytes(buf)
            for own in OWN_WORDS:  # (the reader's own words, blanked)
                before = before[: own.start] + bytes(own.stop - own.start) + before[own.stop :]
                after = after[: own.start] + bytes(own.stop - own.start) + after[own.stop :]
            assert after == before, "the reader wrote into the shared ring"
        for v in held:
            with contextlib.suppress(ValueError, RingCorruptError):
                v.release()


def seeds() -> Iterator[bytes]:
    def packets(w: Writer, spec: list[tuple[int, int]]) -> Writer:
        w.flag(True).below(1024, 5).below(13, len(spec))
        for ptype, size in spec:
            w.pick(TYPES, ptype).below(600, size).below(3, 0).u8(7).flag(ptype == 11)
            if ptype in (7, 9):
                w.below(3, 0)
        return w

    spec = [(6, 10), (9, 30), (7, 0), (11, 5), (6, 500)]
    every_read = [TRY_READ, DRAIN, PAYLOAD, READ_INTO, DRAIN_INTO, PEEK, READ, READ_PAYLOAD,
                  WAIT, READABLE, MASK, UNMASK, EXCHANGE]
    for cfg in (0, 1, 2, 4, 16):
        w = packets(Writer().u8(cfg), spec)
        for op in every_read:
            w.pick(OPS, op)
            if op == DRAIN:
                w.below(3, 2)
            elif op in (READ_INTO, DRAIN_INTO):
                w.below(len(BUF_SIZES), 3)
                if op == DRAIN_INTO:
                    w.below(3, 2)
            elif op == PEEK:
                w.flag(False)
            elif op in (READ, READ_PAYLOAD, WAIT):
                w.below(2, 0)
            elif op == EXCHANGE:
                w.chunk(b"ping").below(2, 0)
        yield w.done()
    # a packet, a stale view, a scribbled descriptor, then reads
    w = packets(Writer().u8(1), [(6, 8), (6, 8), (9, 1)])
    w.pick(OPS, PEEK).flag(True).pick(OPS, TRY_READ).pick(OPS, RELEASE)
    w.pick(OPS, SCRIBBLE_BYTES).below(8192, 5 * 8 + 96).chunk(struct.pack("<HHH", 6, 1, 9), 2048)
    w.pick(OPS, TRY_READ).pick(OPS, DRAIN).below(3, 2)
    yield w.done()
    # raw: indices and a hand-made packet (type 6, offset8 2, len8 3, trailer)
    pkt = struct.pack("<HHHHQ", 6, 2, 3, 0, 1) + bytes(8) + struct.pack("<Q", 0)
    w = Writer().u8(0).flag(False).u32(len(pkt) | 1).u32(0)  # (odd: taken as an index)
    yield w.below(4096, 0).chunk(pkt, 2048).pick(OPS, TRY_READ).pick(OPS, TRY_READ).done()


if __name__ == "__main__":
    main(TestOneInput)
