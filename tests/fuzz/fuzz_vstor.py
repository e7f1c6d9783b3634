"""Fuzz the VSTOR packets and SCSI commands a child sends to storvsp:
``vstor.decode_packet`` and ``vstor.decode_srb`` (the I/O path's decoder),
then the CDB of an SRB through ``ScsiDisk.execute`` over a small disk.

Allowed: ``VstorError`` from the decoders.  ``ScsiDisk.execute`` may raise
nothing for a CDB (its documented ValueError is for a transport bug, a
buffer or CDB shorter than the SRB says, which the harness never makes).
Also checked: ``decode_srb`` refuses exactly what ``decode_packet``
refuses and reads the same fields; a completion re-encodes; the disk moves
no more than the transfer length, and sense only with CHECK CONDITION.
"""

from __future__ import annotations

from collections.abc import Iterator

from _fuzzlib import Reader, Writer, instrumented, main

with instrumented():
    from partitions.devices.storage.scsi import scsi as S
    from partitions.devices.storage.scsi import vstor as V

SIZES = [V.VSTOR_PACKET_BYTES, V.VSTOR_PACKET_BYTES_PRE_WIN8]
COMPLETES = [None, *V.VstorOperation]
DISK_BLOCKS = 64
_disk: S.ScsiDisk | None = None


def _the_disk() -> S.ScsiDisk:
    global _disk
    if _disk is None:
        _disk = S.ScsiDisk(S.MemoryBackend(DISK_BLOCKS * 512), serial="FUZZ0001")
    return _disk


def _decoders(r: Reader) -> None:
    size = r.pick(SIZES)
    completes = r.pick(COMPLETES)
    completion = r.flag()
    data = r.rest()
    try:
        pkt = V.decode_packet(data, size=size, completes=completes)
    except V.VstorError:
        pkt = None
    try:
        srb = V.decode_srb(data, size=size, completion=completion)
    except V.VstorError:
        srb = "refused"
    if srb == "refused":  # decode_packet refuses it too, read as the SRB it is
        # (a COMPLETE_IO decode_packet reads as the answer to another request
        # may be fine as that)
        assert pkt is None or (completion and completes != V.VstorOperation.EXECUTE_SRB), pkt
        return
    if srb is None:
        return
    status, raw = srb
    again = V.decode_packet(data, size=size, completes=V.VstorOperation.EXECUTE_SRB)
    assert again.status == status and again.body == raw.to_request(), (again, raw)
    if pkt is not None and pkt.operation == V.VstorOperation.EXECUTE_SRB:
        assert pkt.body == raw.to_request()
    for version in (V.VstorVersion.WIN10, V.VstorVersion.WIN7):
        reply = V.build_srb_reply(raw, version=version, scsi_status=S.CHECK_CONDITION,
                                  data_transfer_length=raw.data_transfer_length,
                                  sense=S.fixed_sense(S.SenseKey.ILLEGAL_REQUEST, 0x24, 0))
        back = V.decode_packet(reply, size=V.packet_size(version),
                               completes=V.VstorOperation.EXECUTE_SRB)
        assert back.operation == V.VstorOperation.COMPLETE_IO


def _execute(r: Reader) -> None:
    cdb_length = r.below(17)
    data_in = r.flag()
    transfer = r.pick([0, 0, 512, 4096, 8 * 512, None])
    if transfer is None:
        transfer = r.below(1 << 16)
    scattered = r.flag()
    cdb = r.bytes(16).ljust(16, b"\0")
    buf = bytearray(transfer)
    if scattered and transfer > 1:  # a scatter list: two views, split anywhere
        cut = r.below(transfer)
        mv = memoryview(buf)
        buffer = [mv[:cut], mv[cut:]]
    else:
        buffer = buf
    res = _the_disk().execute(cdb, cdb_length, data_in, buffer, transfer)
    assert res.scsi_status in (S.GOOD, S.CHECK_CONDITION)
    assert 0 <= res.data_transferred <= transfer
    assert (res.scsi_status == S.CHECK_CONDITION) == bool(res.sense)
    if res.sense:
        assert len(res.sense) == S.FIXED_SENSE_BYTES and res.data_transferred == 0


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    if r.u8() & 1:
        _execute(r)
    else:
        _decoders(r)


