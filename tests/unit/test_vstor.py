"""VSTOR packets against byte vectors written from the spec tables (§8.1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from partitions.devices.storage.scsi import vstor as V
from partitions.devices.storage.scsi.vstor import (
    ChannelProperties,
    DataIn,
    ProtocolVersion,
    ScsiRequest,
    VstorError,
    VstorOperation,
    VstorPacket,
    VstorVersion,
)


def h(s: str) -> bytes:
    """Hex with spaces and '|' as field separators."""
    return bytes.fromhex(s.replace("|", " "))


def pad(b: bytes, n: int) -> bytes:
    assert len(b) <= n
    return b + bytes(n - len(b))


# vstor_packet header: operation u32 @0, flags u32 @4 (1 = REQUEST_COMPLETION_FLAG), status @8
REQ = "01000000"  # flags of every guest request
CDB_READ10 = h("28 00 | 00001234 | 00 | 0008 | 00")  # READ(10) LBA 0x1234, 8 blocks

SRB_READ10_WIN8 = h(
    "03000000 | 01000000 | 00000000"  # EXECUTE_SRB, completion requested, status 0
    "3400 | 00 | 00"  # length 52, srb_status, scsi_status
    "00 | 00 | 00 | 00"  # port_number, path_id, target_id, lun
    "0a | 14 | 01 | 00"  # cdb_length 10, sense_info_length 20, data_in READ, reserved
    "00100000"  # data_transfer_length 4096
    "28000000123400000800 000000000000 00000000"  # cdb[16] + 4 bytes of the 20-byte union
    "0000 | 00 | 00"  # Win8 extension @36: reserve, queue_tag, queue_action
    "40000000 | 3c000000 | 00000000"  # srb_flags DATA_IN, time_out_value 60, queue_sort_key
)
SRB_WRITE10_WIN7 = h(
    "03000000 | 01000000 | 00000000"
    "2400 | 00 | 00"  # length 36: no Win8 extension below 5.1
    "00 | 00 | 01 | 02"  # target 1, lun 2
    "0a | 12 | 00 | 00"  # cdb_length 10, sense_info_length 18 (pre-Win8), data_in WRITE
    "00020000"  # 512 bytes
    "2a000000000700000100 000000000000 00000000"  # WRITE(10) LBA 7, 1 block
)

REQUESTS = [
    # BEGIN_INITIALIZATION as current Linux sends it (64 bytes) and as 4.x did (48)
    ("begin-64", h(f"07000000 {REQ} 00000000") + bytes(52), 64,
     VstorPacket(VstorOperation.BEGIN_INITIALIZATION, 1)),
    ("begin-48", h(f"07000000 {REQ} 00000000") + bytes(36), 48,
     VstorPacket(VstorOperation.BEGIN_INITIALIZATION, 1)),
    # version @12: major_minor u16 = (6 << 8) | 2, revision u16 = 0
    ("version-6.2", pad(h(f"09000000 {REQ} 00000000 | 0206 | 0000"), 64), 64,
     VstorPacket(VstorOperation.QUERY_PROTOCOL_VERSION, 1, 0, ProtocolVersion(0x0602))),
    ("version-5.1", pad(h(f"09000000 {REQ} 00000000 | 0105 | 0000"), 48), 48,
     VstorPacket(VstorOperation.QUERY_PROTOCOL_VERSION, 1, 0, ProtocolVersion(0x0501))),
    ("properties", pad(h(f"0a000000 {REQ} 00000000"), 64), 64,
     VstorPacket(VstorOperation.QUERY_PROPERTIES, 1)),
    ("end", pad(h(f"08000000 {REQ} 00000000"), 64), 64,
     VstorPacket(VstorOperation.END_INITIALIZATION, 1)),
    # sub_channel_count u16 @12
    ("sub-channels", pad(h(f"0d000000 {REQ} 00000000 | 0300"), 64), 64,
     VstorPacket(VstorOperation.CREATE_SUB_CHANNELS, 1, 0, 3)),
    ("srb-win8", SRB_READ10_WIN8, 64,
     VstorPacket(VstorOperation.EXECUTE_SRB, 1, 0, ScsiRequest(
         length=52, cdb_length=10, sense_info_length=20, data_in=DataIn.READ,
         data_transfer_length=4096, payload=pad(CDB_READ10, 20), srb_flags=0x40,
         time_out_value=60))),
    ("srb-win7", SRB_WRITE10_WIN7, 48,
     VstorPacket(VstorOperation.EXECUTE_SRB, 1, 0, ScsiRequest(
         length=36, target_id=1, lun=2, cdb_length=10, sense_info_length=18,
         data_in=DataIn.WRITE, data_transfer_length=512,
         payload=pad(h("2a000000000700000100"), 20)))),
]


@pytest.mark.parametrize(("wire", "size", "packet"), [r[1:] for r in REQUESTS],
                         ids=[r[0] for r in REQUESTS])
def test_request_vectors_round_trip(wire, size, packet):
    assert len(wire) == size
    assert V.decode_packet(wire, size=size) == packet
    assert V.encode_packet(packet, size=size) == wire


def test_guest_builders_match_the_vectors():
    vec = {r[0]: r[1] for r in REQUESTS}
    assert V.build_begin_initialization() == vec["begin-64"]
    assert V.build_begin_initialization(size=48) == vec["begin-48"]
    assert V.build_query_protocol_version(VstorVersion.WIN10) == vec["version-6.2"]
    assert V.build_query_protocol_version(VstorVersion.WIN8, size=48) == vec["version-5.1"]
    assert V.build_query_properties() == vec["properties"]
    assert V.build_end_initialization() == vec["end"]
    assert V.build_create_sub_channels(3) == vec["sub-channels"]
    assert V.build_execute_srb(CDB_READ10, data_in=DataIn.READ, data_transfer_length=4096,
                               version=VstorVersion.WIN10) == SRB_READ10_WIN8
    # below 5.1: 48 bytes, length 36, sense 18, and no srb_flags to carry the direction
    assert V.build_execute_srb(h("2a000000000700000100"), data_in=DataIn.WRITE,
                               data_transfer_length=512, version=VstorVersion.WIN7,
                               target_id=1, lun=2) == SRB_WRITE10_WIN7


# Host replies: operation COMPLETE_IO, flags 0, an NTSTATUS
COMPLETE = "01000000 00000000"
SENSE_INVALID_OPCODE = h("70 00 05 | 00000000 | 0a | 00000000 | 20 00 | 00 | 000000")

REPLIES = [
    ("version-ok", V.build_version_reply(0x0600, accepted=True, size=64),
     pad(h(f"{COMPLETE} 00000000 | 0006 | 0000"), 64), VstorOperation.QUERY_PROTOCOL_VERSION,
     VstorPacket(VstorOperation.COMPLETE_IO, 0, 0, ProtocolVersion(0x0600))),
    # REVISION_MISMATCH 0xC0000059, little endian
    ("version-refused", V.build_version_reply(0x0602, accepted=False, size=64),
     pad(h(f"{COMPLETE} 590000c0 | 0206 | 0000"), 64), VstorOperation.QUERY_PROTOCOL_VERSION,
     VstorPacket(VstorOperation.COMPLETE_IO, 0, 0xC0000059, ProtocolVersion(0x0602))),
    # channel properties @12: reserved u32, max_channel_cnt u16, reserved u16, flags u32,
    # max_transfer_bytes u32, reserved u64
    ("properties", V.build_properties_reply(ChannelProperties(7, 1, 0x40000), size=64),
     pad(h(f"{COMPLETE} 00000000 | 00000000 | 0700 | 0000 | 01000000 | 00000400 | "
           "0000000000000000"), 64), VstorOperation.QUERY_PROPERTIES,
     VstorPacket(VstorOperation.COMPLETE_IO, 0, 0, ChannelProperties(7, 1, 0x40000))),
    ("init", V.build_completion(size=48), pad(h(f"{COMPLETE} 00000000"), 48),
     VstorOperation.BEGIN_INITIALIZATION, VstorPacket(VstorOperation.COMPLETE_IO)),
]


@pytest.mark.parametrize(("built", "wire", "completes", "packet"), [r[1:] for r in REPLIES],
                         ids=[r[0] for r in REPLIES])
def test_reply_vectors(built, wire, completes, packet):
    assert built == wire
    assert V.decode_packet(wire, size=len(wire), completes=completes) == packet


def test_srb_reply_check_condition_carries_autosense():
    request = V.decode_packet(SRB_READ10_WIN8, size=64).body
    wire = V.build_srb_reply(request, version=VstorVersion.WIN10, scsi_status=0x02,
                             data_transfer_length=0, sense=SENSE_INVALID_OPCODE)
    assert wire == h(
        f"{COMPLETE} 850100c0"  # status IO_DEVICE_ERROR 0xC0000185
        "3400 | 84 | 02"  # length 52; srb_status ERROR | AUTOSENSE_VALID; CHECK CONDITION
        "00 | 00 | 00 | 00"
        "0a | 12 | 01 | 00"  # cdb_length echoed, sense_info_length 18, data_in echoed
        "00000000"  # nothing transferred
    ) + pad(SENSE_INVALID_OPCODE, 20) + bytes(16)
    back = V.decode_packet(wire, size=64, completes=VstorOperation.EXECUTE_SRB).body
    assert back.sense == SENSE_INVALID_OPCODE
    assert back.srb_status & V.SRB_STATUS_AUTOSENSE_VALID


def test_srb_reply_good_and_its_edges():
    request = V.decode_packet(SRB_READ10_WIN8, size=64).body
    good = V.build_srb_reply(request, version=VstorVersion.WIN10, scsi_status=0,
                             data_transfer_length=4096, sense=SENSE_INVALID_OPCODE)
    assert good[:28] == h(f"{COMPLETE} 00000000 | 3400 0100 | 00000000 | 0a000100 | 00100000")
    assert good[28:] == bytes(36)  # sense never goes with GOOD
    # pre-Win8: 48 bytes, sense cut to the 18 the guest asked for
    old = V.decode_packet(SRB_WRITE10_WIN7, size=48).body
    wire = V.build_srb_reply(old, version=VstorVersion.WIN7, scsi_status=0x02,
                             data_transfer_length=0, sense=SENSE_INVALID_OPCODE + b"\xff\xff")
    assert len(wire) == 48
    assert V.decode_packet(wire, size=48, completes=VstorOperation.EXECUTE_SRB).body.sense == (
        SENSE_INVALID_OPCODE)
    # a guest that takes no sense gets none, and no AUTOSENSE_VALID
    mute = ScsiRequest(cdb_length=10, payload=pad(CDB_READ10, 20))
    body = V.decode_packet(V.build_srb_reply(mute, version=VstorVersion.WIN10, scsi_status=2,
                                             data_transfer_length=0, sense=SENSE_INVALID_OPCODE),
                           size=64, completes=VstorOperation.EXECUTE_SRB).body
    assert (body.srb_status, body.sense_info_length) == (V.SrbStatus.ERROR, 0)
    lost = V.build_srb_reply(request, version=VstorVersion.WIN10, scsi_status=2,
                             data_transfer_length=0, srb_status=V.SrbStatus.INVALID_LUN)
    assert lost[8:12] == h("c00000c0")  # DEVICE_DOES_NOT_EXIST


def test_reply_size_rule():
    # initialisation: 12 + the guest's request size, capped at 52
    assert V.reply_size(48) == 48
    assert V.reply_size(64) == 64
    assert V.reply_size(200) == 64
    assert V.reply_size(16) == 16
    assert V.reply_size(3) == 12
    # negotiated: the version's size, whatever the request
    for version, size in ((VstorVersion.WIN6, 48), (VstorVersion.WIN7, 48),
                          (VstorVersion.WIN8, 64), (VstorVersion.WIN8_1, 64),
                          (VstorVersion.WIN10, 64)):
        assert V.reply_size(64, version) == V.reply_size(48, version) == size
        assert V.packet_size(version) == size
        assert V.vmscsi_size(version) == size - 12
        assert V.sense_buffer_size(version) == (20 if size == 64 else 18)
    # a short init request gets a short reply: the body is cut (OpenVMM does the same)
    short = V.build_properties_reply(ChannelProperties(7, 1), size=V.reply_size(16))
    assert short == h(f"{COMPLETE} 00000000 | 00000000")


def test_layout_constants():
    assert (V.VSTOR_PACKET_BYTES, V.VSTOR_PACKET_BYTES_PRE_WIN8) == (64, 48)
    assert (V.VMSCSI_REQUEST_BYTES, V.VMSCSI_REQUEST_BYTES_PRE_WIN8) == (0x34, 0x24)
    assert [int(o) for o in VstorOperation] == list(range(1, 15))
    assert [int(v) for v in VstorVersion] == [0x0200, 0x0402, 0x0501, 0x0600, 0x0602]
    assert len(ChannelProperties().encode()) == 24
    assert len(ScsiRequest().encode()) == 52
    assert len(ScsiRequest().encode(win8=False)) == 36


def test_a_conversation():
    """Linux's init sequence against a host that only knows 6.0 and below."""
    host_versions = {VstorVersion.WIN8, VstorVersion.WIN8_1}
    replies = []
    for request in (V.build_begin_initialization(),
                    V.build_query_protocol_version(VstorVersion.WIN10),
                    V.build_query_protocol_version(VstorVersion.WIN8_1)):
        pkt = V.decode_packet(request, size=48)  # not negotiated yet: 48 is the minimum
        size = V.reply_size(len(request))
        if pkt.operation == VstorOperation.QUERY_PROTOCOL_VERSION:
            replies.append(V.build_version_reply(pkt.body.major_minor,
                                                 accepted=pkt.body.major_minor in host_versions,
                                                 size=size))
        else:
            replies.append(V.build_completion(size=size))
    got = [V.decode_packet(r, size=64, completes=VstorOperation.QUERY_PROTOCOL_VERSION)
           for r in replies]
    assert [g.status for g in got] == [0, V.VstorStatus.REVISION_MISMATCH, 0]
    assert got[2].body == ProtocolVersion(0x0600)


