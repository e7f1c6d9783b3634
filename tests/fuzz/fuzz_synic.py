"""Fuzz the SynIC pages a partition can write: ``decode_hv_message`` on a copied
slot, and the supervisor's ``SynicHost`` while the partition scribbles on its
message and event-flag pages between posts, EOMs, signals and reads (and the
partition's own ``SynicGuest`` reading what is in its slots).

Allowed: ``SynicError`` from ``decode_hv_message``; nothing at all from
``SynicHost`` (a statuses-only API) or ``SynicGuest.read_messages``.  Also
checked: a port never holds more than its 16 buffers; a decoded message's
payload is exactly PayloadSize bytes; the partition takes exactly the event
flags the supervisor sees set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from _fuzzlib import Reader, Writer, instrumented, main

with instrumented():
    from hv import synic as S
    from hv.abi import HV_MESSAGE_SIZE, MAX_PAYLOAD, PORT_BUFFER_COUNT, HvStatus

# steps: the partition writes its pages (a word or a run of bytes), or the
# supervisor / partition does one of its calls
WORD, BYTES, POST, SERVICE, SIGNAL, READ, EVENTS, BUFFERS, DROP = range(9)
STEPS = [WORD, WORD, BYTES, POST, POST, POST, SERVICE, SIGNAL, READ, READ, EVENTS, BUFFERS, DROP]
PORTS = ["a", "b", None]


def _decode_only(r: Reader) -> None:
    sint = r.below(16)
    raw = r.bytes(HV_MESSAGE_SIZE + 2)[: r.pick([HV_MESSAGE_SIZE] * 6 + [0, 255, 257])]
    try:
        m = S.decode_hv_message(raw, sint)
    except S.SynicError:
        return
    assert m.sint == sint and len(m.payload) == raw[4] <= MAX_PAYLOAD
    assert S.decode_hv_message(S.encode_hv_message(
        m.message_type, m.payload, flags=m.flags, origination_id=m.origination_id), sint) == m


def _pages(r: Reader) -> None:
    host = S.SynicHost(7, label="fuzz")
    try:
        guest = S.SynicGuest(*(os.dup(fd) for fd in host.handles()))
    except BaseException:
        host.close()
        raise
    try:
        with host, guest:
            for _ in range(64):
                if not r.left():
                    break
                step = r.pick(STEPS)
                if step == WORD:  # one aligned word anywhere in the two pages
                    off = r.below(S.SYNIC_BYTES // 4) * 4
                    guest._words.store(off, r.u32())
                elif step == BYTES:
                    off = r.below(S.SYNIC_BYTES)
                    b = r.chunk(64)[: S.SYNIC_BYTES - off]
                    guest._map[off : off + len(b)] = b
                elif step == POST:
                    sint = r.pick([2, 2, 2, 0, 15, 16, -1])
                    # (what the router lets through: not 0, MSB clear)
                    mtype = r.pick([1, 1, 0x100, None])
                    if mtype is None:
                        mtype = (r.u32() & 0x7FFFFFFF) or 1
                    payload = r.chunk(MAX_PAYLOAD + 1)
                    st = host.post(sint, mtype, payload, origination_id=7, port=r.pick(PORTS))
                    assert st in (HvStatus.SUCCESS, HvStatus.INSUFFICIENT_BUFFERS,
                                  HvStatus.INVALID_PARAMETER), st
                elif step == SERVICE:
                    assert host.service() >= 0
                elif step == SIGNAL:
                    st = host.signal_event(r.pick([2, 2, 0, 16]), r.pick([0, 1, 31, 2047, 2048]))
                    assert st in (HvStatus.SUCCESS, HvStatus.INVALID_PARAMETER), st
                elif step == READ:
                    sint = r.pick([2, 2, 0, 15])
                    for m in guest.read_messages(sint, limit=r.below(20) + 1):
                        assert m.sint == sint and len(m.payload) <= MAX_PAYLOAD
                elif step == EVENTS:
                    sint = r.pick([2, 2, 0, 15])
                    before = host.event_flags(sint)
                    got = guest.take_events(sint)
                    assert got == sorted(before), (got, before)
                elif step == BUFFERS:
                    for port in PORTS:
                        assert 0 <= host.buffers_in_use(port) <= PORT_BUFFER_COUNT
                else:
                    host.drop_queued()
                    for port in PORTS:
                        assert host.buffers_in_use(port) == 0
    finally:
        host.close()
        guest.close()


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    if r.u8() & 1:
        _decode_only(r)
    else:
        _pages(r)


def seeds() -> Iterator[bytes]:
    for mtype, payload, flags in [(1, b"", 0), (1, bytes(range(240)), 1), (0x100, b"x" * 24, 0)]:
        raw = S.encode_hv_message(mtype, payload, flags=flags, origination_id=3)
        yield Writer().u8(1).below(16, 2).raw(raw).u16(0).below(9, 0).done()
    w = Writer().u8(0)
    for i in range(3):  # three posts to SINT 2: one in the slot, two queued
        w.pick(STEPS, POST).below(7, 0).below(4, 0).chunk(bytes([i]) * 40, MAX_PAYLOAD + 1)
        w.below(3, 0)
    w.pick(STEPS, READ).below(4, 0).below(20, 5)
    w.pick(STEPS, SERVICE).pick(STEPS, READ).below(4, 0).below(20, 5)
    w.pick(STEPS, SIGNAL).below(5, 0).below(5, 1)
    w.pick(STEPS, EVENTS).below(4, 0)
    w.pick(STEPS, WORD).below(S.SYNIC_BYTES // 4, 2 * 64).u32(5)  # garbage MessageType
    w.pick(STEPS, POST).below(7, 0).below(4, 0).chunk(b"stuck", MAX_PAYLOAD + 1).below(3, 1)
    w.pick(STEPS, BUFFERS).pick(STEPS, DROP)
    yield w.done()


if __name__ == "__main__":
    main(TestOneInput)
