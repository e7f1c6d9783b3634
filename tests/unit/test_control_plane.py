"""The sans-IO control plane: one test per scenario, without processes."""

import struct
import uuid

import pytest

from vmbus import protocol as P
from vmbus.client import ClientChannelState, ClientState, VmbusClient
from vmbus.protocol import Version
from vmbus.server import ChannelState, GpadlState, VmbusServer
from vmbus.testing import Loopback, RecordingClientNotifier, RecordingServerNotifier

ECHO = uuid.UUID("d7e5a1c0-0000-4000-8000-0000000000e1")


def offer(relid, conn=None):
    return P.OfferChannel(
        ECHO,
        uuid.UUID(int=relid),
        child_relid=relid,
        connection_id=conn if conn is not None else 0x2000 + relid,
    )


def connected_server():
    n = RecordingServerNotifier()
    s = VmbusServer(n)
    s.offer(offer(1))
    s.offer(offer(2))
    s.handle(P.InitiateContact.v5(Version.WIN10_V5_3))
    s.handle(P.RequestOffers())
    n.sent.clear()
    return s, n


def created_gpadl(s, n, relid=1, gpadl=0xE1E10, pages=8):
    s.handle(P.gpadl_messages(relid, gpadl, list(range(100, 100 + pages)))[0])
    assert n.events[-1][0] == "validate_gpadl"
    s.complete_gpadl(gpadl, True)
    n.events.clear()
    n.sent.clear()


# -- version negotiation -------------------------------------------------------
def test_version_negotiation_newest_first_over_connection_4():
    lb = Loopback()
    lb.client.connect()
    first, conn = lb.cn.sent[0]
    assert first.vmbus_version_requested == Version.WIN10_V5_3 and conn == 4
    lb.pump()
    assert lb.client.version == Version.WIN10_V5_3
    assert lb.client.msg_conn_id == 1
    assert lb.client.state is ClientState.READY


def test_version_negotiation_falls_back_when_refused():
    cn = RecordingClientNotifier()
    c = VmbusClient(cn, versions=(0x00060000, Version.WIN10_V5_3))
    c.connect()
    c.handle(P.VersionResponse(version_supported=0))
    assert cn.sent[-1][0].vmbus_version_requested == Version.WIN10_V5_3
    c.handle(P.VersionResponse(version_supported=1, msg_conn_id=7))
    assert c.msg_conn_id == 7
    assert isinstance(cn.sent[-1][0], P.RequestOffers) and cn.sent[-1][1] == 7


def test_server_refuses_unknown_version_and_4_0_has_no_conn_id():
    n = RecordingServerNotifier()
    s = VmbusServer(n)
    s.handle(P.InitiateContact(0x00030000))
    assert n.sent[-1] == P.VersionResponse(version_supported=0)
    s.handle(P.InitiateContact(Version.WIN10))
    assert n.sent[-1] == P.VersionResponse(version_supported=1, msg_conn_id=0)


def test_client_fails_after_every_version_refused():
    cn = RecordingClientNotifier()
    c = VmbusClient(cn, versions=(Version.WIN10,))
    c.connect()
    c.handle(P.VersionResponse(version_supported=0))
    assert c.state is ClientState.FAILED and "connect_failed" in cn.names()


# -- offers -----------------------------------------------------------------------
def test_offers_in_relid_order_then_all_offers_delivered():
    lb = Loopback()
    lb.server.offer(offer(2))
    lb.server.offer(offer(1))
    lb.client.connect()
    lb.pump()
    names = lb.cn.names()
    assert names.count("offered") == 2 and names[-1] == "all_offers_delivered"
    assert [e[1][0].relid for e in lb.cn.events if e[0] == "offered"] == [1, 2]


def test_offer_after_request_is_sent_at_once():
    s, n = connected_server()
    s.offer(offer(3))
    assert n.sent == [offer(3)]