@pytest.mark.parametrize(("wire", "size"), [
    (b"", 64),
    (h("07000000 01000000 000000"), 48),  # 11 bytes: no header
    (h("07000000 01000000 00000000") + bytes(35), 48),  # one byte short of 48
    (h("07000000 01000000 00000000") + bytes(51), 64),  # one byte short of 64
    (SRB_WRITE10_WIN7, 64),  # a pre-Win8 SRB once 5.1+ is negotiated: no Win8 extension
    (pad(h("00000000 01000000 00000000"), 64), 64),  # operation 0
    (pad(h("0f000000 01000000 00000000"), 64), 64),  # operation 15
    (pad(h("ffffffff 01000000 00000000"), 64), 64),
    (SRB_READ10_WIN8[:20] + b"\x11" + SRB_READ10_WIN8[21:], 64),  # cdb_length 17
    (SRB_READ10_WIN8[:21] + b"\x15" + SRB_READ10_WIN8[22:], 64),  # sense_info_length 21
    (SRB_READ10_WIN8[:22] + b"\x03" + SRB_READ10_WIN8[23:], 64),  # data_in 3
    (SRB_WRITE10_WIN7[:20] + b"\xff" + SRB_WRITE10_WIN7[21:], 48),  # cdb_length 255
])
def test_malformed_packets_are_refused(wire, size):
    with pytest.raises(VstorError):
        V.decode_packet(wire, size=size)


