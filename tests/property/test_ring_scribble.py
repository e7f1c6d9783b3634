"""A hostile peer scribbles on the ring; the other end must stay safe.

Hypothesis fills a ring with valid packets, then writes random values into
the control page and into packet bytes (descriptor fields, extended headers,
payloads), and then reads (or, for the writer, writes).  The only allowed
outcomes are packets that pass every validation rule, "empty", or
``RingCorruptError`` (sticky) -- never another exception, a crash or a hang,
and the reader must come to rest within a bounded number of calls.  The ring
sits between PROT_NONE guard pages, so an out-of-bounds access in the C core
is a SIGSEGV at the faulty access rather than a silent read.

Each end may write only its own control fields: the reader read_index and
interrupt_mask, the writer write_index and pending_send_sz; the reader never
writes the data area.  Both are checked.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ringtools import (
    CONTROL,
    OFF_READ_INDEX,
    OFF_WRITE_INDEX,
    guarded_buffer,
    put_u32,
    u32,
)

from vmbus.doorbell import Doorbell
from vmbus.errors import RingCorruptError
from vmbus.packet import GpaRange, Packet, PacketType, TransferPageRange
from vmbus.ring import (
    IncomingRing,
    OutgoingRing,
    PacketView,
    ReadInfo,
    init_ring,
    packet_bytes,
)

VALID_TYPES = {6, 7, 9, 11}
CONTROL_FIELDS = [0x0, 0x4, 0x8, 0xC, 0x40]

u16_values = st.one_of(
    st.integers(0, 0xFFFF), st.sampled_from([0, 1, 2, 3, 4, 6, 7, 9, 11, 0x7FFF, 0x8000, 0xFFFF])
)


def u32_values(dsize: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, 2**32 - 1),
        st.integers(0, dsize // 8 - 1).map(lambda k: k * 8),  # valid-looking indices
        st.sampled_from(
            [0, 1, 4, 8, dsize - 8, dsize - 1, dsize, dsize + 8, 2**31, 2**32 - 8, 2**32 - 1]
        ),
    )


packet_specs = st.lists(
    st.tuples(st.sampled_from([6, 7, 9, 11]), st.one_of(st.integers(0, 300), st.integers(0, 4000))),
    max_size=12,
)


@st.composite
def rings(draw: st.DrawFn) -> dict[str, Any]:
    ring_bytes = draw(st.sampled_from([8192, 12288]), label="ring_bytes")
    dsize = ring_bytes - CONTROL
    return {
        "ring_bytes": ring_bytes,
        "dsize": dsize,
        "start": draw(st.integers(0, dsize // 8 - 1), label="start") * 8,
        "packets": draw(packet_specs, label="packets"),
        "read_first": draw(st.integers(0, 3), label="read_first"),
    }


def fill(buf: Any, spec: dict[str, Any]) -> list[tuple[int, int]]:
    """Write the spec's packets (as many as fit) with a real writer; return
    (start offset, ring bytes) of each packet still unread in the ring."""
    put_u32(buf, OFF_WRITE_INDEX, spec["start"])
    put_u32(buf, OFF_READ_INDEX, spec["start"])
    placed = []
    with OutgoingRing(buf) as out:
        for i, (ptype, size) in enumerate(spec["packets"]):
            w = out.debug_info()["write_index"]
            payload = bytes([i & 0xFF]) * size
            if ptype == 9:
                ok = out.try_write_gpa_direct(payload, [GpaRange(4097, 5, (1, 2))], trans_id=i)
            elif ptype == 7:
                ok = out.try_write_xfer_pages(
                    payload, 3, [TransferPageRange(8, 0), TransferPageRange(8, 8)], trans_id=i
                )
            else:
                ok = out.try_write(payload, packet_type=PacketType(ptype), trans_id=i)
            if not ok:
                break
            placed.append((w, (out.debug_info()["write_index"] - w) % spec["dsize"]))
    if spec["read_first"]:  # consume a few through a real reader: indices move on
        with IncomingRing(buf, readahead_packets=1) as pre:
            for _ in range(min(spec["read_first"], len(placed))):
                assert pre.try_read() is not None
                placed.pop(0)
    return placed


@st.composite
def scribbles(
    draw: st.DrawFn, dsize: int, placed: list[tuple[int, int]]
) -> list[tuple[int, bytes]]:
    """(ring offset, bytes) writes: control fields, raw control bytes, packet
    descriptor fields, extended headers, anywhere inside a packet."""
    out: list[tuple[int, bytes]] = []
    for _ in range(draw(st.integers(1, 4), label="n_scribbles")):
        kinds = ["ctrl_field", "ctrl_bytes"] + (
            ["desc_field", "pkt_bytes", "ext"] if placed else []
        )
        kind = draw(st.sampled_from(kinds), label="kind")
        if kind == "ctrl_field":
            off = draw(st.sampled_from(CONTROL_FIELDS))
            out.append((off, struct.pack("<I", draw(u32_values(dsize)))))
        elif kind == "ctrl_bytes":
            off = draw(st.integers(0, 0x47))
            out.append((off, draw(st.binary(min_size=1, max_size=8))))
        else:
            start, total = draw(st.sampled_from(placed))
            if kind == "desc_field":
                rel = draw(st.sampled_from([0, 2, 4, 6]))
                raw = struct.pack("<H", draw(u16_values))
            elif kind == "ext":
                rel = draw(st.integers(16, max(16, min(total - 8, 64) - 1)))
                raw = draw(
                    st.one_of(
                        st.binary(min_size=1, max_size=8),
                        u32_values(dsize).map(lambda v: struct.pack("<I", v)),
                    )
                )
            else:
                rel = draw(st.integers(0, total - 1))
                raw = draw(st.binary(min_size=1, max_size=16))
            for k, b in enumerate(raw):  # packet bytes wrap around the data area
                out.append((CONTROL + (start + rel + k) % dsize, bytes([b])))
    return out


def apply(buf: Any, writes: list[tuple[int, bytes]]) -> None:
    for off, raw in writes:
        buf[off : off + len(raw)] = raw


def check_packet(p: Packet, dsize: int) -> None:
    assert p.packet_type in VALID_TYPES
    assert p.flags in (0, 1)
    assert 2 <= p.offset8 <= p.len8
    assert p.len8 * 8 + 8 <= dsize - 8
    assert len(p.payload) == (p.len8 - p.offset8) * 8
    try:
        r = p.ranges  # validated before it was handed out: parsing cannot fail
    except RingCorruptError as e:
        raise AssertionError(f"a packet with a bad extended header was handed out: {e}") from e
    assert (r is not None) == (p.packet_type in (7, 9))


READS = ["try_read", "drain", "drain1", "read_into", "peek"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=rings(), data=st.data())
def test_reader_survives_any_scribble(spec: dict[str, Any], data: st.DataObject) -> None:
    dsize = spec["dsize"]
    with contextlib.ExitStack() as stack:  # rings close before their buffer goes
        buf = stack.enter_context(guarded_buffer(spec["ring_bytes"]))
        init_ring(buf)
        placed = fill(buf, spec)
        attach_after = data.draw(st.booleans(), label="attach_after_scribble")
        inc = None if attach_after else stack.enter_context(IncomingRing(buf))
        apply(buf, data.draw(scribbles(dsize, placed), label="scribbles"))
        if inc is None:
            try:
                inc = stack.enter_context(IncomingRing(buf))
            except RingCorruptError as e:
                assert e.reason == "bad_read_index"
                return
        before = bytes(buf)
        order = data.draw(st.lists(st.sampled_from(READS), min_size=1, max_size=8), label="reads")
        packets, outcome = 0, None
        # every call either returns at least one packet (>= 24 ring bytes),
        # or comes to rest: so this many calls always suffice
        for call in range(dsize // 24 + 4):
            how = order[call % len(order)]
            try:
                got = read_once(inc, how, dsize, buf)
            except RingCorruptError as e:
                assert inc.corrupt is not None
                outcome = e
                break
            if got == 0:
                outcome = "empty"
                break
            packets += got
        assert outcome is not None, "the reader did not come to rest"
        # at rest: it stays there
        for how in READS:
            if outcome == "empty":
                assert read_once(inc, how, dsize, buf) == 0
            else:
                try:
                    read_once(inc, how, dsize, buf)
                    raise AssertionError("a corrupt ring read again")
                except RingCorruptError:
                    pass
        after = bytes(buf)
        # the reader wrote nothing but read_index and interrupt_mask
        assert after[:4] == before[:4] and after[12:] == before[12:]


def read_once(inc: IncomingRing, how: str, dsize: int, buf: Any) -> int:
    """One read call; returns how many packets it produced (0: empty)."""
    if how == "try_read":
        p = inc.try_read()
        if p is None:
            return 0
        check_packet(p, dsize)
        return 1
    if how in ("drain", "drain1"):
        batch = inc.drain(1 if how == "drain1" else 256)
        for p in batch:
            check_packet(p, dsize)
        return len(batch)
    if how == "read_into":
        dst = bytearray(dsize)
        info = inc.read_into(dst)
        if info is None:
            return 0
        assert isinstance(info, ReadInfo)
        assert info.packet_type in VALID_TYPES and info.flags in (0, 1)
        assert info.payload_bytes % 8 == 0 and info.payload_bytes <= dsize - 32
        assert (info.ranges is not None) == (info.packet_type in (7, 9))
        return 1
    buffered = inc.buffered_packets
    pos = inc.debug_info()["private_index"]
    v = inc.peek()
    if v is None:
        return 0
    assert isinstance(v, PacketView)
    assert v.packet_type in VALID_TYPES and v.flags in (0, 1)
    if not buffered and v.packet_type in (6, 11):  # seen in place: check the geometry
        raw = bytes(buf[CONTROL + pos : CONTROL + pos + 8]) if pos + 8 <= dsize else None
        if raw is not None:
            _t, off8, len8, _f = struct.unpack("<HHHH", raw)
            assert v.payload_bytes == (len8 - off8) * 8
        assert all(s.nbytes <= dsize for s in v.segments) and len(v.segments) in (1, 2)
    v.release()
    return 1


WRITES = [
    "try_write",
    "try_write_big",
    "write_many",
    "bytes_writable",
    "wait_writable",
    "gpa_direct",
]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=rings(), data=st.data())
def test_writer_survives_any_scribble(spec: dict[str, Any], data: st.DataObject) -> None:
    dsize = spec["dsize"]
    with contextlib.ExitStack() as stack:  # rings close before their buffer goes
        buf = stack.enter_context(guarded_buffer(spec["ring_bytes"]))
        bell = stack.enter_context(Doorbell())
        init_ring(buf)
        fill(buf, spec)
        attach_after = data.draw(st.booleans(), label="attach_after_scribble")
        out = None if attach_after else stack.enter_context(OutgoingRing(buf))
        writes = [(off, raw) for off, raw in data.draw(scribbles(dsize, []), label="scribbles")]
        # the reader's field the writer depends on, from the writer's view
        writes.append(
            (OFF_READ_INDEX, struct.pack("<I", data.draw(u32_values(dsize), label="read_index")))
        )
        apply(buf, writes)
        if out is None:
            try:
                out = stack.enter_context(OutgoingRing(buf))
            except RingCorruptError as e:
                assert e.reason in ("bad_write_index", "bad_read_index")
                return
        ops = data.draw(
            st.lists(
                st.tuples(st.sampled_from(WRITES), st.integers(0, dsize - 32)),
                min_size=1,
                max_size=10,
            ),
            label="ops",
        )
        corrupt = False
        for how, n in ops:
            ctrl = bytes(buf[:CONTROL])
            pos = out.debug_info()["private_index"]
            try:
                advanced = write_once(out, how, n, bell)
            except RingCorruptError as e:
                assert e.reason == "bad_read_index"
                rd = u32(buf, OFF_READ_INDEX)
                assert rd >= dsize or rd % 8
                corrupt, advanced = True, 0
            else:
                assert not corrupt, "a corrupt writer wrote again"
            now = bytes(buf[:CONTROL])
            # the writer wrote nothing in the control page but its own fields
            assert now[4:12] == ctrl[4:12] and now[16:] == ctrl[16:]
            info = out.debug_info()
            assert info["private_index"] == (pos + advanced) % dsize
            if advanced:  # a publication: the shared index is the writer's again
                assert u32(buf, OFF_WRITE_INDEX) == info["private_index"]


def write_once(out: OutgoingRing, how: str, n: int, bell: Doorbell) -> int:
    """One writer call; returns the ring bytes it published."""
    if how == "try_write":
        return packet_bytes(n % 200) if out.try_write(bytes(n % 200)) else 0
    if how == "try_write_big":
        return packet_bytes(n) if out.try_write(bytes(n)) else 0
    if how == "write_many":
        k = out.write_many([bytes(n % 500)] * 4)
        assert 0 <= k <= 4
        return k * packet_bytes(n % 500)
    if how == "bytes_writable":
        assert 8 <= out.bytes_writable() <= out.data_bytes
        return 0
    if how == "wait_writable":
        assert out.wait_writable(n, bell, 0, spin_ns=0) in (True, False)
        return 0
    ok = out.try_write_gpa_direct(bytes(n % 100), [GpaRange(1, 0, (9,))])
    return packet_bytes(n % 100, 24) if ok else 0
