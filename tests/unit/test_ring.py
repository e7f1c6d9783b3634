"""The VMBus ring, one process, on plain bytearrays: byte-exact layout,
the strict full rule, packet types, signalling decisions, batching, zero-copy
reads, diagnostics, caller errors and hostile-writer corruption.

Expected bytes are written by hand from the spec (vmbus-protocol.md §1, §2),
not computed with the code under test.  A ring of 8192 bytes has a 4096-byte
data area; offsets below are data-area offsets unless said otherwise.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from ringtools import (
    OFF_FEATURE_BITS,
    OFF_INTERRUPT_MASK,
    OFF_PENDING_SEND_SZ,
    OFF_READ_INDEX,
    OFF_WRITE_INDEX,
    advance,
    data,
    desc,
    forge,
    put_u32,
    trailer,
    u32,
)
from vmbus._ring_cffi import lib

from vmbus.doorbell import Doorbell
from vmbus.errors import RingCorruptError, VmbusError
from vmbus.packet import GpaRange, Packet, PacketType, TransferPageRange
from vmbus.ring import (
    IncomingRing,
    OutgoingRing,
    PacketBatch,
    PacketView,
    ReadInfo,
    ReadInfoBatch,
    init_ring,
    packet_bytes,
)
from vmbus.shm import SharedMemory

H = bytes.fromhex
DSIZE = 4096  # data bytes of an 8192-byte ring


def new_ring(size: int = 8192, fill: int = 0) -> bytearray:
    buf = bytearray([fill]) * size
    init_ring(buf)
    return buf


@pytest.fixture
def ring() -> tuple[bytearray, OutgoingRing, IncomingRing]:
    buf = new_ring()
    return buf, OutgoingRing(buf), IncomingRing(buf)


def kernel_offers_global_membarrier() -> bool:
    """membarrier(MEMBARRIER_CMD_QUERY) lists GLOBAL_EXPEDITED (2) and its
    registration (4): then rings use the heavy-barrier protocol."""
    import ctypes
    import platform

    nr = {"x86_64": 324, "aarch64": 283}.get(platform.machine())
    if nr is None:
        pytest.skip("membarrier's syscall number is not known here")
    q = ctypes.CDLL(None, use_errno=True).syscall(nr, 0, 0, 0)
    return q > 0 and q & 6 == 6


def set_pending(out: OutgoingRing, need: int) -> int:
    """What wait_writable does before it blocks: publish pending_send_sz."""
    return int(lib.vmbr_set_pending(out._r, need))


# ---------------------------------------------------------------- control page


def test_init_ring_writes_only_the_control_page() -> None:
    buf = bytearray(b"\xaa") * 8192
    init_ring(buf)
    # feature_bits @0x40 = FEAT_PENDING_SEND_SZ, every other control byte 0
    assert buf[:4096] == bytes(0x40) + H("01000000") + bytes(4096 - 0x44)
    assert buf[4096:] == b"\xaa" * 4096


def test_control_page_offsets_of_every_field(ring: Any) -> None:
    buf, out, inc = ring
    assert out.try_write(b"12345678")  # 16 + 8 + 8 = 32 bytes
    assert u32(buf, OFF_WRITE_INDEX) == 32 and buf[0:4] == H("20000000")
    assert u32(buf, OFF_READ_INDEX) == 0
    assert inc.try_read() is not None
    assert buf[4:8] == H("20000000")  # read_index @4
    inc.mask_interrupts()
    assert buf[8:12] == H("01000000")  # interrupt_mask @8
    assert inc.unmask_interrupts() == 0
    assert buf[8:12] == H("00000000")
    assert set_pending(out, 100) == DSIZE  # rounded up to 104 = 0x68
    assert buf[12:16] == H("68000000")  # pending_send_sz @0xC
    assert buf[0x40:0x44] == H("01000000")  # feature_bits @0x40
    # Our deviation (docs/ring.md): a reader that masks under the heavy-barrier
    # promise says so in a word of Hyper-V's reserved bytes, @0x80.
    promise = H("01000000") if inc.debug_info()["heavy_barrier"] else bytes(4)
    assert buf[0x80:0x84] == promise
    # nothing else in the control page was touched
    assert buf[16:0x40] == bytes(0x30) and buf[0x44:0x80] == bytes(0x3C)
    assert buf[0x84:4096] == bytes(4096 - 0x84)


# ------------------------------------------------------------- packet layout


def test_first_packet_bytes(ring: Any) -> None:
    buf, out, _ = ring
    assert out.try_write(b"hello", trans_id=0x0102030405060708, completion_requested=True)
    assert data(buf, 0, 32) == (
        H("0600 0200 0300 0100 0807060504030201")  # type 6, off8 2, len8 3, flags 1, tid
        + b"hello"
        + bytes(3)  # payload, zero padded to 8
        + bytes(8)  # trailer: start offset 0 << 32
    )
    assert u32(buf, OFF_WRITE_INDEX) == 32


def test_trailer_holds_the_start_offset_in_its_upper_half(ring: Any) -> None:
    buf, out, _ = ring
    assert out.try_write(b"A" * 8)  # 0..32
    assert out.try_write(b"B" * 16, trans_id=9, packet_type=PacketType.COMP)  # 32..72
    assert data(buf, 32, 40) == (
        H("0b00 0200 0400 0000 0900000000000000") + b"B" * 16 + H("00000000 20000000")
    )
    assert u32(buf, OFF_WRITE_INDEX) == 72


def test_empty_payload_packet(ring: Any) -> None:
    buf, out, inc = ring
    assert out.try_write(b"")
    assert data(buf, 0, 24) == H("0600 0200 0200 0000 0000000000000000") + bytes(8)
    p = inc.try_read()
    assert p is not None and p.payload == b"" and p.len8 == 2 and p.offset8 == 2


@pytest.mark.parametrize("n", range(1, 17))
def test_padding_is_zeros_even_over_dirty_memory(n: int) -> None:
    buf = new_ring(fill=0xFF)
    out, inc = OutgoingRing(buf), IncomingRing(buf)
    payload = bytes(range(1, n + 1))
    assert out.try_write(payload)
    padded = (n + 7) // 8 * 8
    assert data(buf, 16, padded) == payload + bytes(padded - n)
    assert data(buf, 16 + padded, 8) == bytes(8)  # trailer of a packet at 0
    assert data(buf, 24 + padded, 8) == b"\xff" * 8  # nothing beyond it
    p = inc.try_read()
    assert p is not None and p.payload == payload + bytes(padded - n)


def test_packet_written_across_the_wrap_point(ring: Any) -> None:
    buf, out, inc = ring
    advance(out, inc, 4064)
    payload = bytes(range(40))  # 16 + 40 = 56 (len8 7) + 8 trailer = 64 bytes
    assert out.try_write(payload, trans_id=0xAABB)
    assert data(buf, 4064, 32) == H("0600 0200 0700 0000 bbaa000000000000") + payload[:16]
    assert data(buf, 0, 24) == payload[16:]
    assert data(buf, 24, 8) == H("00000000 e00f0000")  # trailer: 4064 << 32
    assert u32(buf, OFF_WRITE_INDEX) == 32
    assert inc.bytes_readable() == 64
    p = inc.try_read()
    assert p is not None and p.payload == payload and p.trans_id == 0xAABB
    assert u32(buf, OFF_READ_INDEX) == 32


def test_descriptor_split_across_the_wrap_point(ring: Any) -> None:
    buf, out, inc = ring
    advance(out, inc, 4088)
    assert out.try_write(b"Z" * 8, trans_id=0x1122334455667788)
    assert data(buf, 4088, 8) == H("0600 0200 0300 0000")
    assert data(buf, 0, 24) == H("8877665544332211") + b"Z" * 8 + H("00000000 f80f0000")
    assert u32(buf, OFF_WRITE_INDEX) == 24
    p = inc.try_read()
    assert p is not None and p.trans_id == 0x1122334455667788 and p.payload == b"Z" * 8


def test_packet_ending_exactly_at_the_end_wraps_the_index_to_zero(ring: Any) -> None:
    buf, out, inc = ring
    advance(out, inc, 4064)
    assert out.try_write(b"E" * 8)  # 4064..4096
    assert data(buf, 4088, 8) == H("00000000 e00f0000")
    assert u32(buf, OFF_WRITE_INDEX) == 0  # never equal to the data size
    assert inc.bytes_readable() == 32
    p = inc.try_read()
    assert p is not None and p.payload == b"E" * 8
    assert u32(buf, OFF_READ_INDEX) == 0
    assert out.try_write(b"F")  # the next packet starts at 0 with trailer 0
    assert data(buf, 0, 32) == H("0600 0200 0300 0000 0000000000000000") + b"F" + bytes(7 + 8)


# ------------------------------------------------------- never completely full


def test_largest_packet_in_an_empty_ring(ring: Any) -> None:
    buf, out, inc = ring
    assert out.max_payload_bytes == DSIZE - 32  # total = dsize - 8
    with pytest.raises(ValueError, match="never fit"):
        out.try_write(bytes(DSIZE - 24))  # total = dsize exactly: would look empty
    with pytest.raises(ValueError, match="never fit"):
        out.try_write(bytes(DSIZE - 31))  # pads to the same
    assert u32(buf, OFF_WRITE_INDEX) == 0
    assert out.try_write(bytes(DSIZE - 32))
    assert out.bytes_writable() == 8
    assert inc.bytes_readable() == DSIZE - 8
    assert not out.try_write(b"")  # 24 bytes never fit in 8


@pytest.mark.parametrize("wrapped", [False, True], ids=["w>=r", "w<r"])
def test_exact_fit_is_refused_and_eight_bytes_less_fits(ring: Any, wrapped: bool) -> None:
    buf, out, inc = ring
    if wrapped:
        advance(out, inc, 2048)
        assert out.try_write(bytes(3000 - 24))  # 2048 -> 952 (wrapped); r = 2048
        free = 2048 - 952
    else:
        assert out.try_write(bytes(1000 - 24))
        free = DSIZE - 1000
    assert out.bytes_writable() == free
    before = bytes(buf)
    full0 = out.debug_info()["full"]
    assert not out.try_write(bytes(free - 24))  # total == free: refused
    assert bytes(buf) == before  # nothing written, index not moved
    assert out.debug_info()["full"] == full0 + 1
    assert out.try_write(bytes(free - 32))  # total == free - 8: fits
    assert out.bytes_writable() == 8
    assert inc.bytes_readable() == DSIZE - 8


def test_bytes_writable_and_readable_add_up_to_the_data_size(ring: Any) -> None:
    _, out, inc = ring
    for n in (0, 5, 100, 1000):
        assert out.try_write(bytes(n))
        assert out.bytes_writable() + inc.bytes_readable() == DSIZE
    assert inc.bytes_readable() == sum(packet_bytes(n) for n in (0, 5, 100, 1000))


# --------------------------------------------------------------- packet types


@pytest.mark.parametrize("ptype", [PacketType.DATA_INBAND, PacketType.COMP])
@pytest.mark.parametrize("completion", [False, True])
def test_inband_and_completion_round_trip(ring: Any, ptype: PacketType, completion: bool) -> None:
    _, out, inc = ring
    assert out.try_write(
        b"payload", packet_type=ptype, trans_id=2**64 - 1, completion_requested=completion
    )
    p = inc.try_read()
    assert p is not None
    assert p.packet_type is ptype
    assert p.trans_id == 2**64 - 1
    assert p.flags == int(completion) and p.completion_requested == completion
    assert p.payload == b"payload\0"
    assert p.ranges is None


def test_gpa_direct_round_trip_and_bytes(ring: Any) -> None:
    buf, out, inc = ring
    ranges = [GpaRange(5000, 100, (0x10, 0x11)), GpaRange(8, 0, (0x99,))]
    assert out.try_write_gpa_direct(b"cmd", ranges, trans_id=5, completion_requested=True)
    # ext header: 8 + (8 + 16) + (8 + 8) = 48 bytes; offset8 = 8; payload 3 -> 8: len8 = 9
    assert data(buf, 0, 16 + 48 + 8 + 8) == (
        H("0900 0800 0900 0100 0500000000000000")
        + H("00000000 02000000")
        + H("88130000 64000000 1000000000000000 1100000000000000")
        + H("08000000 00000000 9900000000000000")
        + b"cmd"
        + bytes(5)
        + bytes(8)
    )
    p = inc.try_read()
    assert p is not None
    assert p.packet_type is PacketType.DATA_USING_GPA_DIRECT
    assert p.trans_id == 5 and p.completion_requested
    assert p.ranges == tuple(ranges)
    assert p.payload == b"cmd" + bytes(5)


def test_xfer_pages_round_trip_and_bytes(ring: Any) -> None:
    buf, out, inc = ring
    ranges = [TransferPageRange(100, 0), TransferPageRange(200, 4096)]
    assert out.try_write_xfer_pages(b"", 0x1234, ranges, trans_id=77)
    assert data(buf, 0, 16 + 24 + 8) == (
        H("0700 0500 0500 0000 4d00000000000000")
        + H("3412 00 00 02000000 64000000 00000000 c8000000 00100000")
        + bytes(8)
    )
    p = inc.try_read()
    assert p is not None
    assert p.packet_type is PacketType.DATA_USING_XFER_PAGES
    assert p.xfer_pageset_id == 0x1234
    assert p.ranges == tuple(ranges)
    assert p.payload == b""


@pytest.mark.parametrize(
    "ptype", [PacketType.DATA_USING_XFER_PAGES, PacketType.DATA_USING_GPA_DIRECT]
)
def test_types_with_ranges_are_refused_by_the_plain_writers(ring: Any, ptype: PacketType) -> None:
    buf, out, _ = ring
    with pytest.raises(ValueError):
        out.try_write(b"x", packet_type=ptype)
    with pytest.raises(ValueError):
        out.write_many([b"x"], packet_type=ptype)
    assert u32(buf, OFF_WRITE_INDEX) == 0


def test_every_reader_sees_the_same_packet(ring: Any) -> None:
    """try_read, drain, read_into and peek agree on type, flags, trans_id, payload."""
    _, out, inc = ring
    for _ in range(4):
        assert out.try_write(b"same!", trans_id=3, completion_requested=True)
    p = inc.try_read()
    assert p is not None
    (q,) = inc.drain(1)
    dst = bytearray(16)
    info = inc.read_into(dst)
    v = inc.peek()
    assert v is not None
    assert (p.packet_type, p.flags, p.trans_id, p.payload) == (
        q.packet_type,
        q.flags,
        q.trans_id,
        q.payload,
    )
    assert info == ReadInfo(PacketType.DATA_INBAND, 1, 3, 8, None)
    assert dst[:8] == p.payload
    assert (v.packet_type, v.flags, v.trans_id, bytes(v.segments[0])) == (
        p.packet_type,
        p.flags,
        p.trans_id,
        p.payload,
    )
    v.release()


# -------------------------------------------------------------- signalling


def test_writer_signals_only_on_empty_to_non_empty(ring: Any) -> None:
    _, out, inc = ring
    assert out.try_write(b"a") and out.take_signals() == 1
    assert out.try_write(b"b") and out.take_signals() == 0  # not empty before
    assert inc.try_read() is not None  # drains both (read-ahead) and publishes
    assert out.try_write(b"c") and out.take_signals() == 1  # empty again
    info = out.debug_info()
    assert (info["signals"], info["signals_suppressed"]) == (2, 1)


def test_writer_calls_on_signal_instead_of_counting() -> None:
    buf = new_ring()
    calls: list[int] = []
    out = OutgoingRing(buf, on_signal=lambda: calls.append(1))
    assert out.try_write(b"x") and out.try_write(b"y")
    assert calls == [1]
    assert out.owed_signals == 0 and out.take_signals() == 0


def test_writer_does_not_signal_a_masked_reader(ring: Any) -> None:
    buf, out, inc = ring
    inc.mask_interrupts()
    assert out.try_write(b"a") and out.take_signals() == 0
    put_u32(buf, OFF_INTERRUPT_MASK, 0xFFFFFFFF)  # any non-zero value masks
    assert inc.try_read() is not None
    assert out.try_write(b"b") and out.take_signals() == 0


def test_writer_does_not_signal_when_the_reader_is_behind() -> None:
    buf = new_ring()
    out, inc = OutgoingRing(buf), IncomingRing(buf, readahead_packets=1)
    assert out.try_write(b"1") and out.take_signals() == 1
    assert out.try_write(b"2") and out.take_signals() == 0
    assert inc.try_read() is not None  # one of two: the ring is not empty
    assert out.try_write(b"3") and out.take_signals() == 0
    assert inc.try_read() is not None and inc.try_read() is not None
    assert out.try_write(b"4") and out.take_signals() == 1


def test_write_many_signals_once_for_the_batch(ring: Any) -> None:
    _, out, _ = ring
    assert out.write_many([b"a", b"b", b"c"]) == 3
    assert out.take_signals() == 1
    assert out.write_many([b"d"]) == 1
    assert out.take_signals() == 0


def test_batched_drain_mask_protocol_with_recheck(ring: Any) -> None:
    buf, out, inc = ring
    inc.mask_interrupts()  # 1. mask, then drain
    assert u32(buf, OFF_INTERRUPT_MASK) == 1
    assert out.try_write(b"a") and out.take_signals() == 0  # suppressed: masked
    assert [p.payload[:1] for p in inc] == [b"a"]
    assert out.try_write(b"b") and out.take_signals() == 0  # races in while masked
    # 2. unmask and re-check: the packet that raced in is reported, not slept on
    assert inc.unmask_interrupts() == packet_bytes(1)
    assert u32(buf, OFF_INTERRUPT_MASK) == 0
    assert [p.payload[:1] for p in inc] == [b"b"]
    assert inc.unmask_interrupts() == 0  # now safe to sleep
    assert out.try_write(b"c") and out.take_signals() == 1  # and the writer signals


def test_reader_signals_when_free_space_crosses_pending_send_sz(ring: Any) -> None:
    buf, out, _ = ring
    inc = IncomingRing(buf, readahead_packets=1)
    for _ in range(3):
        assert out.try_write(bytes(1000 - 24))  # 3 x 1000 bytes, free 1096
    need = 2000
    assert set_pending(out, need) == 1096  # writer is blocked
    assert u32(buf, OFF_PENDING_SEND_SZ) == 2000
    assert inc.try_read() is not None  # free 2096 > 2000: crossed
    assert inc.take_signals() == 1
    assert inc.try_read() is not None  # already above: no second signal
    assert inc.take_signals() == 0
    assert inc.debug_info()["signals"] == 1


def test_reader_does_not_signal_before_the_crossing(ring: Any) -> None:
    buf, out, _ = ring
    inc = IncomingRing(buf, readahead_packets=1)
    for _ in range(3):
        assert out.try_write(bytes(1000 - 24))
    assert set_pending(out, 3000) == 1096
    assert inc.try_read() is not None  # 2096: not yet
    assert inc.take_signals() == 0
    assert inc.try_read() is not None  # 3096 > 3000
    assert inc.take_signals() == 1


def test_reader_signal_boundary_is_strict(ring: Any) -> None:
    buf, out, _ = ring
    inc = IncomingRing(buf, readahead_packets=1)
    for _ in range(3):
        assert out.try_write(bytes(1000 - 24))
    assert set_pending(out, 2096) == 1096  # freeing 1000 makes exactly 2096: not >
    assert inc.try_read() is not None and inc.take_signals() == 0
    assert inc.try_read() is not None and inc.take_signals() == 1


def test_reader_never_signals_without_the_feature_bit(ring: Any) -> None:
    buf, out, _ = ring
    inc = IncomingRing(buf, readahead_packets=1)
    for _ in range(3):
        assert out.try_write(bytes(1000 - 24))
    put_u32(buf, OFF_FEATURE_BITS, 0xFFFFFFFE)  # every bit but FEAT_PENDING_SEND_SZ
    assert set_pending(out, 2000) == 1096
    assert inc.try_read() is not None
    assert inc.try_read() is not None
    assert inc.take_signals() == 0


def test_reader_never_signals_a_writer_that_is_not_waiting(ring: Any) -> None:
    _, out, inc = ring
    for _ in range(3):
        assert out.try_write(bytes(1000 - 24))
    assert len(inc.drain()) == 3
    assert inc.take_signals() == 0


def test_pending_send_sz_is_cleared_by_the_next_write(ring: Any) -> None:
    buf, out, inc = ring
    assert out.try_write(bytes(2000))
    set_pending(out, 3000)
    assert u32(buf, OFF_PENDING_SEND_SZ) == 3000
    assert inc.try_read() is not None
    assert inc.take_signals() == 1
    assert out.try_write(b"x")
    assert u32(buf, OFF_PENDING_SEND_SZ) == 0


def test_wait_writable_timeout_zero_leaves_no_pending_size(ring: Any) -> None:
    buf, out, _ = ring
    assert out.try_write(bytes(3000))
    with Doorbell() as db:
        assert not out.wait_writable(2000, db, 0, spin_ns=0)
        assert u32(buf, OFF_PENDING_SEND_SZ) == 0
        assert out.wait_writable(1000, db, 0, spin_ns=0)  # 1072 free > 1000
        assert out.wait_writable(1000, db, 0)  # the spinning variant too


def test_blocking_write_times_out_and_withdraws_its_pending_size(ring: Any) -> None:
    buf, out, _ = ring
    assert out.try_write(bytes(3000))
    with Doorbell() as db:
        assert not out.write(bytes(2000), db, 0.01, spin_ns=1000)
    assert u32(buf, OFF_PENDING_SEND_SZ) == 0


def test_blocked_writer_is_woken_by_the_readers_signal() -> None:
    buf = new_ring()
    with Doorbell() as writer_bell:
        out = OutgoingRing(buf)
        inc = IncomingRing(buf, on_signal=writer_bell.ring, readahead_packets=1)
        for _ in range(3):
            assert out.try_write(bytes(1000 - 24))
        result: list[bool] = []
        t = threading.Thread(
            target=lambda: result.append(out.write(bytes(2000), writer_bell, 10, spin_ns=0))
        )
        t.start()
        try:
            # the writer publishes its need before it sleeps: wait for that
            deadline = time.monotonic() + 10
            while u32(buf, OFF_PENDING_SEND_SZ) == 0 and time.monotonic() < deadline:
                pass
            assert u32(buf, OFF_PENDING_SEND_SZ) == packet_bytes(2000)  # 2024
            assert inc.try_read() is not None  # 1096 -> 2096 free: crossed, rings
        finally:
            t.join(10)
        assert not t.is_alive()
        assert result == [True]
        assert writer_bell.rings == 1
        assert u32(buf, OFF_PENDING_SEND_SZ) == 0


def test_wait_readable() -> None:
    buf = new_ring()
    with Doorbell() as bell:
        out, inc = OutgoingRing(buf, on_signal=bell.ring), IncomingRing(buf)
        assert not inc.wait_readable(bell, 0, spin_ns=0)
        assert not inc.wait_readable(bell, 0.001)  # spin, unmask, re-check, block
        assert u32(buf, OFF_INTERRUPT_MASK) == 0  # it left the writer able to signal
        assert out.try_write(b"x")
        assert bell.rings == 1
        assert inc.wait_readable(bell, 10, spin_ns=0)
        p = inc.read(bell, 1)
        assert p is not None and p.payload == b"x" + bytes(7)
        assert inc.read(bell, 0.001, spin_ns=0) is None


# ------------------------------------------------------- batches and read-ahead


def test_write_many_lays_out_bytes_exactly_like_single_writes() -> None:
    a, b = new_ring(), new_ring()
    payloads = [b"", b"x", bytes(range(200)), b"y" * 8]
    assert OutgoingRing(a).write_many(payloads, trans_id=4) == 4
    ob = OutgoingRing(b)
    for p in payloads:
        assert ob.try_write(p, trans_id=4)
    assert a == b


def test_write_many_writes_the_prefix_that_fits(ring: Any) -> None:
    _, out, inc = ring
    payloads = [bytes([i]) * 1000 for i in range(5)]  # 1024 bytes each: 3 fit in 4096
    assert out.write_many(payloads) == 3
    assert out.debug_info()["full"] == 1
    assert [p.payload[:1000] for p in inc] == payloads[:3]
    assert out.write_many(payloads[3:]) == 2


def test_write_many_is_all_or_nothing_on_a_size_error(ring: Any) -> None:
    buf, out, _ = ring
    with pytest.raises(ValueError):
        out.write_many([b"ok", bytes(DSIZE)])
    assert u32(buf, OFF_WRITE_INDEX) == 0
    assert out.write_many([]) == 0


def test_drain_returns_a_batch_in_order(ring: Any) -> None:
    _, out, inc = ring
    for i in range(10):
        assert out.try_write(bytes([i]) * (i + 1), trans_id=i)
    batch = inc.drain(4)
    assert isinstance(batch, PacketBatch) and len(batch) == 4
    assert [p.trans_id for p in batch] == [0, 1, 2, 3]
    assert batch[-1].trans_id == 3 and [p.trans_id for p in batch[1:3]] == [1, 2]
    with pytest.raises(IndexError):
        batch[4]
    assert batch.payloads()[2] == b"\x02\x02\x02" + bytes(5)
    assert batch.total_bytes == sum(16 + 8 for _ in range(4))
    rest = inc.drain(100)
    assert [p.trans_id for p in rest] == list(range(4, 10))
    assert len(inc.drain()) == 0


def test_try_read_copies_a_batch_and_frees_its_space_at_once(ring: Any) -> None:
    buf, out, _ = ring
    inc = IncomingRing(buf, readahead_packets=3)
    for i in range(5):
        assert out.try_write(bytes([i]))
    p = inc.try_read()
    assert p is not None and p.payload[0] == 0
    assert inc.buffered_packets == 2
    assert u32(buf, OFF_READ_INDEX) == 3 * 32  # three packets published as read
    assert inc.bytes_readable() == 2 * 32
    assert out.bytes_writable() == DSIZE - 2 * 32
    assert [q.payload[0] for q in inc] == [1, 2, 3, 4]
    assert inc.buffered_packets == 0 and inc.debug_info()["packets"] == 5


def test_readahead_bytes_bounds_a_batch() -> None:
    # A batch stops after the packet that reaches readahead_bytes (a soft cap:
    # the writer's space stays unpublished while a batch is copied), and never
    # takes a packet that would overflow the copy buffer.
    buf = new_ring(4096 + 1024 * 1024)
    out, inc = OutgoingRing(buf), IncomingRing(buf, readahead_bytes=250_000)
    for i in range(3):
        assert out.try_write(bytes([i]) * 200_000)  # 200016 bytes copied out each
    first = inc.drain()
    assert [p.payload[0] for p in first] == [0, 1]  # 400032 >= 250000: stop
    assert inc.bytes_readable() == packet_bytes(200_000)
    assert [p.payload[0] for p in inc.drain()] == [2]
    one = IncomingRing(new_ring(8192), readahead_bytes=1)
    assert one._outsize >= one.max_payload_bytes + 16  # the largest packet always fits


# --------------------------------------------------------- read_into and peek


def test_read_into_copies_the_payload_into_the_callers_buffer(ring: Any) -> None:
    _, out, inc = ring
    assert out.try_write(b"abcdefghij", trans_id=8)
    dst = bytearray(b"\xee" * 32)
    assert inc.read_into(dst) == ReadInfo(PacketType.DATA_INBAND, 0, 8, 16, None)
    assert dst == b"abcdefghij" + bytes(6) + b"\xee" * 16
    assert inc.read_into(dst) is None


def test_read_into_a_too_small_buffer_consumes_nothing(ring: Any) -> None:
    _, out, inc = ring
    assert out.try_write(b"x" * 100)
    with pytest.raises(ValueError):
        inc.read_into(bytearray(100))  # 104 with padding
    assert inc.bytes_readable() == packet_bytes(100)
    info = inc.read_into(bytearray(104))
    assert info is not None and info.payload_bytes == 104


def test_read_into_returns_ranges(ring: Any) -> None:
    _, out, inc = ring
    ranges = (GpaRange(10, 20, (30,)),)
    assert out.try_write_gpa_direct(b"hdr", ranges)
    dst = bytearray(8)
    info = inc.read_into(dst)
    assert info is not None
    assert info.packet_type is PacketType.DATA_USING_GPA_DIRECT and info.ranges == ranges
    assert dst == b"hdr" + bytes(5)


def test_read_into_serves_the_readahead_first(ring: Any) -> None:
    _, out, inc = ring
    for i in range(3):
        assert out.try_write(bytes([i]) * 8)
    p = inc.try_read()
    assert p is not None and p.payload == bytes(8)
    assert inc.buffered_packets == 2 and inc.bytes_readable() == 0
    dst = bytearray(8)
    assert inc.read_into(dst) is not None and dst == b"\x01" * 8
    with pytest.raises(ValueError):
        inc.read_into(bytearray(4))
    assert inc.read_into(dst) is not None and dst == b"\x02" * 8


# ------------------------------------------------------------ payload-only reads


def test_payload_reads_give_what_packet_payload_gives(ring: Any) -> None:
    _, out, inc = ring
    ref_buf = new_ring()
    ref_out, ref_in = OutgoingRing(ref_buf), IncomingRing(ref_buf)
    for o in (out, ref_out):
        assert o.try_write(b"abc", trans_id=5, completion_requested=True)
        assert o.try_write(b"", packet_type=PacketType.COMP, trans_id=6)
        assert o.try_write_gpa_direct(b"gpa-hdr!", (GpaRange(10, 20, (30,)),))
        assert o.try_write(b"x" * 100)
    want = []
    while (p := ref_in.try_read()) is not None:
        want.append(p.payload)
    assert want[:2] == [b"abc" + bytes(5), b""]
    with Doorbell() as db:
        got = [inc.read_payload(db, 1.0), inc.try_read_payload()]
        got += [inc.read_payload(db, 1.0), inc.read_payload(db, 1.0)]
        assert got == want
        assert inc.try_read_payload() is None
        assert inc.read_payload(db, 0.01, spin_ns=0) is None  # nothing came: timeout


def test_read_payload_serves_the_readahead_first(ring: Any) -> None:
    _, out, inc = ring
    for i in range(3):
        assert out.try_write(bytes([i]) * 8)
    assert inc.try_read() is not None  # the other two are now in the read-ahead
    with Doorbell() as db:
        assert [inc.read_payload(db, 1.0), inc.read_payload(db, 1.0)] == [b"\x01" * 8,
                                                                         b"\x02" * 8]


def test_read_payload_signals_a_waiting_writer(ring: Any) -> None:
    buf, out, _ = ring
    inc = IncomingRing(buf, readahead_packets=1)
    for _ in range(3):
        assert out.try_write(bytes(1000 - 24))
    assert set_pending(out, 2000) == 1096  # the writer waits for 2000 bytes
    with Doorbell() as db:
        assert inc.read_payload(db, 1.0) == bytes(1000 - 24)  # free 2096 > 2000: crossed
        assert inc.take_signals() == 1
        assert inc.read_payload(db, 1.0) is not None
        assert inc.take_signals() == 0


# ------------------------------------------------------------- exchange


def pair_of_rings() -> tuple[OutgoingRing, IncomingRing, IncomingRing, OutgoingRing]:
    """Two rings, as a channel has them: ours (out writes requests on A, inc
    reads answers from B, bound for exchange) and the peer's two ends."""
    a, b = new_ring(), new_ring()
    out, inc = OutgoingRing(a), IncomingRing(b)
    inc.bind_reply_ring(out)
    return out, inc, IncomingRing(a), OutgoingRing(b)