def test_oversized_input_is_read_up_to_the_struct():
    # trailing bytes past the struct in effect are not part of the packet
    assert V.decode_packet(SRB_READ10_WIN8 + b"\xff" * 36, size=64) == V.decode_packet(
        SRB_READ10_WIN8, size=64)
    # a Win8 SRB read as pre-Win8 (before negotiation): the extension is not looked at
    old = V.decode_packet(SRB_READ10_WIN8, size=48).body
    assert (old.srb_flags, old.time_out_value, old.data_transfer_length) == (0, 0, 4096)


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        V.decode_packet(SRB_READ10_WIN8, size=52)
    with pytest.raises(ValueError):
        V.encode_packet(VstorPacket(VstorOperation.COMPLETE_IO), size=8)
    for bad in ({"cdb_length": 17}, {"sense_info_length": 21}, {"data_in": 3},
                {"payload": bytes(16)}):
        with pytest.raises(VstorError):
            ScsiRequest(**bad)
    with pytest.raises(VstorError):
        ScsiRequest(lun=256).encode()
    with pytest.raises(VstorError):
        V.build_execute_srb(bytes(17), data_in=DataIn.READ, data_transfer_length=0,
                            version=VstorVersion.WIN10)
    with pytest.raises(VstorError):
        V.build_create_sub_channels(1 << 16)


