"""The C boundary's result vocabulary, and the two losses it once caused.

Every C entry point answers with one int64_t whose fields and flags are named
once in csrc/vmbus_ring.h (the ``VMBR_WRITE_*``, ``VMBR_READ_*``,
``VMBR_DRAIN_*``, ``VMBR_IO_*`` and ``VMBR_XCHG_*`` constants) and read by
those names in vmbus/ring.py.  The first part proves, from the constants cffi
read out of the header, that no two fields of one encoding share a bit for any
value the protocol allows (the C side proves the same with static
assertions).  The second part is the regression tests of issue 14:

* ``read`` returned an empty payload whenever the read owed the writer a
  signal (the payload slice's mask kept the signal bit);
* an in-band packet whose payload offset (offset8 * 8) is >= 64 KiB set the
  signal bit of the packed result, and one >= 128 KiB the "type 7/9, not
  taken" bit: C had consumed a packet that Python then never delivered.

Only ``read`` had the losses; every other read path is driven through the
same cases as a guard: a signal owed, and offset8 on both sides of the
64 KiB, 128 KiB and 256 KiB edges up to 65535.
"""

from __future__ import annotations

import struct

import pytest
from ringtools import OFF_PENDING_SEND_SZ, forge, put_u32
from vmbus._ring_cffi import lib

from vmbus.doorbell import Doorbell
from vmbus.packet import PacketType
from vmbus.ring import IncomingRing, OutgoingRing, init_ring

MAX_OFFSET8 = 0xFFFF  # a u16 (spec §2.1)


# ------------------------------------------------------------ the vocabulary


def test_writer_statuses_are_distinct_and_fit_write4s_status_field() -> None:
    statuses = {lib.VMBR_WRITE_FULL, lib.VMBR_WRITE_DONE, lib.VMBR_WRITE_SIGNAL}
    assert len(statuses) == 3 and max(statuses) <= lib.VMBR_W4_STATUS_MASK
    # write4's count (at most 4) sits wholly above the status field
    assert lib.VMBR_W4_STATUS_MASK < 1 << lib.VMBR_W4_COUNT_SHIFT
    assert (4 << lib.VMBR_W4_COUNT_SHIFT) & lib.VMBR_W4_STATUS_MASK == 0


def test_type_flags_keep_type_and_flags_apart() -> None:
    assert lib.VMBR_TF_COMPLETION_REQUESTED == (
        lib.VMBR_FLAG_COMPLETION_REQUESTED << lib.VMBR_TF_FLAGS_SHIFT
    )
    for ptype in (lib.VMBR_PKT_DATA_INBAND, lib.VMBR_PKT_DATA_USING_XFER_PAGES,
                  lib.VMBR_PKT_DATA_USING_GPA_DIRECT, lib.VMBR_PKT_COMP):
        assert ptype < 1 << lib.VMBR_TF_FLAGS_SHIFT


def test_read_signal_bit_is_below_every_packet_length() -> None:
    # packet lengths are multiples of 8: bit 0 is free for the signal
    assert lib.VMBR_READ_SIGNAL < 8  # lengths are len8 * 8: bits 0-2 are free
    assert lib.VMBR_DRAIN_SIGNAL == lib.VMBR_READ_SIGNAL
    assert lib.VMBR_DRAIN_EXT_NEXT not in (0, lib.VMBR_DRAIN_SIGNAL)


def test_io_fields_and_flags_cannot_collide() -> None:
    end = lib.VMBR_IO_END_MASK
    aux = lib.VMBR_IO_AUX_MASK << lib.VMBR_IO_AUX_SHIFT
    flags = [lib.VMBR_IO_SIGNAL, lib.VMBR_IO_EXT_NEXT, lib.VMBR_IO_BROKEN]
    xchg = [lib.VMBR_XCHG_UNSENT, lib.VMBR_XCHG_SIGNAL, lib.VMBR_XCHG_READ]
    fields = [end, aux, *flags, *xchg]
    for i, a in enumerate(fields):
        for b in fields[i + 1 :]:
            assert a & b == 0, (hex(a), hex(b))
    for f in flags + xchg:
        assert f & (f - 1) == 0  # one bit each
    # every flag lies above every field: "below VMBR_IO_SIGNAL" = plain answer
    assert max(end, aux) < min(flags) and max(flags) < min(xchg)
    assert sum(fields) < 1 << 63  # never the sign bit
    # the largest values the protocol allows fit their fields
    assert MAX_OFFSET8 * 8 <= lib.VMBR_IO_AUX_MASK  # offset8 * 8 (spin_read_io)
    assert lib.VMBR_IO_MAX_PACKETS <= lib.VMBR_IO_AUX_MASK  # drain_io's count
    assert lib.VMBR_MAX_PACKET_BYTES <= lib.VMBR_IO_END_MASK
    assert lib.VMBR_IO_END_MASK >= 0xFFFFFFFF  # io_cap is a u32: any batch end
    assert lib.VMBR_XCHG_ANSWER_LIMIT == lib.VMBR_IO_END_MASK + 1


