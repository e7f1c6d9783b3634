"""storvsp's I/O fast path (StorVsp._fast, over a PacketBatch's raw bytes)
against its general path (``_one`` per Packet): for any request, valid or
not, the same completion bytes, the same exception, the same disk and the same
child memory afterwards.  And the child's request template against
``vstor.build_execute_srb``.

Two rigs run in lockstep on identical copies of everything: a channel pair
over a private buffer, a 1 MiB disk image, a 64-page pool granted as two
mappings (so a buffer across them is two views).  Each example sends the same
packets to both; rig F hands its VSP the drained batch (the fast path), rig G
the same batch as a list of Packets (the general path)."""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv.memwire import MemoryMessage, MemoryOp, MemorySegment
from hv.partition_memory import GrantTable
from partitions.devices.framework import DeviceError, DeviceResources
from partitions.devices.storage.scsi import vstor as V
from partitions.devices.storage.scsi.device import StorVsc, StorVsp
from vmbus.channel import Channel, init_channel_buffer
from vmbus.doorbell import Doorbell
from vmbus.packet import PacketType
from vmbus.ring import PacketBatch

PAGE = 4096
POOL_PFN = 0x1000
POOL_PAGES = 64
DISK_BYTES = 1 << 20
BLOCKS = DISK_BYTES // 512
RING_PAGES = 16
NOT_GRANTED = 0x9000