def test_duplicate_requestoffers_is_a_protocol_error():
    s, n = connected_server()
    s.handle(P.RequestOffers())
    assert n.errors() and "twice" in n.errors()[0][0]


def test_messages_before_initiate_contact_are_refused():
    n = RecordingServerNotifier()
    s = VmbusServer(n)
    s.offer(offer(1))
    s.handle(P.RequestOffers())
    assert n.sent == [] and "before INITIATE_CONTACT" in n.errors()[0][0]


# -- GPADLs -------------------------------------------------------------------------
def test_gpadl_header_and_bodies_are_assembled_then_validated():
    s, n = connected_server()
    pfns = list(range(1000, 1000 + 60))
    for m in P.gpadl_messages(1, 0xE1E10, pfns):
        s.handle(P.decode(P.encode(m)))
    ((name, g),) = n.events
    assert name == "validate_gpadl" and g.pfns == pfns and g.state is GpadlState.VALIDATING
    s.complete_gpadl(0xE1E10, True)
    assert n.sent[-1] == P.GpadlCreated(1, 0xE1E10, 0)


def test_gpadl_with_foreign_pages_is_refused_with_status():
    s, n = connected_server()
    s.handle(P.gpadl_messages(1, 5, [1, 2, 3])[0])
    s.complete_gpadl(5, False)
    assert n.sent[-1] == P.GpadlCreated(1, 5, 1) and 5 not in s.gpadls
    assert n.errors()


def test_gpadl_refusal_is_one_error_with_the_reason_given():
    s, n = connected_server()
    s.handle(P.gpadl_messages(1, 5, [1, 2, 3])[0])
    s.complete_gpadl(5, False, "overlaps another GPADL")
    assert n.errors() == [("GPADL 0x5 overlaps another GPADL", 1)]
    assert n.sent == [P.GpadlCreated(1, 5, 1)]
    s.complete_gpadl(5, False)  # already answered: nothing more
    assert len(n.errors()) == 1 and len(n.sent) == 1


def test_gpadls_a_child_never_completes_are_bounded():
    from vmbus.server import MAX_PENDING_GPADLS, MAX_PENDING_PAGES

    s, n = connected_server()
    # headers that declare 100 pages and carry 1: each stays in progress
    for i in range(MAX_PENDING_GPADLS):
        s.handle(P.GpadlHeader(1, 0x100 + i, 8 + 8 * 100, 1, struct.pack("<IIQ", 409600, 0, i)))
    assert n.errors() == [] and len(s.gpadls) == MAX_PENDING_GPADLS
    s.handle(P.GpadlHeader(1, 0x999, 8 + 8 * 100, 1, struct.pack("<IIQ", 409600, 0, 7)))
    assert n.sent == [P.GpadlCreated(1, 0x999, 1)] and 0x999 not in s.gpadls
    ((reason, relid),) = n.errors()
    assert "refused" in reason and relid == 1
    assert s.channels[1].state is ChannelState.OFFERED  # refused, the channel is fine
    # one completes (created): room for one more
    s.handle(P.GpadlBody(0, 0x100, struct.pack("<99Q", *range(1000, 1099))))
    s.complete_gpadl(0x100, True)
    s.handle(P.GpadlHeader(1, 0x99A, 8 + 8 * 100, 1, struct.pack("<IIQ", 409600, 0, 7)))
    assert 0x99A in s.gpadls and len(n.errors()) == 1
    # the pages being described are bounded too (8190 pages: the most a u16
    # range_buflen can declare)
    s2, n2 = connected_server()
    fit = MAX_PENDING_PAGES // 8190
    assert fit < MAX_PENDING_GPADLS
    for i in range(fit + 1):
        m = P.GpadlHeader(1, 1 + i, 8 + 8 * 8190, 1, struct.pack("<IIQ", 8190 * 4096, 0, i))
        s2.handle(P.decode(P.encode(m)))
    assert len(s2.gpadls) == fit and fit + 1 not in s2.gpadls
    assert n2.sent == [P.GpadlCreated(1, fit + 1, 1)]