def test_readahead_packets_beyond_the_count_field_are_refused() -> None:
    buf = bytearray(8192)
    init_ring(buf)
    with pytest.raises(ValueError, match="readahead_packets"):
        IncomingRing(buf, readahead_packets=lib.VMBR_IO_MAX_PACKETS + 1)
    with pytest.raises(ValueError, match="readahead_bytes"):
        IncomingRing(buf, readahead_bytes=1 << 32)


# ------------------------------------------------- loss 1: a signal owed


def full_ring_owing_a_signal(size: int = 8192) -> tuple[bytearray, OutgoingRing, list[bytes]]:
    """A ring filled with distinct 200-byte payloads, and a writer that waits
    for one more packet's room: the first read crosses pending_send_sz."""
    buf = bytearray(size)
    init_ring(buf)
    out = OutgoingRing(buf)
    sent = []
    while out.try_write(p := bytes([len(sent) % 251 + 1]) * 200):
        sent.append(p)
    assert out.request_space(232) is False  # (not free yet: the reader will signal)
    return buf, out, sent


@pytest.mark.parametrize("path", ["read", "read_payload", "try_read", "try_read_payload"])
def test_a_read_that_owes_the_writer_a_signal_keeps_its_payload(path: str) -> None:
    buf, _, sent = full_ring_owing_a_signal()
    inc = IncomingRing(buf, readahead_packets=1)
    with Doorbell() as db:
        got = []
        for _ in sent:
            if path == "read":
                got.append(inc.read(db, 1.0).payload)
            elif path == "read_payload":
                got.append(inc.read_payload(db, 1.0))
            elif path == "try_read":
                got.append(inc.try_read().payload)
            else:
                got.append(inc.try_read_payload())
        assert got == sent
        assert inc.take_signals() == 1


def test_an_exchange_whose_answer_owes_the_writer_a_signal_keeps_its_payload() -> None:
    a, b = bytearray(8192), bytearray(8192)
    init_ring(a)
    init_ring(b)
    out, inc = OutgoingRing(a), IncomingRing(b, readahead_packets=1)
    inc.bind_reply_ring(out)
    peer_in, peer_out = IncomingRing(a), OutgoingRing(b)
    peer_in.mask_interrupts()  # the peer polls: the request owes no signal (C's path)
    answers = []
    while peer_out.try_write(p := bytes([len(answers) + 1]) * 200):
        answers.append(p)
    assert peer_out.request_space(232) is False
    with Doorbell() as db:
        assert inc.exchange(b"q", db, 1.0) == answers[0]
        assert inc.take_signals() == 1
        assert [inc.exchange(b"q", db, 1.0) for _ in answers[1:]] == answers[1:]


# -------------------------------------- loss 2: long in-band headers


def forged_inband(offset8: int, payload: bytes, trans_id: int) -> bytes:
    """An in-band packet as any peer may write it: offset8 * 8 bytes of
    descriptor and (meaningless for type 6) extended header, then payload."""
    assert len(payload) % 8 == 0
    len8 = offset8 + len(payload) // 8
    ext = bytes([0xEE]) * (offset8 * 8 - 16)
    body = struct.pack("<HHHHQ", 6, offset8, len8, 0, trans_id) + ext + payload
    return body + struct.pack("<Q", 0)  # trailer (the reader does not check it)


OFFSET8S = [2, 3, 8191, 8192, 8193, 16383, 16384, 16385, 32768, MAX_OFFSET8 - 1, MAX_OFFSET8]


def ring_with(offset8: int, *, owe_signal: bool) -> tuple[bytearray, bytes, bytes]:
    """A 1 MiB ring holding a long-header packet, then a plain one; with
    ``owe_signal`` the writer waits for room the first read frees."""
    # 520 bytes, or what len8 (a u16 too) leaves: none at offset8 = 65535
    payload = (bytes(range(256)) * 2 + b"tail-pkt")[: 8 * min(65, MAX_OFFSET8 - offset8)]
    buf = bytearray(4096 + (1 << 20))
    init_ring(buf)
    end = forge(buf, forged_inband(offset8, payload, trans_id=77))
    second = b"next-one" * 3
    end = forge(buf, forged_inband(2, second, trans_id=78), end)
    if owe_signal:
        # the writer waits until more than what is free now plus 8 is free
        put_u32(buf, OFF_PENDING_SEND_SZ, ((1 << 20) - end) + 8)
    return buf, payload, second