@pytest.fixture
def pair() -> tuple[OutgoingRing, IncomingRing, IncomingRing, OutgoingRing]:
    return pair_of_rings()


def test_exchange_writes_the_request_then_returns_the_answer(pair: Any) -> None:
    out, inc, peer_in, peer_out = pair
    with Doorbell() as db:
        assert peer_out.try_write(b"answer-1")
        # the peer is not polling (mask clear, ring empty): the request owes
        # a signal, sent before the wait
        assert inc.exchange(b"request", db, 1.0) == b"answer-1"
        assert out.take_signals() == 1
        p = peer_in.try_read()
        assert p is not None and (p.packet_type, p.trans_id) == (PacketType.DATA_INBAND, 0)
        assert p.payload == b"request" + bytes(1)  # padded to 8, as any packet
        # the peer polls now (its mask is set): one C call, no signal owed
        peer_in.mask_interrupts()
        assert peer_out.try_write(b"")  # an empty answer is an answer
        assert inc.exchange(bytearray(b"x" * 16), db, 1.0) == b""  # (any buffer)
        assert out.take_signals() == 0
        assert peer_in.try_read_payload() == b"x" * 16
        assert inc.exchange(memoryview(b"q" * 8), db, 0.01, spin_ns=0) is None  # no answer
        assert peer_in.try_read_payload() == b"q" * 8  # but the request went


