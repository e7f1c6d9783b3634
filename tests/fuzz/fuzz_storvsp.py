"""Fuzz storvsp (``partitions.devices.storvsc.StorVsp``) as a child drives it:
a batch of VSTOR packets on its channel (inband, or GPA-direct naming pages
the child granted, half-granted or never granted), handed to the VSP as the
drained batch (the lean READ/WRITE path) or packet by packet (the general
path), before or after the initialisation handshake.

Allowed: ``DeviceError`` (any ``ValueError``: the device contract), after
which the channel is closed.  Also checked: every answer is a completion of
the size the protocol gives; the disk image never grows; pages the child did
not grant are never touched (they are not mapped at all: the grant table
refuses them).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

from _fuzzlib import Reader, Writer, instrumented, main

with instrumented():
    from hv.memwire import MemoryMessage, MemoryOp, MemorySegment
    from hv.partition_memory import GrantTable
    from partitions.devices.framework import DeviceResources
    from partitions.devices.storage.disk import DiskImage, open_image
    from partitions.devices.storage.scsi import vstor as V
    from partitions.devices.storage.scsi.device import StorVsp
    from partitions.devices.storage.scsi.scsi import FileBackend, ScsiDisk
    from vmbus.channel import Channel, init_channel_buffer
    from vmbus.doorbell import Doorbell
    from vmbus.packet import GpaRange, PacketType

PAGE = 4096
POOL_PFN, POOL_PAGES = 0x1000, 16
DISK_BYTES = 256 * 1024
BLOCKS = DISK_BYTES // 512
RING_PAGES = 16
PFN_CHOICES = [POOL_PFN, POOL_PFN + 1, POOL_PFN + 7, POOL_PFN + 8, POOL_PFN + 15,
               POOL_PFN + 16, 0x9000, None]
VERSIONS = [None, V.VstorVersion.WIN10, V.VstorVersion.WIN8, V.VstorVersion.WIN7]
CODES = [0x28, 0x2A, 0x88, 0x8A, 0x28, 0x2A, 0x12, 0x00, 0x35, 0x25, 0x9E, 0x1A, 0xA0, None]
_state: dict[str, Any] = {}


def _shared() -> dict[str, Any]:
    """The disk image and the granted pool (two mappings), kept across inputs."""
    if not _state:
        d = tempfile.mkdtemp(prefix="viridian-fuzz-storvsp-")
        image = open_image(os.path.join(d, "disk.img"), DISK_BYTES)
        fd = os.memfd_create("pool", os.MFD_CLOEXEC)
        os.ftruncate(fd, POOL_PAGES * PAGE)
        grants = GrantTable()
        half = POOL_PAGES // 2
        msg = MemoryMessage(MemoryOp.GRANT, 1, [MemorySegment(POOL_PFN, half, 0, 0),
                                                MemorySegment(POOL_PFN + half, half, half, 0)],
                            [fd], grant_id=1)
        grants.apply(msg)
        msg.close_fds()
        _state.update(dir=d, image=image, grants=grants)
    return _state


def close() -> None:
    if _state:
        _state["grants"].close()
        _state["image"].close()
        shutil.rmtree(_state["dir"], ignore_errors=True)
        _state.clear()


def _request(r: Reader) -> tuple[bytes, bytes | None, int, bool]:
    """(payload, GPA header or None, trans_id, completion requested)."""
    code = r.pick(CODES)
    if code is None:  # any bytes at all
        payload = r.chunk(80)
    else:
        lba, blocks = r.pick([0, 1, BLOCKS - 8, BLOCKS - 1, BLOCKS, None]), r.pick(
            [0, 1, 8, 9, 16, 64, None])
        lba = r.u32() if lba is None else lba
        blocks = r.u16() if blocks is None else blocks
        cflags = r.pick([0, 0, 0x08, 0x10, 0x20, 0xE0])
        if code in (0x88, 0x8A, 0x9E):
            cdb = struct.pack(">BBQIBB", code, cflags | (0x10 if code == 0x9E else 0), lba,
                              blocks, 0, 0)
        else:
            cdb = struct.pack(">BBIBHB", code, cflags, lba & 0xFFFFFFFF, 0, blocks & 0xFFFF, 0)
        data_in = r.pick([1 if code not in (0x2A, 0x8A) else 0, 0, 1, 2])
        dtl = r.pick([blocks * 512, blocks * 512, 4096, 0, None])
        dtl = r.u32() if dtl is None else dtl
        version = r.pick([V.VstorVersion.WIN10, V.VstorVersion.WIN7])
        payload = bytearray(V.build_execute_srb(cdb, data_in=V.DataIn(data_in),
                                                data_transfer_length=dtl & 0xFFFFFFFF,
                                                version=version))
        for _ in range(r.below(3)):  # a field out of its range, or any byte changed
            payload[r.below(len(payload))] = r.u8()
        payload = bytes(payload[: r.pick([len(payload)] * 6 + [0, 12, 47, 63])])
    hdr = None
    if r.flag():
        ranges = []
        for _ in range(r.pick([1, 1, 1, 2])):
            count = r.pick([4096, 8192, 512, 1, 32768, None])
            count = (r.u16() or 1) if count is None else count
            offset = r.pick([0, 0, 0, 512, 4095])
            pfns = []
            for _ in range(GpaRange.pages_spanned(offset, count)):
                pfn = r.pick(PFN_CHOICES)
                pfns.append(r.u32() if pfn is None else pfn + len(pfns))
            ranges.append(GpaRange(count, offset, tuple(pfns)))
        hdr = ranges
    return payload, hdr, r.u16(), r.below(4) != 0


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    shared = _shared()
    image, grants = shared["image"], shared["grants"]
    buf = bytearray(2 * RING_PAGES * PAGE)
    init_channel_buffer(buf, RING_PAGES)
    a, b, c, d = Doorbell(), Doorbell(), Doorbell(), Doorbell()
    cch = Channel(buf, RING_PAGES, host=False, own_doorbell=a, peer_doorbell=b)
    hch = Channel(buf, RING_PAGES, host=True, own_doorbell=c, peer_doorbell=d)
    vsp = None
    try:
        vsp = StorVsp(hch, {"path": "(fuzz)", "size": DISK_BYTES}, lambda *a, **k: None,
                      child=1, resources=DeviceResources(memory=grants))
        vsp.image = DiskImage(image.path, os.dup(image.fd), DISK_BYTES)  # (closed by the VSP)
        vsp.disk = ScsiDisk(FileBackend(vsp.image.fd, DISK_BYTES))
        vsp.version = r.pick(VERSIONS)
        vsp.ready = vsp.version is not None and r.u8() != 0
        for _ in range(r.below(4) + 1):  # batches
            sent = 0
            for _ in range(r.below(6) + 1):
                payload, hdr, tid, creq = _request(r)
                if hdr is None:
                    ok = cch.try_send(payload, trans_id=tid, completion_requested=creq)
                else:
                    ok = cch.outgoing.try_write_gpa_direct(payload, hdr, trans_id=tid,
                                                           completion_requested=creq)
                sent += bool(ok)
            batch = hch.incoming.drain()
            assert len(batch) == sent
            try:
                vsp.on_packets(batch if r.flag() else list(batch))
            except ValueError:  # DeviceError: the channel closes
                vsp.close("fuzz")
                break
            for p in cch.incoming.drain():
                assert p.packet_type == PacketType.COMP
                assert len(p.payload) >= V.HEADER_BYTES
        vsp.close("end")
        assert os.fstat(image.fd).st_size == DISK_BYTES
    finally:
        if vsp is not None:
            vsp.close("end")  # (closes its image)
        cch.close()
        hch.close()


def _srb(w: Writer, code: int, lba: int, blocks: int, data_in: int, gpa: bool) -> Writer:
    w.pick(CODES, code).below(6, [0, 1, BLOCKS - 8, BLOCKS - 1, BLOCKS].index(lba))
    w.below(7, [0, 1, 8, 9, 16, 64].index(blocks)).below(6, 0)
    w.below(4, [1 if code not in (0x2A, 0x8A) else 0, 0, 1, 2].index(data_in))
    w.below(5, 0).below(2, 0).below(3, 0).below(10, 0)
    if gpa:
        w.flag(True).below(4, 0).below(6, 0).below(5, 0)
        for _ in range(GpaRange.pages_spanned(0, 4096)):
            w.below(8, 0)
    else:
        w.flag(False)
    return w.u16(7).below(4, 1)


def seeds() -> Iterator[bytes]:
    # the handshake, packet by packet, from scratch
    w = Writer().below(4, 0).below(4, 0).below(6, 3)
    for pkt in (V.build_begin_initialization(),
                V.build_query_protocol_version(V.VstorVersion.WIN10),
                V.build_query_properties(), V.build_end_initialization()):
        w.pick(CODES, None).chunk(pkt, 80).flag(False).u16(1).below(4, 1)
    yield w.flag(False).done()
    # after it: reads and writes of one page, INQUIRY, SYNCHRONIZE CACHE
    for fast in (True, False):
        w = Writer().below(4, 1).u8(1).below(4, 0).below(6, 3)
        _srb(w, 0x28, 0, 8, 1, True)
        _srb(w, 0x2A, 1, 8, 0, True)
        _srb(w, 0x12, 0, 0, 1, False)
        _srb(w, 0x35, 0, 0, 2, False)
        w.flag(fast)
        yield w.done()


if __name__ == "__main__":
    main(TestOneInput)