@pytest.mark.parametrize("owe_signal", [False, True], ids=["no-signal", "signal-owed"])
@pytest.mark.parametrize("offset8", OFFSET8S)
@pytest.mark.parametrize(
    "path", ["read", "read_payload", "try_read", "try_read_payload", "read_into",
             "drain_into", "drain", "peek", "exchange"],
)
def test_every_read_path_delivers_any_header_length(path: str, offset8: int,
                                                    owe_signal: bool) -> None:
    buf, payload, second = ring_with(offset8, owe_signal=owe_signal)
    inc = IncomingRing(buf, readahead_packets=1)
    with Doorbell() as db:
        got = [read_one(inc, path, db), read_one(inc, path, db)]
        assert got[0] == (payload, 77)
        assert got[1] == (second, 78)
        assert inc.try_read() is None  # nothing more, nothing lost
        assert inc.take_signals() == (1 if owe_signal else 0)
        assert inc.corrupt is None


def read_one(inc: IncomingRing, path: str, db: Doorbell) -> tuple[bytes, int | None]:
    """One packet through ``path``: (payload, trans_id or None where the path
    does not report it)."""
    if path == "read":
        p = inc.read(db, 1.0)
        return p.payload, p.trans_id
    if path == "read_payload":
        return inc.read_payload(db, 1.0), read_tid(inc)
    if path == "try_read":
        p = inc.try_read()
        return p.payload, p.trans_id
    if path == "try_read_payload":
        return inc.try_read_payload(), read_tid(inc)
    if path == "read_into":
        dst = bytearray(4096)
        info = inc.read_into(dst)
        return bytes(dst[: info.payload_bytes]), info.trans_id
    if path == "drain_into":  # (max_packets=1: one packet per call, as the others)
        dst = bytearray(4096)
        (info,) = inc.drain_into(dst, max_packets=1)
        return bytes(dst[: info.payload_bytes]), info.trans_id
    if path == "drain":
        (p,) = inc.drain(max_packets=1)
        return p.payload, p.trans_id
    if path == "peek":
        v = inc.peek()
        with v:
            got = bytes(b"".join(bytes(s) for s in v.segments)), v.trans_id
        return got
    if path == "exchange":
        return exchange_one(inc, db), read_tid(inc)
    raise AssertionError(path)


def read_tid(inc: IncomingRing) -> int | None:
    """Payload-only paths report no trans_id: the test's packets carry
    77 then 78, so the count of packets read stands in for it."""
    return 76 + int(inc.debug_info()["packets"])


def exchange_one(inc: IncomingRing, db: Doorbell) -> bytes | None:
    """``exchange`` with a reply ring whose reader polls (C's one-call path)."""
    if getattr(inc, "_test_reply", None) is None:
        a = bytearray(8192)
        init_ring(a)
        out = OutgoingRing(a)
        peer = IncomingRing(a)
        peer.mask_interrupts()
        inc.bind_reply_ring(out)
        inc._test_reply = (out, peer)  # type: ignore[attr-defined]
    out, peer = inc._test_reply  # type: ignore[attr-defined]
    answer = inc.exchange(b"request!", db, 1.0)
    assert peer.try_read_payload() == b"request!"
    assert out.take_signals() == 0
    return answer


def test_a_long_header_answer_is_not_mistaken_for_a_type_7_or_9() -> None:
    """offset8 * 8 >= 128 KiB once set the "type 7/9, not taken" bit: the
    batch path then found the ring empty and the packet was gone."""
    buf, payload, second = ring_with(16384, owe_signal=False)
    inc = IncomingRing(buf)
    with Doorbell() as db:
        p = inc.read(db, 1.0)
        assert p is not None and p.packet_type is PacketType.DATA_INBAND
        assert p.payload == payload and p.raw()[16:24] == b"\xee" * 8
        assert inc.read(db, 1.0).payload == second


def test_an_exchange_whose_read_breaks_the_ring_raises_after_sending() -> None:
    """vmbr_exchange_io never returns a negative: a read that finds the ring
    broken is VMBR_XCHG_READ | VMBR_IO_BROKEN, and exchange raises."""
    from ringtools import desc

    from vmbus.errors import RingCorruptError

    a, b = bytearray(8192), bytearray(8192)
    init_ring(a)
    init_ring(b)
    out, inc = OutgoingRing(a), IncomingRing(b)
    inc.bind_reply_ring(out)
    peer = IncomingRing(a)
    peer.mask_interrupts()  # the request owes no signal: C goes on to the read
    forge(b, desc(5, 2, 3) + bytes(8) + bytes(8))  # packet type 5: not a ring's
    rc = lib.vmbr_exchange_io(inc._r, b"request!", 8)
    assert rc == lib.VMBR_XCHG_READ | lib.VMBR_IO_BROKEN
    assert peer.try_read_payload() == b"request!"  # it was sent
    with Doorbell() as db, pytest.raises(RingCorruptError, match="bad_packet_type"):
        inc.exchange(b"again!!!", db, 1.0)