def test_duplicate_gpadl_handle_closes_that_channel_only():
    s, n = connected_server()
    created_gpadl(s, n)
    s.handle(P.gpadl_messages(1, 0xE1E10, [7])[0])
    assert s.channels[1].state is ChannelState.CLOSED
    assert s.channels[2].state is ChannelState.OFFERED
    assert len(n.errors()) == 1


def test_gpadl_body_overflowing_the_range_is_rejected():
    s, n = connected_server()
    head = P.gpadl_messages(1, 9, list(range(30)))[0]
    s.handle(head)
    s.handle(P.GpadlBody(0, 9, struct.pack("<10Q", *range(10))))  # 26 + 10 > 30
    assert 9 not in s.gpadls and n.errors()
    assert "validate_gpadl" not in n.names()


def test_gpadl_range_count_mismatch_is_rejected():
    s, n = connected_server()
    bad = P.GpadlHeader(1, 11, 8 + 8 * 3, 1, struct.pack("<IIQQQ", 4096, 0, 1, 2, 3))
    s.handle(bad)  # 4096 bytes span 1 page but 3 PFNs are declared
    assert 11 not in s.gpadls and n.errors()


def test_gpadl_body_for_unknown_handle_is_an_error():
    s, n = connected_server()
    s.handle(P.GpadlBody(0, 0x1234, struct.pack("<Q", 1)))
    assert n.errors() and s.channels[1].state is ChannelState.OFFERED


def test_gpadl_teardown_and_torndown():
    s, n = connected_server()
    created_gpadl(s, n)
    s.handle(P.GpadlTeardown(1, 0xE1E10))
    assert n.events == [("teardown_gpadl", 0xE1E10)]
    assert s.gpadls[0xE1E10].state is GpadlState.TEARING_DOWN
    s.complete_teardown(0xE1E10)
    assert n.sent[-1] == P.GpadlTorndown(0xE1E10) and not s.gpadls


# -- open / close ------------------------------------------------------------------------
def test_open_on_created_gpadl_then_result():
    s, n = connected_server()
    created_gpadl(s, n)
    s.handle(P.OpenChannel(1, 1, 0xE1E10, 0, 4))
    assert n.events == [("open_channel", 1)] and s.channels[1].state is ChannelState.OPENING
    s.complete_open(1, 0)
    assert n.sent[-1] == P.OpenChannelResult(1, 1, 0)
    assert s.channels[1].state is ChannelState.OPEN


@pytest.mark.parametrize("downstream", [0, 1, 7, 8])
def test_open_with_bad_ring_layout_closes_the_channel(downstream):
    s, n = connected_server()
    created_gpadl(s, n, pages=8)
    s.handle(P.OpenChannel(1, 1, 0xE1E10, 0, downstream))
    assert s.channels[1].state is ChannelState.CLOSED and n.errors()


def test_open_on_another_channels_gpadl_is_refused():
    s, n = connected_server()
    created_gpadl(s, n, relid=2)
    s.handle(P.OpenChannel(1, 1, 0xE1E10, 0, 4))
    assert s.channels[1].state is ChannelState.CLOSED and "open_channel" not in n.names()


def test_open_twice_is_out_of_order():
    s, n = connected_server()
    created_gpadl(s, n)
    s.handle(P.OpenChannel(1, 1, 0xE1E10, 0, 4))
    s.complete_open(1, 0)
    n.events.clear()
    s.handle(P.OpenChannel(1, 1, 0xE1E10, 0, 4))
    assert n.events[0] == ("close_channel", (1, "OPENCHANNEL in state open"))
    assert len(n.errors()) == 1
    assert s.channels[1].state is ChannelState.CLOSED


def test_close_channel_tells_the_device():
    s, n = connected_server()
    created_gpadl(s, n)
    s.handle(P.OpenChannel(1, 1, 0xE1E10, 0, 4))
    s.complete_open(1, 0)
    s.handle(P.CloseChannel(1))
    assert ("close_channel", (1, "closed by the child")) in n.events
    assert s.channels[1].state is ChannelState.OFFERED