def test_exchange_serves_the_readahead_first(pair: Any) -> None:
    _, inc, peer_in, peer_out = pair
    for k in range(3):
        assert peer_out.try_write(bytes([k]) * 8)
    assert inc.try_read_payload() == bytes(8)  # the other two: in the read-ahead
    with Doorbell() as db:
        assert [inc.exchange(b"a", db, 1.0), inc.exchange(b"b", db, 1.0)] == [b"\x01" * 8,
                                                                             b"\x02" * 8]
    assert [peer_in.try_read_payload() for _ in range(3)] == [b"a" + bytes(7),
                                                              b"b" + bytes(7), None]


def test_exchange_signals_a_peer_waiting_for_room_for_its_answers(pair: Any) -> None:
    out, inc, peer_in, peer_out = pair
    peer_in.mask_interrupts()  # the peer polls: requests owe no signal
    for _ in range(3):
        assert peer_out.try_write(bytes(1000))  # 1024 ring bytes each
    assert set_pending(peer_out, 2000) == 1024  # the peer waits for 2000 bytes
    with Doorbell() as db:
        assert inc.exchange(b"r", db, 1.0) == bytes(1000)  # 2048 free > 2000: crossed
        assert (out.take_signals(), inc.take_signals()) == (0, 1)
        assert inc.exchange(b"r", db, 1.0) == bytes(1000)
        assert (out.take_signals(), inc.take_signals()) == (0, 0)


