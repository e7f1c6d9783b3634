"""The I/O-path encoders and decoder of vstor.py (one struct each) against the
general dataclass path: byte for byte, error for error."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from partitions.devices.storage.scsi import vstor as V
from partitions.devices.storage.scsi.vstor import (
    DataIn,
    RawSrb,
    ScsiRequest,
    VstorError,
    VstorOperation,
    VstorPacket,
    VstorVersion,
)

_U8 = st.integers(0, 0xFF)
_U16 = st.integers(0, 0xFFFF)
_U32 = st.integers(0, 0xFFFFFFFF)
_VERSIONS = st.sampled_from(list(VstorVersion))


def reference_execute_srb(cdb: bytes, *, data_in: int, data_transfer_length: int, version: int,
                          lun: int = 0, target_id: int = 0, path_id: int = 0,
                          port_number: int = 0) -> bytes:
    """build_execute_srb as it was written over the dataclasses."""
    flags = {DataIn.READ: V.SrbFlags.DATA_IN, DataIn.WRITE: V.SrbFlags.DATA_OUT}.get(data_in, 0)
    srb = ScsiRequest(length=V.vmscsi_size(version), port_number=port_number, path_id=path_id,
                      target_id=target_id, lun=lun, cdb_length=len(cdb),
                      sense_info_length=V.sense_buffer_size(version), data_in=data_in,
                      data_transfer_length=data_transfer_length,
                      payload=bytes(cdb).ljust(20, b"\0"), srb_flags=int(flags),
                      time_out_value=60)
    return V.encode_packet(VstorPacket(VstorOperation.EXECUTE_SRB, V.REQUEST_COMPLETION_FLAG,
                                       0, srb), size=V.packet_size(version))


def reference_srb_reply(request: ScsiRequest, *, version: int, scsi_status: int,
                        data_transfer_length: int, sense: bytes = b"",
                        srb_status: int | None = None) -> bytes:
    """build_srb_reply as it was written over the dataclasses."""
    if srb_status is None:
        srb_status = V.SrbStatus.SUCCESS if scsi_status == 0 else V.SrbStatus.ERROR
    if scsi_status != 2:
        sense = b""
    sense = bytes(sense[: request.sense_info_length])
    if sense:
        srb_status |= V.SRB_STATUS_AUTOSENSE_VALID
    code = srb_status & 0x3F
    status = (V.VstorStatus.SUCCESS if code == V.SrbStatus.SUCCESS
              else V.VstorStatus.DEVICE_DOES_NOT_EXIST if code == V.SrbStatus.INVALID_LUN
              else V.VstorStatus.IO_DEVICE_ERROR)
    reply = ScsiRequest(length=V.vmscsi_size(version), srb_status=srb_status,
                        scsi_status=scsi_status, port_number=request.port_number,
                        path_id=request.path_id, target_id=request.target_id, lun=request.lun,
                        cdb_length=request.cdb_length, sense_info_length=len(sense),
                        data_in=request.data_in, data_transfer_length=data_transfer_length,
                        payload=sense.ljust(20, b"\0"))
    return V.build_completion(size=V.packet_size(version), status=status, body=reply)


def test_raw_srb_has_the_fields_of_scsi_request():
    assert RawSrb._fields == tuple(f.name for f in dataclasses.fields(ScsiRequest))
    r = ScsiRequest(cdb_length=10, sense_info_length=20, payload=bytes(range(20)))
    raw = RawSrb(*dataclasses.astuple(r))
    assert raw.to_request() == r
    assert (raw.cdb, raw.sense) == (r.cdb, r.sense)


@given(st.binary(max_size=16), st.sampled_from(list(DataIn)), _U32, _VERSIONS, _U8, _U8, _U8,
       _U8)
def test_execute_srb_is_byte_identical(cdb, data_in, length, version, lun, target, path, port):
    kw = {"data_in": data_in, "data_transfer_length": length, "version": version, "lun": lun,
          "target_id": target, "path_id": path, "port_number": port}
    assert V.build_execute_srb(cdb, **kw) == reference_execute_srb(cdb, **kw)


@pytest.mark.parametrize("bad", [
    {"cdb": bytes(17)}, {"lun": 256}, {"target_id": -1}, {"port_number": 300},
    {"data_in": 3}, {"data_transfer_length": -1}, {"data_transfer_length": 1 << 32},
])
def test_execute_srb_refuses_what_it_refused(bad):
    kw = {"cdb": bytes(10), "data_in": DataIn.READ, "data_transfer_length": 4096,
          "version": VstorVersion.WIN10, **bad}
    cdb = kw.pop("cdb")
    with pytest.raises(VstorError):
        V.build_execute_srb(cdb, **kw)
    with pytest.raises(VstorError):
        reference_execute_srb(cdb, **kw)


@st.composite
def requests(draw):
    return ScsiRequest(
        length=draw(_U16), srb_status=draw(_U8), scsi_status=draw(_U8), port_number=draw(_U8),
        path_id=draw(_U8), target_id=draw(_U8), lun=draw(_U8),
        cdb_length=draw(st.integers(0, 16)), sense_info_length=draw(st.integers(0, 20)),
        data_in=draw(st.sampled_from(list(DataIn))), reserved=draw(_U8),
        data_transfer_length=draw(_U32), payload=draw(st.binary(min_size=20, max_size=20)),
        srb_flags=draw(_U32), time_out_value=draw(_U32))


@given(requests(), _VERSIONS, st.sampled_from([0, 2, 8]), _U32, st.binary(max_size=24),
       st.sampled_from([None, *V.SrbStatus]))
def test_srb_reply_is_byte_identical(req, version, scsi_status, length, sense, srb_status):
    kw = {"version": version, "scsi_status": scsi_status, "data_transfer_length": length,
          "sense": sense, "srb_status": srb_status}
    want = reference_srb_reply(req, **kw)
    assert V.build_srb_reply(req, **kw) == want
    assert V.build_srb_reply(RawSrb(*dataclasses.astuple(req)), **kw) == want


@given(st.binary(min_size=0, max_size=80), st.sampled_from([48, 64]), st.booleans())
def test_decode_srb_agrees_with_decode_packet(data, size, completion):
    _check_agreement(data, size, completion)


@given(st.sampled_from([VstorOperation.EXECUTE_SRB, VstorOperation.COMPLETE_IO,
                        VstorOperation.BEGIN_INITIALIZATION]), _U32, _U32,
       st.binary(min_size=52, max_size=52), st.sampled_from([48, 64]), st.booleans())
def test_decode_srb_agrees_on_srb_shaped_packets(op, flags, status, union, size, completion):
    _check_agreement(V._HEADER.pack(op, flags, status) + union, size, completion)


def _check_agreement(data: bytes, size: int, completion: bool) -> None:
    completes = VstorOperation.EXECUTE_SRB if completion else None
    try:
        want = V.decode_packet(data, size=size, completes=completes)
    except VstorError:
        want = None
    try:
        got = V.decode_srb(data, size=size, completion=completion)
    except VstorError:
        # refused: decode_packet refuses it too (an SRB with a bad field, or short)
        assert want is None
        return
    expected_op = VstorOperation.COMPLETE_IO if completion else VstorOperation.EXECUTE_SRB
    if got is None:
        assert want is None or want.operation != expected_op
        return
    assert want is not None and want.operation == expected_op
    status, raw = got
    assert status == want.status
    assert raw.to_request() == want.body


def test_decode_srb_sizes():
    wire = V.build_execute_srb(bytes(10), data_in=DataIn.READ, data_transfer_length=4096,
                               version=VstorVersion.WIN10)
    with pytest.raises(ValueError, match="size"):
        V.decode_srb(wire, size=52)
    with pytest.raises(VstorError):
        V.decode_srb(wire[:63], size=64)
    assert V.decode_srb(wire + b"\xff" * 8, size=64) == V.decode_srb(wire, size=64)
    assert V.decode_srb(V.build_begin_initialization(), size=64) is None