_OPS = st.sampled_from([None, *VstorOperation])


@given(st.binary(max_size=128), st.sampled_from([48, 64]), _OPS)
def test_decode_never_raises_anything_else(data, size, completes):
    try:
        V.decode_packet(data, size=size, completes=completes)
    except VstorError:
        pass


@given(st.sampled_from(list(VstorOperation)), st.binary(min_size=52, max_size=52),
       st.sampled_from([48, 64]), _OPS)
def test_decode_of_any_union_never_raises_anything_else(op, union, size, completes):
    wire = V._HEADER.pack(op, 1, 0) + union
    try:
        V.decode_packet(wire, size=size, completes=completes)
    except VstorError:
        pass


_U8 = st.integers(0, 0xFF)
_U16 = st.integers(0, 0xFFFF)
_U32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def scsi_requests(draw, win8: bool):
    ext = ({"reserve": draw(_U16), "queue_tag": draw(_U8), "queue_action": draw(_U8),
            "srb_flags": draw(_U32), "time_out_value": draw(_U32),
            "queue_sort_key": draw(_U32)} if win8 else {})
    return ScsiRequest(
        length=draw(_U16), srb_status=draw(_U8), scsi_status=draw(_U8), port_number=draw(_U8),
        path_id=draw(_U8), target_id=draw(_U8), lun=draw(_U8),
        cdb_length=draw(st.integers(0, 16)), sense_info_length=draw(st.integers(0, 20)),
        data_in=draw(st.sampled_from(list(DataIn))), reserved=draw(_U8),
        data_transfer_length=draw(_U32), payload=draw(st.binary(min_size=20, max_size=20)),
        **ext)


@given(st.data(), st.sampled_from([48, 64]), _U32, _U32)
def test_srb_round_trip(data, size, flags, status):
    srb = data.draw(scsi_requests(win8=size == 64))
    pkt = VstorPacket(VstorOperation.EXECUTE_SRB, flags, status, srb)
    wire = V.encode_packet(pkt, size=size)
    assert len(wire) == size
    assert V.decode_packet(wire, size=size) == pkt
    assert V.decode_packet(V.encode_packet(VstorPacket(VstorOperation.COMPLETE_IO, 0, status, srb),
                                           size=size),
                           size=size, completes=VstorOperation.EXECUTE_SRB).body == srb


@given(_U16, _U32, _U32, _U16)
def test_properties_and_version_round_trip(count, flags, max_bytes, version):
    props = ChannelProperties(count, flags, max_bytes)
    assert ChannelProperties.decode(props.encode()) == props
    assert ProtocolVersion.decode(ProtocolVersion(version).encode()) == ProtocolVersion(version)