class Rig:
    def __init__(self, image: bytes, pool: bytes) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="storvsp-fast-")
        path = os.path.join(self.dir.name, "disk.img")
        with open(path, "wb") as f:
            f.write(image)
        fd = os.memfd_create("pool", os.MFD_CLOEXEC)
        os.ftruncate(fd, POOL_PAGES * PAGE)
        self.pool = mmap.mmap(fd, POOL_PAGES * PAGE)
        self.pool[:] = pool
        half = POOL_PAGES // 2
        self.grants = GrantTable()
        msg = MemoryMessage(MemoryOp.GRANT, 1, [MemorySegment(POOL_PFN, half, 0, 0),
                                                MemorySegment(POOL_PFN + half, half, half, 0)],
                            [fd], grant_id=1)
        self.grants.apply(msg)
        msg.close_fds()
        self.buf = bytearray(2 * RING_PAGES * PAGE)
        init_channel_buffer(self.buf, RING_PAGES)
        self.bells = (Doorbell(), Doorbell())
        a, b = self.bells
        self.cch = Channel(self.buf, RING_PAGES, host=False, own_doorbell=a, peer_doorbell=b)
        self.hch = Channel(self.buf, RING_PAGES, host=True, own_doorbell=b, peer_doorbell=a)
        self.vsp = StorVsp(self.hch, {"path": path, "size": DISK_BYTES}, child=1,
                           resources=DeviceResources(memory=self.grants))
        assert self.vsp.accept() == 0
        self.vsp.version = V.VstorVersion.WIN10
        self.vsp.ready = True
        self.path = path

    def serve(self, packets: list[tuple[bytes, bytes | None, int, bool]], fast: bool):
        """Send ``packets`` (payload, GPA header or None, trans_id, completion
        requested), serve them, return (completions, exception)."""
        for payload, hdr, tid, creq in packets:
            if hdr is None:
                assert self.cch.try_send(payload, trans_id=tid, completion_requested=creq)
            else:
                assert self.cch.outgoing.try_write_gpa_direct(payload, hdr, trans_id=tid,
                                                              completion_requested=creq)
        batch = self.hch.incoming.drain()
        assert isinstance(batch, PacketBatch) and len(batch) == len(packets)
        error = None
        try:
            self.vsp.on_packets(batch if fast else list(batch))
        except (DeviceError, ValueError) as e:
            error = (type(e), str(e))
        out = [(p.packet_type, p.trans_id, p.payload) for p in self.cch.incoming.drain()]
        return out, error

    def disk(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def close(self) -> None:
        self.vsp.on_close("test")
        self.cch.close()
        self.hch.close()
        for d in self.bells:
            d.close()
        self.grants.close()
        self.pool.close()
        self.dir.cleanup()


_IMAGE, _POOL = os.urandom(DISK_BYTES), os.urandom(POOL_PAGES * PAGE)


@pytest.fixture
def rigs():
    f, g = Rig(_IMAGE, _POOL), Rig(_IMAGE, _POOL)
    yield f, g
    f.close()
    g.close()


def gpa_header(ranges: list[tuple[int, int, list[int]]]) -> bytes:
    out = struct.pack("<II", 0, len(ranges))
    for count, offset, pfns in ranges:
        out += struct.pack("<II", count, offset) + struct.pack(f"<{len(pfns)}Q", *pfns)
    return out


@st.composite
def requests(draw):
    """An EXECUTE_SRB, mostly READ/WRITE 10/16 near the fast path's edges."""
    code = draw(st.sampled_from([0x28, 0x2A, 0x88, 0x8A, 0x28, 0x2A, 0x12, 0x00, 0x35]))
    lba = draw(st.one_of(st.integers(0, BLOCKS + 2), st.integers(BLOCKS - 40, BLOCKS + 2)))
    blocks = draw(st.sampled_from([0, 1, 3, 8, 9, 16, 17, 64]))
    cflags = draw(st.sampled_from([0, 0, 0, 0x08, 0x10, 0x20]))
    if code in (0x88, 0x8A):
        cdb = struct.pack(">BBQIBB", code, cflags, lba, blocks, 0, 0)
    else:
        cdb = struct.pack(">BBIBHB", code, cflags, lba & 0xFFFFFFFF, 0, blocks & 0xFFFF, 0)
    cdb_len = draw(st.sampled_from([len(cdb), len(cdb), 6, 12, 16, 17]))
    nbytes = blocks * 512
    data_in = draw(st.sampled_from([1 if code in (0x28, 0x88, 0x12) else 0] * 3 + [0, 1, 2]))
    dtl = draw(st.sampled_from([nbytes, nbytes, nbytes + 512, max(0, nbytes - 512), 4096]))
    sense_len = draw(st.sampled_from([20, 20, 18, 0, 21]))
    payload = bytearray(V.build_execute_srb(b"", data_in=V.DataIn.READ, data_transfer_length=0,
                                            version=V.VstorVersion.WIN10))
    struct.pack_into("<BBBxI", payload, 20, cdb_len, sense_len, data_in, dtl)
    payload[28 : 28 + len(cdb)] = cdb
    if draw(st.booleans()) and draw(st.booleans()):
        payload[0] = draw(st.sampled_from([V.VstorOperation.COMPLETE_IO, 99]))
    if draw(st.integers(0, 9)) == 0:  # short: pre-Win8 sized, or not a vstor_packet at all
        payload = payload[: draw(st.sampled_from([0, 8, 24, 48, 56]))]
    kind = draw(st.sampled_from(["range"] * 6 + ["inband", "two", "foreign"]))
    if kind == "inband":
        return bytes(payload), None, draw(st.booleans())
    count = draw(st.sampled_from([dtl, dtl, nbytes, 512, 4096, 8192]) .filter(lambda c: c > 0))
    offset = draw(st.sampled_from([0, 0, 0, 512]))
    pages = (offset + count + PAGE - 1) // PAGE
    first = draw(st.integers(POOL_PFN, POOL_PFN + POOL_PAGES - min(pages, POOL_PAGES)))
    pfns = [first + i for i in range(pages)]
    if kind == "foreign" or pfns[-1] >= POOL_PFN + POOL_PAGES:
        pfns[-1] = NOT_GRANTED
    if draw(st.integers(0, 7)) == 0 and len(pfns) > 1:
        pfns.reverse()  # granted, but not one contiguous buffer
    ranges = [(count, offset, pfns)]
    if kind == "two":
        ranges.append((512, 0, [POOL_PFN]))
    return bytes(payload), gpa_header(ranges), draw(st.booleans()) or True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=8))
def test_fast_path_serves_exactly_as_the_general_path(reqs):
    packets = [(payload, hdr, 100 + i, creq) for i, (payload, hdr, creq) in enumerate(reqs)]
    f, g = Rig(_IMAGE, _POOL), Rig(_IMAGE, _POOL)
    try:
        got_f = f.serve(packets, fast=True)
        got_g = g.serve(packets, fast=False)
        assert got_f == got_g
        assert f.vsp.counters == g.vsp.counters
        assert f.pool[:] == g.pool[:]
        assert f.disk() == g.disk()
    finally:
        f.close()
        g.close()


