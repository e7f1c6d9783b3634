"""Fuzz the Dynamic Memory messages a child sends: ``dm_protocol.decode`` alone,
and the root's DM VSP (``DmVsp``) fed a sequence of them between the root's
own operations (hot-add, balloon, unballoon, a timeout, a close), over a real
channel, with a stand-in supervisor whose answers the input picks.

Allowed: ``DmProtocolError`` from ``decode``; from the VSP, ``DeviceError``
(any ``ValueError``: the device contract, partitions/devices/framework.py), which
closes the channel and ends the input.  Also checked: what decodes
re-encodes to the same message; every operation's ``done`` is called once;
the VSP's page counts stay non-negative.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from _fuzzlib import Reader, Writer, instrumented, main

with instrumented():
    from hv.abi import HvStatus
    from partitions.devices.dynmem import protocol as D
    from partitions.devices.dynmem.device import DmVsp
    from partitions.devices.framework import DeviceResources
    from vmbus.channel import Channel, init_channel_buffer
    from vmbus.doorbell import Doorbell
    from vmbus.packet import Packet

MiB = 1 << 20
RING_PAGES = 4
STATUSES = [HvStatus.SUCCESS] * 4 + [HvStatus.OPERATION_DENIED, HvStatus.INSUFFICIENT_MEMORY,
                                     HvStatus.ACCESS_DENIED, HvStatus.INVALID_PARTITION_ID, 0x77]
# steps: a child's message (most), or the root's side
MSG, HOT_ADD, BALLOON, UNBALLOON, TIMEOUT, CLOSE = range(6)
STEPS = [MSG] * 6 + [HOT_ADD, BALLOON, UNBALLOON, TIMEOUT, CLOSE]


class _Hv:
    """The root's memory hypercalls; each answer's status comes from the input."""

    def __init__(self, r: Reader) -> None:
        self.r = r

    def memory_hot_add(self, child: int, nbytes: int) -> tuple[int, int, int]:
        st = self.r.pick(STATUSES)
        return (st, 0x40000, nbytes // 4096) if st == HvStatus.SUCCESS else (st, 0, 0)

    def memory_balloon(self, child: int, ranges: list[tuple[int, int]]) -> tuple[int, int]:
        assert ranges and all(n > 0 for _, n in ranges)
        st = self.r.pick(STATUSES)
        return st, sum(n for _, n in ranges) if st == HvStatus.SUCCESS else 0

    def memory_unballoon(self, child: int, max_pages: int) -> tuple[int, list[tuple[int, int]]]:
        st = self.r.pick(STATUSES)
        n = min(max_pages, self.r.below(2000))
        return st, ([(0x50000 + 2 * i, 1) for i in range(n)] if st == HvStatus.SUCCESS else [])


class _Partition:
    def __init__(self, r: Reader) -> None:
        self.hv = _Hv(r)
        self.timers: list[Any] = []
        self.vmbus = None

    def call_later(self, delay: float, fn: Any) -> None:
        self.timers.append(fn)


def _packet(payload: bytes) -> Packet:
    body = payload + bytes(-len(payload) % 8)
    return Packet(struct.pack("<HHHHQ", 6, 2, 2 + len(body) // 8, 0, 0) + body)


def _decode_only(data: bytes) -> None:
    try:
        msg, tid = D.decode(data)
    except D.DmProtocolError:
        return
    assert D.decode(msg.encode(tid)) == (msg, tid)


def _vsp(r: Reader) -> None:
    buf = bytearray(2 * RING_PAGES * 4096)
    init_channel_buffer(buf, RING_PAGES)
    ch = Channel(buf, RING_PAGES, host=True, own_doorbell=Doorbell(), peer_doorbell=Doorbell())
    done: list[dict[str, Any]] = []
    started = 0
    try:
        part = _Partition(r)
        vsp = DmVsp(ch, {}, lambda *a, **k: None, child=1, resources=DeviceResources(
            hypercalls=part.hv, call_later=part.call_later))
        for _ in range(48):
            if not r.left():
                break
            step = r.pick(STEPS)
            if step == MSG:
                try:
                    vsp.on_packets([_packet(r.chunk(600))])
                except ValueError:  # DeviceError: the channel closes
                    vsp.close("fuzz")
                    break
            elif step in (HOT_ADD, BALLOON, UNBALLOON):
                nbytes = r.below(1 << 16) * 4096
                started += 1
                op = (vsp.hot_add if step == HOT_ADD else vsp.balloon if step == BALLOON
                      else vsp.unballoon)
                op(nbytes, done.append)
            elif step == TIMEOUT:
                if part.timers:
                    part.timers.pop(r.below(len(part.timers)))()
            else:
                vsp.close("fuzz")
                break
            assert vsp.hot_added_pages >= 0 and vsp.ballooned_pages >= 0
        vsp.close("end")
        assert len(done) == started, (len(done), started)  # every operation answered once
    finally:
        ch.close()


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    if r.u8() & 1:
        _decode_only(r.rest())
    else:
        _vsp(r)


def _messages() -> list[tuple[D.DmMessage, int]]:
    R = D.PageRange
    return [
        (D.VersionRequest(D.DmVersion.WIN10), 1),
        (D.VersionRequest(D.DmVersion.WIN7, True), 2),
        (D.VersionResponse(True), 1),
        (D.CapabilitiesReport(), 3),
        (D.CapabilitiesResponse(True), 3),
        (D.StatusReport(num_avail=0x1000, num_committed=0x2000), 4),
        (D.BalloonRequest(512), 5),
        (D.BalloonResponse((R(0x100, 0x200), R(0x12345, 1)), more_pages=True), 1),
        (D.UnballoonRequest((R(0x40000, 512),)), 6),
        (D.UnballoonResponse(), 1),
        (D.HotAddRequest(R(0x40000, 0x8000)), 7),
        (D.HotAddRequest(R(0x40000, 0x100), R(0x40000, 0x8000)), 7),
        (D.HotAddResponse(0x8000, 1), 1),
        (D.InfoMessage.max_page_count(0x100000), 0),
    ]


def seeds() -> Iterator[bytes]:
    for m, tid in _messages():
        yield b"\x01" + m.encode(tid)
        yield b"\x01" + m.encode(tid) + bytes(8)  # padded to 8, as VMBus does
    R = D.PageRange

    def msg(w: Writer, m: D.DmMessage, tid: int) -> Writer:
        return w.pick(STEPS, MSG).chunk(m.encode(tid), 600)

    ok = STATUSES.index(HvStatus.SUCCESS)
    w = Writer().u8(0)
    msg(w, D.VersionRequest(D.DmVersion.WIN10), 1)
    msg(w, D.CapabilitiesReport(), 2)
    msg(w, D.StatusReport(num_avail=100, num_committed=2000), 3)
    w.pick(STEPS, HOT_ADD).u16(32768).u8(ok)  # 128 MiB; the supervisor maps it
    msg(w, D.HotAddResponse(32768, 1), 1)
    w.pick(STEPS, BALLOON).u16(600)
    msg(w, D.BalloonResponse((R(0x100, 300),), more_pages=True), 2)
    msg(w, D.BalloonResponse((R(0x400, 300),)), 2)
    w.u8(ok)  # the supervisor takes them
    w.pick(STEPS, UNBALLOON).u16(600).u8(ok).u16(3)
    msg(w, D.UnballoonResponse(), 3)
    w.pick(STEPS, BALLOON).u16(8)
    w.pick(STEPS, TIMEOUT).u8(0)
    yield w.done()


if __name__ == "__main__":
    main(TestOneInput)
