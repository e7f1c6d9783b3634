"""Fuzz ``vmbus.server.VmbusServer``: a sequence of messages a child posts,
interleaved with the root's own answers (GPADL validated or refused, open
accepted or refused, teardown done, a channel offered, rescinded or closed).

Allowed: nothing escapes ``handle_bytes`` (its documented promise: a bad
message is a ``protocol_error`` notice).  Also checked after every step: what
the server holds stays within its bounds, and every message it sends encodes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from _fuzzlib import Reader, Writer, instrumented, main

with instrumented():
    from vmbus import protocol as P
    from vmbus import server as S
    from vmbus.testing import RecordingServerNotifier

ECHO = uuid.UUID("d7e5a1c0-0000-4000-8000-0000000000e1")
# step kinds: a child's message (most), or one of the root's actions
MSG, GPADL_OK, GPADL_BAD, OPEN_OK, OPEN_BAD, TORNDOWN, OFFER, RESCIND, CLOSE = range(9)
KINDS = [MSG] * 8 + [GPADL_OK, GPADL_BAD, OPEN_OK, OPEN_BAD, TORNDOWN, OFFER, RESCIND, CLOSE]


class _Notifier(RecordingServerNotifier):
    """Checks what the server sends; keeps only what the root may answer."""

    def send(self, msg: P.Message) -> None:
        P.encode(msg)  # a message the root cannot encode would be a bug
        super().send(msg)


def _offer(relid: int) -> P.OfferChannel:
    return P.OfferChannel(ECHO, uuid.UUID(int=relid), child_relid=relid,
                          connection_id=0x2000 + relid)


def _check(s: S.VmbusServer) -> None:
    assert len(s.gpadls) <= S.MAX_GPADLS
    pending = [g for g in s.gpadls.values()
               if g.state in (S.GpadlState.IN_PROGRESS, S.GpadlState.VALIDATING)]
    assert len(pending) <= S.MAX_PENDING_GPADLS
    assert sum(g.pages for g in pending) <= S.MAX_PENDING_PAGES
    for g in s.gpadls.values():
        assert len(g.pfns) <= g.pages <= S.MAX_GPADL_PAGES


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    n = _Notifier()
    s = S.VmbusServer(n)
    s.offer(_offer(1))
    s.offer(_offer(2))
    next_relid = 3
    for _ in range(64):
        if not r.left():
            break
        kind = r.pick(KINDS)
        if kind == MSG:
            s.handle_bytes(r.chunk(P.MAX_MESSAGE_BYTES + 8))
        elif kind in (GPADL_OK, GPADL_BAD):
            asked = [g for k, g in n.events if k == "validate_gpadl"]
            if asked:
                s.complete_gpadl(r.pick(asked).gpadl, kind == GPADL_OK)
        elif kind in (OPEN_OK, OPEN_BAD):
            opened = [relid for k, relid in n.events if k == "open_channel"]
            if opened:
                s.complete_open(r.pick(opened), 0 if kind == OPEN_OK else 1)
        elif kind == TORNDOWN:
            gone = [g for k, g in n.events if k == "teardown_gpadl"]
            if gone:
                s.complete_teardown(r.pick(gone))
        elif kind == OFFER:
            s.offer(_offer(next_relid))
            next_relid += 1
        else:
            live = sorted(relid for relid, ch in s.channels.items()
                          if ch.state is not S.ChannelState.REVOKED)
            if live:
                relid = r.pick(live)
                if kind == RESCIND:
                    s.rescind(relid)
                else:
                    s.close(relid, "fuzz")
        _check(s)
        if len(n.events) > 256:  # (only the recent ones are picked from)
            del n.events[:128]


def _msg(w: Writer, m: P.Message, pad: int = 0) -> Writer:
    return w.pick(KINDS, MSG).chunk(P.encode(m) + bytes(pad), P.MAX_MESSAGE_BYTES + 8)


def seeds() -> Iterator[bytes]:
    gpadl, pages = 0xE1E10, list(range(0x100, 0x100 + 40))  # a header and one body
    w = Writer()
    _msg(w, P.InitiateContact.v5(P.Version.WIN10_V5_3))
    _msg(w, P.RequestOffers())
    for m in P.gpadl_messages(1, gpadl, pages):
        _msg(w, m)
    w.pick(KINDS, GPADL_OK).below(1, 0)
    _msg(w, P.OpenChannel(1, 1, gpadl, downstream_ringbuffer_pageoffset=20))
    w.pick(KINDS, OPEN_OK).below(1, 0)
    _msg(w, P.CloseChannel(1))
    _msg(w, P.GpadlTeardown(1, gpadl))
    w.pick(KINDS, TORNDOWN).below(1, 0)
    w.pick(KINDS, RESCIND).u8(1)
    _msg(w, P.RelidReleased(2))
    w.pick(KINDS, OFFER)
    _msg(w, P.Unload(), pad=8)
    yield w.done()
    # the older version, then a GPADL refused by the root
    w = Writer()
    _msg(w, P.InitiateContact(P.Version.WIN10))
    _msg(w, P.RequestOffers())
    _msg(w, P.gpadl_messages(2, 7, [1, 2, 3, 4])[0])
    w.pick(KINDS, GPADL_BAD).below(1, 0)
    yield w.done()


if __name__ == "__main__":
    main(TestOneInput)