def test_exchange_answers_of_every_type_give_their_payload(pair: Any) -> None:
    _, inc, _, peer_out = pair
    assert peer_out.try_write_gpa_direct(b"gpa-hdr!", (GpaRange(10, 20, (30,)),))
    assert peer_out.try_write(b"done", packet_type=PacketType.COMP, trans_id=7)
    with Doorbell() as db:
        assert inc.exchange(b"1", db, 1.0) == b"gpa-hdr!"  # (a type 9: the batch path)
        assert inc.exchange(b"2", db, 1.0) == b"done" + bytes(4)


def test_exchange_without_room_for_the_request_sends_nothing(pair: Any) -> None:
    out, inc, _, peer_out = pair
    while out.try_write(bytes(500)):
        pass
    while out.try_write(b""):  # 24 ring bytes each: the 32 of the request never fit
        pass
    sent = out.debug_info()["packets"]
    assert peer_out.try_write(b"answer!!")
    with Doorbell() as db:
        assert inc.exchange(b"request", db, 0.01) is None  # (waited for room, in vain)
    assert out.debug_info()["packets"] == sent
    assert out.debug_info()["pending_send_sz"] == 0  # the wait for room was withdrawn
    assert inc.try_read_payload() == b"answer!!"  # the answer was not taken


def test_exchange_needs_an_outgoing_ring_bound() -> None:
    inc = IncomingRing(new_ring())
    with Doorbell() as db, pytest.raises(ValueError, match="bind_reply_ring"):
        inc.exchange(b"x", db, 0.0)
    with pytest.raises(TypeError, match="OutgoingRing"):
        inc.bind_reply_ring(IncomingRing(new_ring()))  # type: ignore[arg-type]
    out = OutgoingRing(new_ring())
    inc.bind_reply_ring(out)
    inc.bind_reply_ring(None)
    with Doorbell() as db, pytest.raises(ValueError, match="bind_reply_ring"):
        inc.exchange(b"x", db, 0.0)
    assert out.debug_info()["packets"] == 0


