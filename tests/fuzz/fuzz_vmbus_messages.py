"""Fuzz ``vmbus.protocol.decode``: a VMBus channel-management message as a child
posted it (the SynIC payload, at most 240 bytes).

Allowed: ``ProtocolError``.  Also checked: what decodes re-encodes and decodes
to the same message (the root answers from decoded fields).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from _fuzzlib import instrumented, main

with instrumented():
    from vmbus import protocol as P


def TestOneInput(data: bytes) -> None:
    try:
        msg = P.decode(data)
    except P.ProtocolError:
        return
    again = P.decode(P.encode(msg))
    assert again == msg, (msg, again)


def seeds() -> Iterator[bytes]:
    guid = uuid.UUID("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f")
    msgs: list[P.Message] = [
        P.InitiateContact.v5(P.Version.WIN10_V5_3),
        P.InitiateContact(P.Version.WIN10, interrupt_page_or_sint=0x1000),
        P.VersionResponse(1, msg_conn_id=1),
        P.RequestOffers(),
        P.OfferChannel(guid, uuid.UUID(int=7), child_relid=1, connection_id=0x2001),
        P.AllOffersDelivered(),
        P.OpenChannel(1, 1, 0xE1E10, downstream_ringbuffer_pageoffset=16),
        P.OpenChannelResult(1, 1, 0),
        P.CloseChannel(1),
        P.GpadlCreated(1, 0xE1E10, 0),
        P.GpadlTeardown(1, 0xE1E10),
        P.GpadlTorndown(0xE1E10),
        P.RescindChannelOffer(1),
        P.RelidReleased(1),
        P.Unload(),
        P.UnloadResponse(),
    ]
    msgs += P.gpadl_messages(1, 0xE1E10, list(range(0x100, 0x100 + 60)))
    for m in msgs:
        yield P.encode(m)
    yield P.encode(P.RequestOffers()) + bytes(8)  # padded to 8, as hosts do


if __name__ == "__main__":
    main(TestOneInput)
