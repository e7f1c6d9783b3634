"""Channel-management messages against byte vectors written from the spec (§3.4)."""

import struct
import uuid

import pytest

from vmbus import protocol as P
from vmbus.protocol import MessageType, ProtocolError, decode, encode

NETVSC = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")


@pytest.mark.parametrize(
    ("mtype", "size"),
    [
        (MessageType.OFFERCHANNEL, 196),
        (MessageType.RESCIND_CHANNELOFFER, 12),
        (MessageType.REQUESTOFFERS, 8),
        (MessageType.ALLOFFERS_DELIVERED, 8),
        (MessageType.OPENCHANNEL, 148),
        (MessageType.OPENCHANNEL_RESULT, 20),
        (MessageType.CLOSECHANNEL, 12),
        (MessageType.GPADL_HEADER, 20),
        (MessageType.GPADL_BODY, 16),
        (MessageType.GPADL_CREATED, 20),
        (MessageType.GPADL_TEARDOWN, 16),
        (MessageType.GPADL_TORNDOWN, 12),
        (MessageType.RELID_RELEASED, 12),
        (MessageType.INITIATE_CONTACT, 40),
        (MessageType.VERSION_RESPONSE, 16),
        (MessageType.UNLOAD, 8),
        (MessageType.UNLOAD_RESPONSE, 8),
    ],
)
def test_fixed_sizes_match_the_spec_table(mtype, size):
    assert P.fixed_size(mtype) == size


def test_offer_bytes_guid_order_and_field_offsets():
    inst = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
    offer = P.OfferChannel(
        NETVSC,
        inst,
        chn_flags=0x200,
        mmio_megabytes=8,
        sub_channel_index=0,
        child_relid=0x0A,
        monitorid=3,
        monitor_allocated=1,
        is_dedicated_interrupt=1,
        connection_id=0x1A,
    )
    b = encode(offer)
    assert len(b) == 196
    assert b[:8] == bytes([1, 0, 0, 0, 0, 0, 0, 0])
    # §5: f8615163-df3e-46c5-913f-f2d2f965ed0e serialises as 63 51 61 f8 3e df c5 46 ...
    assert b[8:24] == bytes.fromhex("635161f83edfc546913ff2d2f965ed0e")
    assert b[24:40] == bytes.fromhex("33221100554477668899aabbccddeeff")
    assert b[56:58] == b"\x00\x02"  # chn_flags @56
    assert b[58:60] == b"\x08\x00"  # mmio_megabytes @58
    assert b[184:188] == b"\x0a\x00\x00\x00"  # child_relid @184
    assert b[188] == 3 and b[189] == 1  # monitorid, monitor_allocated
    assert b[190:192] == b"\x01\x00"  # is_dedicated_interrupt
    assert b[192:196] == b"\x1a\x00\x00\x00"  # connection_id @192
    assert decode(b) == offer


def test_open_channel_and_result_offsets():
    b = encode(
        P.OpenChannel(
            child_relid=7,
            openid=7,
            ringbuffer_gpadlhandle=0xE1E10,
            target_vp=0,
            downstream_ringbuffer_pageoffset=16,
            userdata=b"u" + bytes(119),
        )
    )
    assert len(b) == 148
    assert struct.unpack_from("<IIIII", b, 8) == (7, 7, 0xE1E10, 0, 16)
    assert b[28:29] == b"u"
    r = bytes.fromhex("06000000 00000000 07000000 07000000 00000000".replace(" ", ""))
    assert decode(r) == P.OpenChannelResult(7, 7, 0)


def test_initiate_contact_v5_packs_msg_sint_at_offset_16():
    b = encode(P.InitiateContact.v5(P.Version.WIN10_V5_3, msg_sint=2, target_vcpu=0))
    assert len(b) == 40
    assert b[8:12] == bytes.fromhex("03000500")  # 5.3 = 0x00050003, little endian
    assert b[16] == 2 and b[17] == 0  # msg_sint, msg_vtl
    m = decode(b)
    assert m.msg_sint == 2 and m.vmbus_version_requested == 0x00050003


def test_version_response_layout():
    b = bytes.fromhex("0f000000 00000000 01 00 0000 04000000".replace(" ", ""))
    m = decode(b)
    assert m == P.VersionResponse(version_supported=1, connection_state=0, msg_conn_id=4)
    assert encode(m) == b


def test_gpadl_split_26_then_28_pfns():
    pfns = list(range(1000, 1000 + 26 + 28 + 3))
    msgs = P.gpadl_messages(child_relid=4, gpadl=0xE1E10, pfns=pfns)
    assert [m.TYPE for m in msgs] == [
        MessageType.GPADL_HEADER,
        MessageType.GPADL_BODY,
        MessageType.GPADL_BODY,
    ]
    head = encode(msgs[0])
    assert len(head) == 20 + 8 + 26 * 8 == 236
    assert struct.unpack_from("<IIHH", head, 8) == (4, 0xE1E10, 8 + 8 * len(pfns), 1)
    assert struct.unpack_from("<II", head, 20) == (len(pfns) * 4096, 0)
    assert struct.unpack_from("<Q", head, 28)[0] == 1000
    body = encode(msgs[1])
    assert len(body) == 16 + 28 * 8 == 240
    assert msgs[1].pfns == tuple(pfns[26:54]) and msgs[2].pfns == tuple(pfns[54:])


def test_decode_accepts_sizes_rounded_up_to_8():
    b = encode(P.RescindChannelOffer(9)) + bytes(4)  # QEMU rounds host payloads up to 8
    assert decode(b) == P.RescindChannelOffer(9)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x00\x00",
        struct.pack("<II", 0, 0),  # INVALID
        struct.pack("<II", 18, 0),  # reserved channels are not spoken
        struct.pack("<II", 1, 0) + bytes(100),  # a short offer
        struct.pack("<II", 9, 0) + bytes(241),  # too long
        struct.pack("<IIII", 9, 0, 0, 1) + bytes(3),  # PFN tail not a multiple of 8
    ],
)
def test_decode_rejects_malformed(data):
    with pytest.raises(ProtocolError):
        decode(data)