def test_exchange_on_a_closed_ring_fails_and_sends_nothing(pair: Any) -> None:
    _, inc, peer_in, peer_out = pair
    assert peer_out.try_write(b"answer!!")
    with Doorbell() as db:
        inc.close()
        with pytest.raises(ValueError, match="closed ring"):
            inc.exchange(b"request", db, 1.0)
        assert peer_in.try_read() is None  # no request without an end to answer
    _, inc2, peer_in2, _ = pair_of_rings()
    inc2._reply.close()
    with Doorbell() as db, pytest.raises(ValueError, match="closed ring"):
        inc2.exchange(b"request", db, 1.0)
    assert peer_in2.try_read() is None


def test_peek_is_zero_copy_and_release_consumes(ring: Any) -> None:
    buf, out, inc = ring
    assert inc.peek() is None
    assert out.try_write(b"live-data", trans_id=6, completion_requested=True)
    v = inc.peek()
    assert isinstance(v, PacketView)
    assert (v.packet_type, v.flags, v.trans_id) == (PacketType.DATA_INBAND, 1, 6)
    assert len(v.segments) == 1 and v.payload_bytes == 16
    assert bytes(v.segments[0]) == b"live-data" + bytes(7)
    buf[4096 + 16] = ord("L")  # the view is the ring memory itself
    assert bytes(v.segments[0][:4]) == b"Live"
    assert inc.bytes_readable() == 40  # not consumed yet
    assert u32(buf, OFF_READ_INDEX) == 0
    v.release()
    assert inc.bytes_readable() == 0
    assert u32(buf, OFF_READ_INDEX) == 40
    v.release()  # idempotent
    assert inc.peek() is None


def test_peek_of_a_wrapped_payload_gives_two_segments(ring: Any) -> None:
    _, out, inc = ring
    advance(out, inc, 4064)
    payload = bytes(range(100, 140))
    assert out.try_write(payload)
    with inc.peek() as v:
        assert [s.nbytes for s in v.segments] == [16, 24]
        assert bytes(v.segments[0]) + bytes(v.segments[1]) == payload
        dst = bytearray(40)
        assert v.copy_into(dst) == 40 and dst == payload
    assert inc.bytes_readable() == 0


def test_peek_release_signals_a_waiting_writer(ring: Any) -> None:
    _, out, inc = ring
    assert out.try_write(bytes(3000))
    set_pending(out, 2000)
    with inc.peek():
        assert inc.take_signals() == 0
    assert inc.take_signals() == 1


def test_peek_of_a_packet_with_ranges_goes_through_a_validated_copy(ring: Any) -> None:
    _, out, inc = ring
    assert out.try_write_xfer_pages(b"abc", 3, [TransferPageRange(1, 2)])
    with inc.peek() as v:
        assert v.packet_type is PacketType.DATA_USING_XFER_PAGES
        assert bytes(v.segments[0]) == b"abc" + bytes(5)
    assert inc.try_read() is None


# ------------------------------------------------------------------ debug_info


def test_debug_info_contents(ring: Any) -> None:
    buf, out, _ = ring
    inc = IncomingRing(buf, readahead_packets=1)
    assert out.try_write(b"a" * 10)
    assert out.try_write(b"b" * 3)
    assert not out.try_write(bytes(DSIZE - 32))
    assert inc.try_read() is not None
    inc.mask_interrupts()
    set_pending(out, 64)
    o, i = out.debug_info(), inc.debug_info()
    common = {
        "ring_bytes": 8192,
        "data_bytes": DSIZE,
        "write_index": 72,
        "read_index": 40,
        "interrupt_mask": 1,
        "pending_send_sz": 64,
        "feature_bits": 1,
        "bytes_readable": 32,
        "bytes_writable": DSIZE - 32,
        "corrupt": None,
        "heavy_barrier": kernel_offers_global_membarrier(),
    }
    assert o == {
        **common,
        "end": "outgoing",
        "private_index": 72,
        "packets": 2,
        "bytes": 13,
        "signals": 1,
        "signals_suppressed": 1,
        "full": 1,
    }
    assert i == {
        **common,
        "end": "incoming",
        "private_index": 40,
        "packets": 1,
        "bytes": 16,
        "signals": 0,
        "signals_suppressed": 0,
        "full": 0,
        "buffered_packets": 0,
    }


def test_debug_info_of_a_corrupt_ring(ring: Any) -> None:
    buf, _, inc = ring
    put_u32(buf, OFF_WRITE_INDEX, 4097)
    with pytest.raises(RingCorruptError):
        inc.try_read()
    info = inc.debug_info()
    assert info["write_index"] == 4097
    assert info["bytes_readable"] is None and info["bytes_writable"] is None
    assert info["corrupt"] == "bad_write_index"


# ----------------------------------------------------------------- caller errors


@pytest.mark.parametrize("size", [0, 4096, 8191, 8193, 12288 + 8, 4096 * 3 - 1])
@pytest.mark.parametrize("api", [init_ring, OutgoingRing, IncomingRing])
def test_bad_buffer_sizes(size: int, api: Callable[[bytearray], object]) -> None:
    with pytest.raises(ValueError, match="4096"):
        api(bytearray(size))


@pytest.mark.parametrize("api", [init_ring, OutgoingRing, IncomingRing])
def test_read_only_buffers(api: Callable[[object], object]) -> None:
    with pytest.raises(ValueError, match="writable"):
        api(bytes(8192))
    with pytest.raises(ValueError, match="writable"):
        api(memoryview(bytearray(8192)).toreadonly())


def test_packets_too_big_for_any_ring() -> None:
    buf = new_ring(4096 + 1024 * 1024)  # big enough that len8 (u16) is the limit
    out = OutgoingRing(buf)
    assert out.max_payload_bytes == 65535 * 8 - 16
    with pytest.raises(ValueError, match="never fit"):
        out.try_write(bytes(65535 * 8 - 15))
    with pytest.raises(ValueError, match="never fit"):
        out.try_write_gpa_direct(bytes(65535 * 8 - 16), [GpaRange(1, 0, (1,))])
    assert out.try_write(bytes(65535 * 8 - 16))
    p = IncomingRing(buf).try_read()
    assert p is not None and p.len8 == 65535


def test_attaching_never_initialises() -> None:
    buf = bytearray(8192)
    ctrl = H("40000000 20000000 01000000 08000000") + bytes(0x30) + H("00000000")
    buf[: len(ctrl)] = ctrl
    buf[4096 + 32 : 4096 + 64] = desc(6, 2, 3, 0, 1) + b"payload!" + trailer(32)
    out, inc = OutgoingRing(buf), IncomingRing(buf)
    assert bytes(buf[: len(ctrl)]) == ctrl and buf[len(ctrl) : 4096] == bytes(4096 - len(ctrl))
    assert out.debug_info()["private_index"] == 0x40 and inc.debug_info()["private_index"] == 0x20
    p = inc.try_read()  # the reader starts where read_index said
    assert p is not None and p.payload == b"payload!"


def test_a_zeroed_control_page_without_the_feature_bit_is_a_ring_without_space_signals() -> None:
    buf = bytearray(8192)  # never initialised
    out, inc = OutgoingRing(buf), IncomingRing(buf)
    assert inc.try_read() is None and inc.bytes_readable() == 0
    assert out.try_write(bytes(3000)) and out.take_signals() == 1
    set_pending(out, 2000)
    p = inc.try_read()
    assert p is not None and p.payload == bytes(3000)
    assert inc.take_signals() == 0  # no feature bit: the reader owes no space signal