def test_ring_gpadl_teardown_while_open_closes_channel():
    s, n = connected_server()
    created_gpadl(s, n)
    s.handle(P.OpenChannel(1, 1, 0xE1E10, 0, 4))
    s.complete_open(1, 0)
    s.handle(P.GpadlTeardown(1, 0xE1E10))
    assert s.channels[1].state is ChannelState.CLOSED and n.errors()


# -- rescind, release, unload ------------------------------------------------------------------
def test_rescind_then_relid_released_frees_the_relid():
    lb = Loopback()
    lb.server.offer(offer(1))
    lb.client.connect()
    lb.pump()
    lb.server.rescind(1)
    lb.pump()
    assert lb.client.channels[1].state is ClientChannelState.RESCINDED
    assert lb.server.channels[1].state is ChannelState.REVOKED
    lb.client.release(1)
    lb.pump()
    assert 1 not in lb.server.channels
    lb.server.offer(offer(1))  # the relid may be reused now


def test_relid_released_without_rescind_is_an_error():
    s, n = connected_server()
    s.handle(P.RelidReleased(1))
    assert n.errors() and 1 in s.channels


def test_unload_closes_everything_and_responds():
    s, n = connected_server()
    created_gpadl(s, n)
    s.handle(P.OpenChannel(1, 1, 0xE1E10, 0, 4))
    s.complete_open(1, 0)
    s.handle(P.Unload())
    assert n.sent[-1] == P.UnloadResponse()
    assert ("close_channel", (1, "unload")) in n.events
    assert not s.gpadls and s.version is None
    assert all(ch.state is ChannelState.OFFERED for ch in s.channels.values())


# -- the whole life of a channel through the wire encoding -----------------------------------
def test_full_lifecycle_through_loopback():
    lb = Loopback()
    lb.server.offer(offer(1))
    lb.client.connect()
    lb.pump()
    gpadl = lb.client.create_gpadl(1, list(range(500, 540)))  # 40 pages: header + 1 body
    lb.pump()
    assert ("gpadl_created", (1, gpadl, 0)) in lb.cn.events
    lb.client.open(1, gpadl, downstream_page_offset=20)
    lb.pump()
    assert lb.client.channels[1].state is ClientChannelState.OPEN
    assert lb.server.channels[1].state is ChannelState.OPEN
    lb.client.close(1)
    lb.client.teardown_gpadl(gpadl)
    lb.pump()
    assert ("gpadl_torndown", (gpadl,)) in lb.cn.events
    assert not lb.server.gpadls
    lb.client.unload()
    lb.pump()
    assert lb.client.state is ClientState.DISCONNECTED and "unloaded" in lb.cn.names()


# -- a hostile root / child: malformed and duplicated messages -------------------------------
@pytest.mark.parametrize("data", [b"", b"\xff" * 8, struct.pack("<II", 1, 0) + b"\0" * 4])
def test_server_survives_malformed_bytes(data):
    s, n = connected_server()
    s.handle_bytes(data)
    assert n.errors() and n.sent == []


def test_server_refuses_host_only_messages_from_child():
    s, n = connected_server()
    s.handle(P.OpenChannelResult(1, 1, 0))
    assert n.errors()


def test_client_rejects_unsolicited_and_duplicated_answers():
    lb = Loopback()
    lb.server.offer(offer(1))
    lb.client.connect()
    lb.pump()
    for msg in (
        P.OpenChannelResult(1, 1, 0),
        P.GpadlCreated(1, 42, 0),
        P.GpadlTorndown(42),
        P.UnloadResponse(),
        P.AllOffersDelivered(),
        offer(1),
        P.RescindChannelOffer(9),
    ):
        lb.client.handle(msg)
    assert lb.cn.names().count("protocol_error") == 7
    assert lb.client.channels[1].state is ClientChannelState.OFFERED