def test_the_fast_path_is_taken_for_plain_reads_and_writes(rigs, monkeypatch):
    """(So the comparison above compares two paths, not one path twice.)"""
    f, _g = rigs
    general = []
    monkeypatch.setattr(f.vsp, "_one", lambda p: general.append(p))
    hdr = gpa_header([(8192, 0, [POOL_PFN + 31, POOL_PFN + 32])])  # across the two mappings
    pk = []
    for i, (code, din) in enumerate([(0x28, 1), (0x2A, 0), (0x88, 1), (0x8A, 0)]):
        cdb = (struct.pack(">BBIBHB", code, 0, 8, 0, 16, 0) if code < 0x80
               else struct.pack(">BBQIBB", code, 0, 8, 16, 0, 0))
        payload = V.build_execute_srb(cdb, data_in=V.DataIn(din), data_transfer_length=8192,
                                      version=V.VstorVersion.WIN10)
        pk.append((payload, hdr, 7 + i, True))
    before = dict(f.vsp.counters)
    out, err = f.serve(pk, fast=True)
    assert err is None and general == []
    assert [(t, tid) for t, tid, _ in out] == [(PacketType.COMP, 7 + i) for i in range(4)]
    assert f.vsp.counters["read_ops"] == before["read_ops"] + 2
    assert f.vsp.counters["write_bytes"] == before["write_bytes"] + 2 * 8192


@given(st.binary(max_size=16), st.sampled_from(list(V.DataIn)), st.integers(0, 1 << 17),
       st.integers(0, 31))
def test_storvsc_request_template_is_build_execute_srb(cdb, data_in, nbytes, slot):
    vsc = SimpleNamespace(version=V.VstorVersion.WIN10, _templates={})
    sent = []

    class Out:
        @staticmethod
        def try_write_gpa_direct(payload, hdr, **kw):
            sent.append(payload)
            return True

    vsc.channel = SimpleNamespace(outgoing=Out(), try_send=lambda p, **kw: sent.append(p) or True)
    vsc._tid, vsc.pool_pfn, vsc._headers = 0, POOL_PFN, {}
    for _ in range(2):  # the first builds the template, the second uses it
        StorVsc._send_srb(vsc, cdb, data_in, nbytes, slot)  # type: ignore[arg-type]
    want = V.build_execute_srb(cdb, data_in=data_in, data_transfer_length=nbytes,
                               version=V.VstorVersion.WIN10)
    assert sent == [want, want]


def test_submit_many_raises_a_check_condition_only_after_every_request_is_back(rigs):
    """A bad request before a good one: storvsc's submit_many takes every
    completion (no slot of the pool is still in use) and then raises.  (The
    rig's pool holds two of storvsc's 128 KiB slots.)"""
    f, _g = rigs
    vsc = StorVsc(f.cch, {})  # given nothing: no pool of its own to share or free
    vsc.pool = memoryview(f.pool)
    vsc.pool_pfn = POOL_PFN
    vsc.version = V.VstorVersion.WIN10
    vsc.ready = True
    served = []

    def serve_when_waiting(*a, **k):  # the root's turn: serve what the child sent
        batch = f.hch.incoming.drain()
        served.append(len(batch))
        f.vsp.on_packets(batch)
        return True

    f.cch.incoming.wait_readable = serve_when_waiting  # type: ignore[method-assign]
    try:
        lbas = [BLOCKS + 8, 16]  # the first is past the end of the disk
        with pytest.raises(OSError, match="CHECK CONDITION"):
            vsc.submit_many(lbas, 4096, False, b"")
        assert served == [2] and f.cch.incoming.try_read() is None  # both came back
        assert f.vsp.counters["read_ops"] == 1 and f.vsp.counters["errors"] == 1
        lat = vsc.submit_many([0, 8], 4096, False, b"")  # the pool is free for the next batch
        assert len(lat) == 2 and all(t >= 0 for t in lat)
    finally:
        vsc.on_close("test")  # (releases its view of the pool)


@pytest.mark.parametrize("payload", [b"", bytes(8), bytes(24)])
def test_a_short_packet_last_in_a_batch_gets_the_general_paths_answer(payload):
    """(The lean path unpacks a GPA header's 32 bytes only where there is one.)"""
    packets = [(payload, None, 5, True)]
    f, g = Rig(_IMAGE, _POOL), Rig(_IMAGE, _POOL)
    try:
        got = f.serve(packets, fast=True)
        assert got == g.serve(packets, fast=False)
        assert got[1] is None and len(got[0]) == 1  # an error status, nothing raised
    finally:
        f.close()
        g.close()