def test_a_zeroed_control_page_with_the_feature_bit_is_a_valid_empty_ring() -> None:
    buf = bytearray(8192)
    buf[0x40] = 1  # by hand: FEAT_PENDING_SEND_SZ
    assert buf == new_ring()  # exactly what init_ring makes
    out, inc = OutgoingRing(buf), IncomingRing(buf)
    assert inc.try_read() is None and inc.bytes_readable() == 0
    assert out.bytes_writable() == DSIZE
    assert out.try_write(bytes(3000)) and out.take_signals() == 1
    set_pending(out, 2000)
    p = inc.try_read()
    assert p is not None and p.payload == bytes(3000)
    assert inc.take_signals() == 1


def test_rings_on_shared_memory_and_close() -> None:
    with SharedMemory.create(8192) as shm:
        init_ring(shm.map)
        with OutgoingRing(shm.map) as out, IncomingRing(shm.map) as inc:
            assert out.try_write(b"mapped")
            p = inc.try_read()
            assert p is not None and p.payload == b"mapped\0\0"
            with pytest.raises(BufferError):
                shm.map.close()  # the rings still hold the mapping
        out.close()  # idempotent
    assert shm.map is None and shm.fd == -1


# ------------------------------------------------------- corruption (hostile writer)


def _gpa(ext: bytes, payload: bytes = b"") -> bytes:
    off8 = 2 + len(ext) // 8
    return desc(9, off8, off8 + len(payload) // 8) + ext + payload + trailer(0)


def _xfer(ext: bytes) -> bytes:
    off8 = 2 + len(ext) // 8
    return desc(7, off8, off8) + ext + trailer(0)


# (name, bytes written at data offset 0, write_index or None for "after them", reason, value)
CORRUPT_CASES: list[tuple[str, bytes, int | None, str, int | None]] = [
    ("write_index_is_dsize", b"", 4096, "bad_write_index", 4096),
    ("write_index_huge", b"", 0xFFFFFFF8, "bad_write_index", 0xFFFFFFF8),
    ("write_index_unaligned", b"", 12, "bad_write_index", 12),
    ("write_index_unaligned_by_1", b"", 33, "bad_write_index", 33),
    ("partial_packet", desc(6, 2, 2), 16, "partial_packet", 16),
    ("offset8_0", desc(6, 0, 2) + trailer(0), None, "bad_lengths", 0x2),
    ("offset8_1", desc(6, 1, 3) + bytes(8) + trailer(0), None, "bad_lengths", 0x10003),
    ("offset8_gt_len8", desc(6, 4, 3) + bytes(8) + trailer(0), None, "bad_lengths", 0x40003),
    ("len8_0", desc(6, 2, 0) + trailer(0), None, "bad_lengths", 0x20000),
    ("len8_past_available", desc(6, 2, 3) + bytes(8), None, "bad_lengths", 0x20003),
    ("len8_huge", desc(6, 2, 0xFFFF) + bytes(8), None, "bad_lengths", 0x2FFFF),
    ("type_0", desc(0, 2, 2) + trailer(0), None, "bad_packet_type", 0),
    ("type_5", desc(5, 2, 2) + trailer(0), None, "bad_packet_type", 5),
    ("type_8", desc(8, 2, 2) + trailer(0), None, "bad_packet_type", 8),
    ("type_10", desc(10, 2, 2) + trailer(0), None, "bad_packet_type", 10),
    ("type_12", desc(12, 2, 2) + trailer(0), None, "bad_packet_type", 12),
    ("type_0x106", desc(0x106, 2, 2) + trailer(0), None, "bad_packet_type", 0x106),
    ("flags_2", desc(6, 2, 2, flags=2) + trailer(0), None, "bad_flags", 2),
    ("flags_3", desc(6, 2, 2, flags=3) + trailer(0), None, "bad_flags", 3),
    ("flags_0x8000", desc(11, 2, 2, flags=0x8000) + trailer(0), None, "bad_flags", 0x8000),
    ("gpa_no_header", _gpa(b""), None, "gpa_direct_header", None),
    ("gpa_range_cnt_0", _gpa(H("00000000 00000000")), None, "gpa_direct_header", 0),
    (
        "gpa_range_cnt_2_of_1",
        _gpa(H("00000000 02000000 08000000 00000000 0100000000000000")),
        None,
        "gpa_direct_header",
        2,
    ),
    (
        "gpa_pfns_missing",
        _gpa(H("00000000 01000000 88130000 64000000 1000000000000000")),
        None,
        "gpa_direct_header",
        None,
    ),
    (
        "gpa_byte_offset_4096",
        _gpa(H("00000000 01000000 01000000 00100000 0100000000000000")),
        None,
        "gpa_direct_header",
        4096,
    ),
    (
        "gpa_byte_count_0",
        _gpa(H("00000000 01000000 00000000 00000000 0100000000000000")),
        None,
        "gpa_direct_header",
        None,
    ),
    ("xfer_no_header", _xfer(b""), None, "xfer_pages_header", None),
    (
        "xfer_range_cnt_too_big",
        _xfer(H("0100 00 00 02000000 01000000 00000000")),
        None,
        "xfer_pages_header",
        2,
    ),
]

def _with_bell(fn: Callable[[IncomingRing, Doorbell], object]) -> Callable[[IncomingRing], object]:
    def read(r: IncomingRing) -> object:
        with Doorbell() as db:
            return fn(r, db)

    return read


def _bound(r: IncomingRing) -> IncomingRing:
    if r._reply is None:
        r.bind_reply_ring(OutgoingRing(new_ring()))
    return r


READERS: dict[str, Callable[[IncomingRing], object]] = {
    "try_read": lambda r: r.try_read(),
    "try_read_payload": lambda r: r.try_read_payload(),
    "read": _with_bell(lambda r, db: r.read(db, 0.0)),
    "read_payload": _with_bell(lambda r, db: r.read_payload(db, 0.0)),
    "exchange": _with_bell(lambda r, db: _bound(r).exchange(b"request", db, 0.0)),
    "drain": lambda r: r.drain(),
    "read_into": lambda r: r.read_into(bytearray(4096)),
    "peek": lambda r: r.peek(),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    ("body", "windex", "reason", "value"),
    [c[1:] for c in CORRUPT_CASES],
    ids=[c[0] for c in CORRUPT_CASES],
)
def test_corruption_is_detected_and_sticky(
    body: bytes, windex: int | None, reason: str, value: int | None, reader: str
) -> None:
    buf = new_ring()
    inc = IncomingRing(buf)
    forge(buf, body)
    if windex is not None:
        put_u32(buf, OFF_WRITE_INDEX, windex)
    read = READERS[reader]
    with pytest.raises(RingCorruptError) as ei:
        read(inc)
    assert isinstance(ei.value, VmbusError)
    assert ei.value.reason == reason
    if value is not None:
        assert ei.value.value == value
    assert inc.corrupt is not None
    if not reason.endswith("_header"):  # (extended headers are checked on the copy)
        assert u32(buf, OFF_READ_INDEX) == 0  # the bad packet was not consumed
    # sticky: every read path keeps failing, even after the bytes are repaired
    put_u32(buf, OFF_WRITE_INDEX, 0)
    forge(buf, desc(6, 2, 2) + trailer(0))
    for other in READERS.values():
        with pytest.raises(RingCorruptError):
            other(inc)
    with pytest.raises(RingCorruptError):
        inc.bytes_readable()
    with Doorbell() as db, pytest.raises(RingCorruptError):
        inc.wait_readable(db, 0, spin_ns=0)


@pytest.mark.parametrize(
    "body",
    [
        desc(6, 2, 2) + trailer(0),  # empty payload
        desc(6, 3, 3) + bytes(8) + trailer(0),  # offset8 == len8, an opaque header
        desc(11, 2, 3, flags=1) + bytes(8) + trailer(0),
        desc(6, 2, 510) + bytes(510 * 8 - 16) + trailer(0),  # all of dsize - 8
    ],
)
def test_boundary_packets_are_valid(body: bytes) -> None:
    buf = new_ring()
    inc = IncomingRing(buf)
    forge(buf, body)
    p = inc.try_read()
    assert p is not None and p.raw() == body[:-8]
    assert inc.try_read() is None and inc.corrupt is None


@pytest.mark.parametrize("reader", ["try_read", "drain"])
@pytest.mark.parametrize("first_bad", [False, True])
def test_good_packets_before_the_damage_are_delivered_first(reader: str, first_bad: bool) -> None:
    buf = new_ring()
    inc = IncomingRing(buf)
    good = [
        desc(6, 2, 3, 0, 1) + b"good-one" + trailer(0),
        _gpa(H("00000000 01000000 08000000 00000000 0700000000000000")),
    ]
    bad_ext = _gpa(H("00000000 00000000"))  # range_cnt 0
    bad_type = desc(5, 2, 2) + trailer(0)
    body = b"".join(good) + (bad_ext if first_bad else b"") + bad_type
    forge(buf, body)
    got: list[Packet] = []
    with pytest.raises(RingCorruptError) as ei:
        for _ in range(5):
            if reader == "try_read":
                p = inc.try_read()
                assert p is not None, "a corrupt ring must not look empty"
                got.append(p)
            else:
                batch = inc.drain()
                assert len(batch), "a corrupt ring must not look empty"
                got.extend(batch)
    assert [p.trans_id for p in got] == [1, 0]
    assert got[1].ranges == (GpaRange(8, 0, (7,)),)  # handed out only after validation
    assert ei.value.reason == ("gpa_direct_header" if first_bad else "bad_packet_type")


def test_bad_extended_header_is_never_handed_out_even_at_the_end_of_a_batch() -> None:
    buf = new_ring()
    inc = IncomingRing(buf)
    forge(buf, _gpa(H("00000000 00000000")) + desc(5, 2, 2) + trailer(0))
    for read in (inc.try_read, inc.drain, inc.try_read):
        with pytest.raises(RingCorruptError):
            read()


def test_corrupt_control_page_at_attach() -> None:
    buf = new_ring()
    put_u32(buf, OFF_WRITE_INDEX, 4100)
    with pytest.raises(RingCorruptError) as ei:
        OutgoingRing(buf)
    assert ei.value.reason == "bad_write_index" and ei.value.value == 4100
    put_u32(buf, OFF_WRITE_INDEX, 0)
    put_u32(buf, OFF_READ_INDEX, 4)
    with pytest.raises(RingCorruptError) as ei:
        IncomingRing(buf)
    assert ei.value.reason == "bad_read_index" and ei.value.value == 4


@pytest.mark.parametrize("bad", [4096, 4, 0xFFFFFFFF, 2**31])
def test_writer_detects_a_bad_read_index_and_stays_corrupt(ring: Any, bad: int) -> None:
    buf, out, _ = ring
    assert out.try_write(b"fine")
    put_u32(buf, OFF_READ_INDEX, bad)
    ops: list[Callable[[], object]] = [
        out.bytes_writable,
        lambda: out.try_write(bytes(DSIZE - 64)),
        lambda: out.write_many([bytes(DSIZE - 64)]),
    ]
    with pytest.raises(RingCorruptError) as ei:
        ops[0]()
    assert ei.value.reason == "bad_read_index" and ei.value.value == bad
    put_u32(buf, OFF_READ_INDEX, 0)  # repaired: still corrupt
    for op in ops:
        with pytest.raises(RingCorruptError):
            op()
    with pytest.raises(RingCorruptError):
        out.try_write(b"")
    with Doorbell() as db, pytest.raises(RingCorruptError):
        out.wait_writable(64, db, 0, spin_ns=0)
    assert out.corrupt == "bad_read_index"


@pytest.mark.parametrize("bad", [4096, 4, 0xFFFFFFFF])
@pytest.mark.parametrize("many", [False, True])
def test_a_write_that_needs_the_readers_index_validates_it(bad: int, many: bool) -> None:
    buf = new_ring()
    out = OutgoingRing(buf)
    assert out.try_write(bytes(3000))  # 1072 bytes left: a 2000-byte payload must look
    put_u32(buf, OFF_READ_INDEX, bad)
    with pytest.raises(RingCorruptError) as ei:
        out.write_many([bytes(2000)]) if many else out.try_write(bytes(2000))
    assert ei.value.reason == "bad_read_index" and ei.value.value == bad
    assert u32(buf, OFF_WRITE_INDEX) == 3024


UNCLOSED_RING_IN_A_GARBAGE_CYCLE = """
import gc, mmap
from vmbus.ring import IncomingRing, OutgoingRing, init_ring

def open_channel():
    mm = mmap.mmap(-1, 3 * 8192)
    inbound = memoryview(mm)[8192:16384]  # rings of a pair placed in one mapping
    outbound = memoryview(mm)[16384:]
    init_ring(inbound)
    init_ring(outbound)
    rings = IncomingRing(inbound), OutgoingRing(outbound)  # never closed
    raise RuntimeError("open failed half way")

kept = []
try:
    open_channel()
except RuntimeError as e:
    kept.append(e)  # exception -> traceback -> frame -> the rings and their buffers
kept.clear()  # all of it is now cyclic garbage, collected in no particular order
gc.collect()
print("survived")
"""


@pytest.mark.multiprocess
def test_unclosed_rings_collected_with_their_buffers_do_not_crash() -> None:
    # CPython clears a memoryview in a garbage cycle even while exported; a
    # ring must give its export back first, or cffi's release segfaults.
    r = subprocess.run(
        [sys.executable, "-c", UNCLOSED_RING_IN_A_GARBAGE_CYCLE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stdout.strip()) == (0, "survived"), r.stderr


# -- endpoint lifetime, writer type checks, stale views, zero-copy counters ---------------------
def test_calls_on_a_closed_ring_raise_instead_of_touching_memory():
    shm = SharedMemory.create(8192)
    try:
        init_ring(shm.map)
        out, inc = OutgoingRing(shm.map), IncomingRing(shm.map)
        out.close()
        inc.close()
        shm.map.close()  # the mapping is gone: any access would fault
        shm.map = None
        for call in (
            lambda: out.try_write(b"x"),
            inc.try_read,
            inc.unmask_interrupts,
            out.bytes_writable,
            inc.bytes_readable,
        ):
            with pytest.raises(ValueError, match="closed ring"):
                call()
        inc.mask_interrupts()  # a no-op, not a fault
        assert out.closed and inc.closed and out.corrupt is None
        assert out.debug_info()["write_index"] == 0
    finally:
        shm.close()


@pytest.mark.parametrize("ptype", [0, 1, 5, 8, 0xC, 0x106])
def test_writer_refuses_types_the_reader_would_call_corrupt(ring, ptype):
    _, out, inc = ring
    with pytest.raises(ValueError, match="invalid packet"):
        out.try_write(b"x", packet_type=ptype)
    with pytest.raises(ValueError, match="invalid packet"):
        out.write_many([b"x"], packet_type=ptype)
    assert out.debug_info()["write_index"] == 0 and inc.try_read() is None


def test_completion_packets_are_writable(ring):
    _, out, inc = ring
    assert out.try_write(b"done", packet_type=PacketType.COMP, trans_id=9)
    p = inc.try_read()
    assert p.packet_type is PacketType.COMP and p.trans_id == 9


def test_stale_view_consumes_nothing_and_says_so(ring):
    _, out, inc = ring
    for i in range(3):
        assert out.try_write(bytes([i]) * 8)
    view = inc.peek()  # packet 0, in place
    assert inc.try_read().payload == bytes(8)  # another read delivers packet 0 (and reads ahead)
    with pytest.raises(ValueError, match="stale"):
        view.release()
    assert [p.payload[:1] for p in inc] == [b"\x01", b"\x02"]  # nothing was dropped


def test_stale_read_ahead_view_consumes_nothing(ring):
    _, out, inc = ring
    for i in range(3):
        assert out.try_write(bytes([i]) * 8)
    assert inc.try_read().payload[:1] == b"\x00"  # fills the read-ahead
    view = inc.peek()  # packet 1, from the read-ahead
    assert inc.try_read().payload[:1] == b"\x01"
    with pytest.raises(ValueError, match="stale"):
        view.release()
    assert inc.try_read().payload[:1] == b"\x02"


def test_zero_copy_reads_count_payload_bytes(ring):
    _, out, inc = ring
    assert out.try_write(b"a" * 24)
    with inc.peek() as v:
        assert v.payload_bytes == 24
    assert inc.debug_info()["bytes"] == 24 and inc.debug_info()["packets"] == 1


def test_read_latency_path_delivers_inband_and_validated_gpa_direct(ring):
    _, out, inc = ring
    bell = Doorbell()
    try:
        assert out.try_write(b"ping", trans_id=3, completion_requested=True)
        p = inc.read(bell, 1.0, spin_ns=1000)
        assert (p.packet_type, p.trans_id, p.flags, p.payload) == (
            PacketType.DATA_INBAND,
            3,
            1,
            b"ping\0\0\0\0",
        )
        assert out.try_write_gpa_direct(b"req", [GpaRange(10, 0, (42,))])
        p = inc.read(bell, 1.0, spin_ns=1000)  # types 7/9 take the validating path
        assert p.ranges == (GpaRange(10, 0, (42,)),) and p.payload[:3] == b"req"
        assert inc.read(bell, 0.01, spin_ns=1000) is None  # nothing came: a timeout
    finally:
        bell.close()


def test_read_latency_path_owes_the_writer_its_signal():
    buf = new_ring()
    out, inc = OutgoingRing(buf), IncomingRing(buf)
    while out.try_write(bytes(200)):
        pass
    set_pending(out, packet_bytes(200))  # the writer now waits for one packet's space
    bell = Doorbell()
    try:
        assert inc.read(bell, 1.0, spin_ns=1000) is not None
        assert inc.take_signals() == 1
    finally:
        bell.close()


def test_drain_into_copies_payloads_back_to_back_and_stops_where_they_end():
    buf = new_ring(4096 * 16)
    out, inc = OutgoingRing(buf), IncomingRing(buf)
    big = [bytes([k]) * 5000 for k in range(5)]
    assert out.write_many(big) == 5  # >= 4 KiB: the gather path, no joined blob
    assert out.try_write(b"tail", trans_id=9, completion_requested=True)
    dst = bytearray(3 * 5000 + 100)  # room for three payloads, not four
    infos = inc.drain_into(dst)
    assert [i.payload_bytes for i in infos] == [5000, 5000, 5000]
    assert bytes(dst[:15000]) == b"".join(big[:3])
    infos = inc.drain_into(dst)
    assert [i.payload_bytes for i in infos] == [5000, 5000, 8]
    assert (infos[2].trans_id, infos[2].flags) == (9, 1) and dst[10000:10004] == b"tail"
    assert inc.drain_into(dst) == []
    with pytest.raises(ValueError, match="too small"):
        assert out.try_write(bytes(64))
        inc.drain_into(bytearray(8))
    with pytest.raises(TypeError, match="writable"):
        inc.drain_into(b"read-only")


def test_drain_into_hands_gpa_direct_to_the_validating_path(ring):
    _, out, inc = ring
    assert out.try_write_gpa_direct(b"req", [GpaRange(3, 0, (1,))])
    assert out.try_write(b"next")
    dst = bytearray(64)
    (info,) = inc.drain_into(dst)
    assert info.ranges == (GpaRange(3, 0, (1,)),) and dst[:3] == b"req"
    assert [i.payload_bytes for i in inc.drain_into(dst)] == [8]


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_write_many_large_payloads_stop_where_the_ring_is_full(kind):
    buf = new_ring(4096 * 8)  # 28 KiB of data: five 5000-byte packets fit, not six
    out, inc = OutgoingRing(buf), IncomingRing(buf)
    payloads = [kind(bytes([k]) * 5000) for k in range(7)]
    assert out.write_many(payloads) == 5
    dst = bytearray(1 << 16)
    assert [i.payload_bytes for i in inc.drain_into(dst)] == [5000] * 5
    assert [dst[k * 5000] for k in range(5)] == [0, 1, 2, 3, 4]
    assert out.write_many(payloads[5:]) == 2
    with pytest.raises(ValueError, match="can never fit"):
        out.write_many([kind(10), kind(out.max_payload_bytes + 8)])
    assert [i.payload_bytes for i in inc.drain_into(dst)] == [5000, 5000]  # nothing else


@pytest.mark.parametrize("n", [2, 4, 6])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_write_many_of_large_payloads_any_buffer_all_or_nothing(n: int, kind: type) -> None:
    buf = new_ring(4096 * 32)
    out, inc = OutgoingRing(buf), IncomingRing(buf)
    big = [kind(bytes([k]) * 5000) for k in range(n)]  # >= 4 KiB: the gather paths
    too_big = [*big[:-1], kind(bytes(out.max_payload_bytes + 8))]
    with pytest.raises(ValueError, match="can never fit"):
        out.write_many(too_big)
    assert inc.bytes_readable() == 0  # nothing written, not even the first ones
    assert out.write_many(big) == n
    got = []
    while (p := inc.try_read()) is not None:
        got.append(p.payload)
    assert got == [bytes(b) + bytes(-len(b) % 8) for b in big]


def test_drain_into_returns_a_lazy_batch_that_behaves_like_the_list_it_stands_for():
    buf = new_ring(4096 * 16)
    out, inc = OutgoingRing(buf), IncomingRing(buf)
    sizes = [5000, 4096, 6000]
    assert out.write_many([bytes([k + 1]) * n for k, n in enumerate(sizes)]) == 3
    assert out.try_write(b"12345678", trans_id=7, completion_requested=True)
    dst = bytearray(1 << 16)
    infos = inc.drain_into(dst)
    assert isinstance(infos, ReadInfoBatch) and len(infos) == 4
    expect = [ReadInfo(PacketType.DATA_INBAND, 0, 0, n, None) for n in sizes]
    expect.append(ReadInfo(PacketType.DATA_INBAND, 1, 7, 8, None))
    assert infos == expect and list(infos) == expect and infos != expect[:3]
    assert infos[-1] == expect[3] and infos[1:3] == expect[1:3]
    with pytest.raises(IndexError):
        infos[4]
    assert infos.payload_sizes() == [5000, 4096, 6000, 8]
    assert infos.payload_offsets() == [0, 5000, 9096, 15096]
    assert infos.payload_bytes == 15104
    for off, info, k in zip(infos.payload_offsets()[:3], infos[:3], range(3), strict=True):
        assert dst[off : off + info.payload_bytes] == bytes([k + 1]) * info.payload_bytes
    assert dst[15096:15104] == b"12345678"
    assert "ReadInfoBatch([ReadInfo(" in repr(infos)
    # the batch owns its copy of the descriptors: the next drain does not change it
    assert out.try_write(b"abcdefgh", trans_id=99)
    assert [i.trans_id for i in inc.drain_into(dst)] == [99]
    assert infos == expect
    empty = inc.drain_into(dst)
    assert not empty and empty == [] and empty.payload_bytes == 0


def test_a_spinning_wait_lets_the_other_threads_of_the_process_run(ring):
    """The module keeps the GIL across its short calls but drops it while it
    polls: here the main thread must run during a 0.3 s spin on an empty ring."""
    _, _, inc = ring
    bell = Doorbell()
    try:
        result: list[bool] = []
        t = threading.Thread(
            target=lambda: result.append(inc.wait_readable(bell, 0.3, spin_ns=300_000_000))
        )
        last = time.monotonic()  # (before start: the spin may begin inside it)
        deadline = last + 10
        t.start()
        longest_stall = 0.0
        while t.is_alive() and last < deadline:
            now = time.monotonic()
            longest_stall = max(longest_stall, now - last)
            last = now
        t.join(10)
        assert result == [False]  # nothing came: the wait timed out
        # With the GIL held, the main thread would stand still for the whole spin.
        assert longest_stall < 0.15
    finally:
        bell.close()


@pytest.mark.parametrize("payload_only", [False, True])
def test_a_latency_read_whose_writer_is_a_thread_of_the_same_process_gets_its_packet(
    ring, payload_only
):
    """read() and read_payload() keep the GIL while they spin (bounded by the
    spin): a writer thread of this process runs once the spin gives up and the
    read blocks, and its packet wakes the read."""
    buf, _, inc = ring
    bell = Doorbell()
    try:
        out = OutgoingRing(buf, on_signal=bell.ring)
        t = threading.Thread(target=lambda: out.try_write(b"from a thread"))
        t.start()
        read = inc.read_payload if payload_only else inc.read
        got = read(bell, 10.0)
        t.join(10)
        assert got is not None
        assert (got if payload_only else got.payload)[:13] == b"from a thread"
    finally:
        bell.close()


def test_payload_reads_and_packet_reads_mix_within_one_read_ahead_batch(ring):
    """try_read_payload slices the read-ahead copy directly; the batch's bytes
    for Packets, views and batches are made only when one of those asks."""
    _, out, inc = ring
    for k in range(6):
        assert out.try_write(bytes([k]) * 16, trans_id=k)
    assert inc.try_read_payload() == bytes([0]) * 16  # one C call drained all six
    assert inc.buffered_packets == 5
    p = inc.try_read()
    assert p is not None and (p.trans_id, p.payload) == (1, bytes([1]) * 16)
    assert inc.try_read_payload() == bytes([2]) * 16
    view = inc.peek()
    assert view is not None and b"".join(view.segments) == bytes([3]) * 16
    view.release()
    (q,) = inc.drain(1)
    assert (q.trans_id, q.payload) == (4, bytes([4]) * 16)
    assert inc.try_read_payload() == bytes([5]) * 16
    assert inc.try_read_payload() is None
    # a new batch after the old one was read through payloads only
    assert out.try_write(b"n" * 8, trans_id=9)
    assert inc.try_read_payload() == b"n" * 8
    assert out.try_write(b"m" * 8, trans_id=10)
    p = inc.try_read()
    assert p is not None and (p.trans_id, p.payload) == (10, b"m" * 8)