def _cdbs() -> list[bytes]:
    import struct

    return [
        bytes(6),  # TEST UNIT READY
        bytes([0x03, 0, 0, 0, 18, 0]),  # REQUEST SENSE
        bytes([0x12, 0, 0, 0, 36, 0]),  # INQUIRY
        bytes([0x12, 1, 0x00, 0, 255, 0]),
        bytes([0x12, 1, 0x80, 0, 255, 0]),
        bytes([0x12, 1, 0x83, 0, 255, 0]),
        bytes([0x1A, 0, 0x3F, 0, 255, 0]),  # MODE SENSE(6)
        bytes([0x5A, 0, 0x08, 0, 0, 0, 0, 0, 255, 0]),  # MODE SENSE(10)
        bytes([0x25]) + bytes(9),  # READ CAPACITY(10)
        bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2),  # (16)
        struct.pack(">BBIBHB", 0x28, 0, 2, 0, 8, 0),  # READ(10)
        struct.pack(">BBIBHB", 0x2A, 0x08, 2, 0, 8, 0),  # WRITE(10), FUA
        struct.pack(">BBQIBB", 0x88, 0, 60, 4, 0, 0),  # READ(16)
        struct.pack(">BBQIBB", 0x8A, 0, 0, 8, 0, 0),  # WRITE(16)
        bytes([0x35]) + bytes(9),  # SYNCHRONIZE CACHE(10)
        bytes([0x91]) + bytes(15),  # (16)
        bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]),  # REPORT LUNS
    ]


def seeds() -> Iterator[bytes]:
    for cdb in _cdbs():
        data_in = cdb[0] not in (0x2A, 0x8A)
        w = Writer().u8(1).below(17, len(cdb)).flag(data_in)
        yield w.below(6, 3).flag(False).raw(cdb.ljust(16, b"\0")).done()
        w = Writer().u8(1).below(17, len(cdb)).flag(data_in)
        yield w.below(6, 3).flag(True).raw(cdb.ljust(16, b"\0")).u8(100).done()
        for version in (V.VstorVersion.WIN10, V.VstorVersion.WIN7):
            pkt = V.build_execute_srb(cdb, data_in=V.DataIn.READ if data_in else V.DataIn.WRITE,
                                      data_transfer_length=4096, version=version)
            size = V.packet_size(version)
            yield Writer().u8(0).pick(SIZES, size).pick(COMPLETES, None).flag(False) \
                .raw(pkt).done()
    init = [V.build_begin_initialization(), V.build_query_protocol_version(V.VstorVersion.WIN10),
            V.build_query_properties(), V.build_end_initialization(),
            V.build_create_sub_channels(2), V.build_enumerate_bus(version=V.VstorVersion.WIN10)]
    for pkt in init:
        yield Writer().u8(0).pick(SIZES, 64).pick(COMPLETES, None).flag(False).raw(pkt).done()
    replies = [
        (V.VstorOperation.QUERY_PROTOCOL_VERSION,
         V.build_version_reply(V.VstorVersion.WIN10, accepted=True, size=64)),
        (V.VstorOperation.QUERY_PROPERTIES,
         V.build_properties_reply(V.ChannelProperties(max_transfer_bytes=1 << 17), size=64)),
        (V.VstorOperation.BEGIN_INITIALIZATION, V.build_completion(size=64)),
    ]
    for op, pkt in replies:
        yield Writer().u8(0).pick(SIZES, 64).pick(COMPLETES, op).flag(True).raw(pkt).done()


if __name__ == "__main__":
    main(TestOneInput)
