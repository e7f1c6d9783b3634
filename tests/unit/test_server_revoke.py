"""``VmbusServer.close``: the root closes a channel whose ring memory went away
(sans-IO, no processes)."""

import uuid

import pytest

from vmbus import protocol as P
from vmbus.protocol import Version
from vmbus.server import ChannelState, VmbusServer
from vmbus.testing import RecordingServerNotifier

ECHO = uuid.UUID("d7e5a1c0-0000-4000-8000-0000000000e1")
GPADL = 0xE1E10
REASON = "its ring memory was revoked"


def server_with_channel(open_it=True):
    n = RecordingServerNotifier()
    s = VmbusServer(n)
    s.offer(P.OfferChannel(ECHO, uuid.UUID(int=1), child_relid=1, connection_id=0x2001))
    s.handle(P.InitiateContact.v5(Version.WIN10_V5_3))
    s.handle(P.RequestOffers())
    s.handle(P.gpadl_messages(1, GPADL, list(range(100, 108)))[0])
    s.complete_gpadl(GPADL, True)
    if open_it:
        s.handle(P.OpenChannel(1, 1, GPADL, 0, 4))
        s.complete_open(1, 0)
    n.events.clear()
    n.sent.clear()
    return s, n


def test_close_tells_the_device_and_sends_nothing():
    s, n = server_with_channel()
    s.close(1, REASON)
    assert n.events == [("close_channel", (1, REASON))]
    assert not n.sent
    assert s.channels[1].state is ChannelState.CLOSED
    assert GPADL in s.gpadls  # the GPADL is the child's to tear down


def test_close_while_opening():
    s, n = server_with_channel(open_it=False)
    s.handle(P.OpenChannel(1, 1, GPADL, 0, 4))
    n.events.clear()
    s.close(1, REASON)
    assert n.events == [("close_channel", (1, REASON))]
    assert s.channels[1].state is ChannelState.CLOSED
    s.complete_open(1, 0)  # the device's late answer finds the channel closed
    assert not n.sent and s.channels[1].state is ChannelState.CLOSED


def test_the_child_may_open_it_again():
    s, n = server_with_channel()
    s.close(1, REASON)
    n.events.clear()
    s.handle(P.OpenChannel(1, 2, GPADL, 0, 4))
    assert n.events == [("open_channel", 1)] and not n.errors()
    s.complete_open(1, 0)
    assert n.sent[-1] == P.OpenChannelResult(1, 2, 0)


@pytest.mark.parametrize("rescinded", [False, True])
def test_close_of_a_channel_that_is_not_open_does_nothing(rescinded):
    s, n = server_with_channel(open_it=False)
    if rescinded:
        s.rescind(1)
        n.sent.clear()
    before = s.channels[1].state
    s.close(1, REASON)
    assert not n.events and not n.sent
    assert s.channels[1].state is before


def test_close_of_an_unknown_relid_is_refused():
    s, n = server_with_channel()
    with pytest.raises(ValueError):
        s.close(9, REASON)
    assert not n.events and not n.sent
