"""The root side of VMBus channel management, as a sans-IO state machine.

Layer: vmbus (no I/O).  One ``VmbusServer`` serves one child partition: it
takes decoded messages from the child (``handle``), the root's own decisions
(``offer``, ``rescind``, ``close``, ``complete_*``), and emits everything
through a ``ServerNotifier`` (send a message to the child; ask the device side
to validate a GPADL, open or close a channel).  The process loop in
``partitions/`` connects it to real IPC; tests use ``vmbus.testing``'s
recording notifier.

States follow OpenVMM's host-side model (spec §3.5), reduced to what this
emulation speaks (versions 4.0 to 5.3, no reserved channels, no MNF).

Trust: every message comes from a child that may be hostile.  A malformed
message, a message for an unknown relid or GPADL, or one that is out of order
for its channel gets one ``protocol_error`` notice; if it names a channel,
that channel is closed (its device told so) and the server goes on serving
the others.  Nothing a child sends can raise out of ``handle``.  What a child
can make the server hold is bounded: MAX_GPADLS GPADLs, of which at most
MAX_PENDING_GPADLS (with MAX_PENDING_PAGES pages in all) still being built or
validated; a GPADL beyond that is refused with GPADL_CREATED status 1.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Protocol

from hv.abi import PAGE_SIZE, VMBUS_MESSAGE_CONNECTION_ID

from . import protocol as P
from .protocol import Message, MessageType, ProtocolError, Version

__all__ = [
    "ChannelState",
    "GpadlState",
    "ServerChannel",
    "ServerGpadl",
    "ServerNotifier",
    "VmbusServer",
]

SUPPORTED_VERSIONS = tuple(sorted(Version, reverse=True))
#: How many pages a GPADL may have (an emulation limit: 1 GiB of 4 KiB pages).
MAX_GPADL_PAGES = 1 << 18
#: GPADLs one child may have at once (as many as it may have grants).
MAX_GPADLS = 1024
#: GPADLs one child may be building or having validated at once, and the pages
#: they may declare in total: a child cannot make the root hold more than this
#: for GPADLs it never completes.
MAX_PENDING_GPADLS = 64
MAX_PENDING_PAGES = MAX_GPADL_PAGES


class ChannelState(enum.Enum):
    """Root-side channel states (OpenVMM ``ChannelState``, simplified)."""

    OFFERED = "offered"  #: offered to the child (or waiting for it to ask), closed
    OPENING = "opening"  #: OPENCHANNEL received; the device is deciding
    OPEN = "open"  #: open: packets may flow
    REVOKED = "revoked"  #: rescinded; waiting for the child's RELID_RELEASED
    CLOSED = "closed"  #: closed by protocol error or unload; offer still stands


class GpadlState(enum.Enum):
    """Root-side GPADL states."""

    IN_PROGRESS = "in_progress"  #: header received, bodies still arriving
    VALIDATING = "validating"  #: complete; the supervisor/device checks the pages
    CREATED = "created"  #: GPADL_CREATED(0) sent
    TEARING_DOWN = "tearing_down"  #: teardown requested; waiting for the device


@dataclass
class ServerGpadl:
    gpadl: int
    relid: int
    byte_count: int
    byte_offset: int
    pages: int
    pfns: list[int] = field(default_factory=list)
    state: GpadlState = GpadlState.IN_PROGRESS


@dataclass
class ServerChannel:
    offer: P.OfferChannel
    state: ChannelState = ChannelState.OFFERED
    openid: int = 0
    ring_gpadl: int = 0
    downstream_offset: int = 0

    @property
    def relid(self) -> int:
        return self.offer.child_relid


class ServerNotifier(Protocol):
    """What the server asks of the world around it."""

    def send(self, msg: Message) -> None:
        """Post ``msg`` to the child (a SynIC message)."""

    def validate_gpadl(self, relid: int, gpadl: ServerGpadl) -> None:
        """Check that every page belongs to the child; answer with
        ``VmbusServer.complete_gpadl``."""

    def open_channel(self, channel: ServerChannel, userdata: bytes) -> None:
        """The child opened ``channel``; answer with ``complete_open``."""

    def close_channel(self, channel: ServerChannel, reason: str) -> None:
        """``channel`` is closed (by the child, an error, rescind or unload)."""

    def teardown_gpadl(self, gpadl: ServerGpadl) -> None:
        """Unmap ``gpadl``; answer with ``complete_teardown``."""

    def protocol_error(self, reason: str, relid: int | None) -> None:
        """The child broke the protocol (one log line)."""


class VmbusServer:
    """Channel management for one child partition (sans-IO)."""

    def __init__(self, notifier: ServerNotifier, msg_conn_id: int = VMBUS_MESSAGE_CONNECTION_ID):
        self.n = notifier
        self.version: int | None = None
        self.msg_conn_id = msg_conn_id
        self.offers_requested = False
        self.channels: dict[int, ServerChannel] = {}
        self.gpadls: dict[int, ServerGpadl] = {}

    # -- root-side actions -------------------------------------------------
    def offer(self, offer: P.OfferChannel) -> None:
        """Offer a channel (relid in ``offer.child_relid``, starting at 1)."""
        relid = offer.child_relid
        if relid == 0 or relid in self.channels:
            raise ValueError(f"relid {relid} is reserved or in use")
        self.channels[relid] = ServerChannel(offer)
        if self.offers_requested:
            self.n.send(offer)

    def rescind(self, relid: int) -> None:
        """Withdraw a channel (its VSP went away).  The relid stays taken until
        the child sends RELID_RELEASED."""
        ch = self.channels.get(relid)
        if ch is None:
            raise ValueError(f"no channel {relid}")
        if ch.state in (ChannelState.OPENING, ChannelState.OPEN):
            self.n.close_channel(ch, "rescinded")
        ch.state = ChannelState.REVOKED
        if self.offers_requested:
            self.n.send(P.RescindChannelOffer(relid))
        else:
            del self.channels[relid]  # the child never saw it

    def close(self, relid: int, reason: str) -> None:
        """Close an open channel from the root's side (its ring memory went
        away): the device is told (``close_channel``), the offer stands and
        the child may open it again.  Sends nothing."""
        ch = self.channels.get(relid)
        if ch is None:
            raise ValueError(f"no channel {relid}")
        if ch.state in (ChannelState.OPENING, ChannelState.OPEN):
            self.n.close_channel(ch, reason)
            ch.state = ChannelState.CLOSED

    def complete_gpadl(self, gpadl: int, ok: bool, reason: str = "") -> None:
        """The validation's answer: GPADL_CREATED with status 0, or (``ok``
        false) status 1 and one ``protocol_error`` giving ``reason`` (by
        default: pages the child does not own)."""
        g = self.gpadls.get(gpadl)
        if g is None or g.state is not GpadlState.VALIDATING:
            return  # torn down meanwhile
        if ok:
            g.state = GpadlState.CREATED
            self.n.send(P.GpadlCreated(g.relid, gpadl, 0))
        else:
            del self.gpadls[gpadl]
            why = reason or "names pages the child does not own"
            self.n.protocol_error(f"GPADL {gpadl:#x} {why}", g.relid)
            self.n.send(P.GpadlCreated(g.relid, gpadl, 1))

    def complete_open(self, relid: int, status: int) -> None:
        ch = self.channels.get(relid)
        if ch is None or ch.state is not ChannelState.OPENING:
            return
        ch.state = ChannelState.OPEN if status == 0 else ChannelState.OFFERED
        self.n.send(P.OpenChannelResult(relid, ch.openid, status))

    def complete_teardown(self, gpadl: int) -> None:
        g = self.gpadls.pop(gpadl, None)
        if g is not None:
            self.n.send(P.GpadlTorndown(gpadl))

    # -- messages from the child ---------------------------------------------
    def handle_bytes(self, data: bytes) -> None:
        """Decode and handle one message; malformed ones become a protocol_error."""
        msg = self.decode(data)
        if msg is not None:
            self.handle(msg)

    def decode(self, data: bytes) -> Message | None:
        """One message from the child, or None when it is malformed (one
        protocol_error).  For a caller that looks at the message before
        ``handle`` (a trace) without decoding it twice."""
        try:
            return P.decode(data)
        except ProtocolError as e:
            self.n.protocol_error(str(e), None)
            return None

    def handle(self, msg: Message) -> None:
        handler = self._HANDLERS.get(msg.TYPE)
        if handler is None:
            self.n.protocol_error(f"{msg.TYPE.name} is not a message a child sends", None)
            return
        if msg.TYPE is not MessageType.INITIATE_CONTACT and self.version is None:
            self.n.protocol_error(f"{msg.TYPE.name} before INITIATE_CONTACT", None)
            return
        try:
            handler(self, msg)
        except ProtocolError as e:
            self.n.protocol_error(str(e), getattr(msg, "child_relid", None))

    def _initiate_contact(self, msg: P.InitiateContact) -> None:
        if self.version is not None:
            # A new contact resets the bus (QEMU does this too: firmware -> OS).
            self.reset("re-initiated contact")
        v = msg.vmbus_version_requested
        if v not in SUPPORTED_VERSIONS:
            self.n.send(P.VersionResponse(version_supported=0))
            return
        if v >= Version.WIN10_V5 and msg.msg_sint != 2:
            self.n.send(P.VersionResponse(version_supported=0, connection_state=2))
            return
        self.version = v
        conn = self.msg_conn_id if v >= Version.WIN10_V5 else 0
        self.n.send(P.VersionResponse(version_supported=1, msg_conn_id=conn))

    def _request_offers(self, _msg: P.RequestOffers) -> None:
        if self.offers_requested:
            raise ProtocolError("REQUESTOFFERS sent twice")
        self.offers_requested = True
        for relid in sorted(self.channels):
            ch = self.channels[relid]
            if ch.state is not ChannelState.REVOKED:
                self.n.send(ch.offer)
        self.n.send(P.AllOffersDelivered())

    def _channel(self, relid: int) -> ServerChannel:
        ch = self.channels.get(relid)
        if ch is None:
            raise ProtocolError(f"unknown relid {relid}")
        return ch

    def _fail_channel(self, ch: ServerChannel, reason: str) -> None:
        """A child misused ``ch``: close it, tell once, keep serving the rest."""
        if ch.state in (ChannelState.OPENING, ChannelState.OPEN):
            self.n.close_channel(ch, reason)
        if ch.state is not ChannelState.REVOKED:
            ch.state = ChannelState.CLOSED
        raise ProtocolError(f"channel {ch.relid}: {reason}")

    def _gpadl_header(self, msg: P.GpadlHeader) -> None:
        ch = self._channel(msg.child_relid)
        if ch.state is ChannelState.REVOKED:
            raise ProtocolError(f"GPADL on rescinded channel {ch.relid}")
        if msg.gpadl in self.gpadls or msg.gpadl == 0:
            self._fail_channel(ch, f"duplicate or zero GPADL handle {msg.gpadl:#x}")
        if msg.rangecount != 1:
            self._fail_channel(ch, f"GPADL with {msg.rangecount} ranges (only 1 is supported)")
        if len(msg.tail) < 8 or msg.range_buflen < 16 or msg.range_buflen % 8:
            self._fail_channel(ch, "GPADL range too short")
        byte_count, byte_offset = struct.unpack_from("<II", msg.tail)
        pages = (msg.range_buflen - 8) // 8
        spanned = (byte_offset + byte_count + PAGE_SIZE - 1) // PAGE_SIZE
        if byte_count == 0 or byte_offset >= PAGE_SIZE or spanned != pages:
            self._fail_channel(ch, "GPADL range and page count disagree")
        if pages > MAX_GPADL_PAGES:
            self._fail_channel(ch, f"GPADL of {pages} pages is too large")
        first = (len(msg.tail) - 8) // 8
        if first > pages:
            self._fail_channel(ch, "GPADL_HEADER carries more pages than its range")
        pending = [x for x in self.gpadls.values()
                   if x.state in (GpadlState.IN_PROGRESS, GpadlState.VALIDATING)]
        if (len(self.gpadls) >= MAX_GPADLS or len(pending) >= MAX_PENDING_GPADLS
                or sum(x.pages for x in pending) + pages > MAX_PENDING_PAGES):
            # Refused, not the channel's fault: it may try again later.
            self.n.send(P.GpadlCreated(ch.relid, msg.gpadl, 1))
            raise ProtocolError(
                f"GPADL {msg.gpadl:#x} refused: {len(self.gpadls)} GPADLs, {len(pending)} "
                "still being built or validated"
            )
        pfns = list(struct.unpack_from(f"<{first}Q", msg.tail, 8))
        g = ServerGpadl(msg.gpadl, ch.relid, byte_count, byte_offset, pages, pfns)
        self.gpadls[msg.gpadl] = g
        self._maybe_complete(g)

    def _gpadl_body(self, msg: P.GpadlBody) -> None:
        g = self.gpadls.get(msg.gpadl)
        if g is None:
            raise ProtocolError(f"GPADL_BODY for unknown GPADL {msg.gpadl:#x}")
        if g.state is not GpadlState.IN_PROGRESS:
            del self.gpadls[msg.gpadl]
            self._fail_channel(
                self._channel(g.relid), f"GPADL_BODY after {msg.gpadl:#x} was complete"
            )
        pfns = msg.pfns
        if len(g.pfns) + len(pfns) > g.pages:
            del self.gpadls[msg.gpadl]
            self._fail_channel(
                self._channel(g.relid), "GPADL_BODY carries more pages than the range"
            )
        g.pfns.extend(pfns)
        self._maybe_complete(g)

    def _maybe_complete(self, g: ServerGpadl) -> None:
        if len(g.pfns) == g.pages:
            g.state = GpadlState.VALIDATING
            self.n.validate_gpadl(g.relid, g)

    def _gpadl_teardown(self, msg: P.GpadlTeardown) -> None:
        g = self.gpadls.get(msg.gpadl)
        if g is None or g.relid != msg.child_relid:
            raise ProtocolError(f"teardown of unknown GPADL {msg.gpadl:#x}")
        ch = self.channels.get(g.relid)
        if (
            ch is not None
            and ch.ring_gpadl == msg.gpadl
            and ch.state
            in (
                ChannelState.OPENING,
                ChannelState.OPEN,
            )
        ):
            self._fail_channel(ch, f"teardown of the ring GPADL {msg.gpadl:#x} while open")
        g.state = GpadlState.TEARING_DOWN
        self.n.teardown_gpadl(g)

    def _open_channel(self, msg: P.OpenChannel) -> None:
        ch = self._channel(msg.child_relid)
        if ch.state is not ChannelState.OFFERED and ch.state is not ChannelState.CLOSED:
            self._fail_channel(ch, f"OPENCHANNEL in state {ch.state.value}")
        g = self.gpadls.get(msg.ringbuffer_gpadlhandle)
        if g is None or g.relid != ch.relid or g.state is not GpadlState.CREATED:
            self._fail_channel(
                ch,
                f"OPENCHANNEL on GPADL {msg.ringbuffer_gpadlhandle:#x} "
                "that is not a created GPADL of this channel",
            )
        off = msg.downstream_ringbuffer_pageoffset
        if not (off > 1 and g.pages > off + 1):  # each ring >= 2 pages (QEMU's rule)
            self._fail_channel(ch, f"ring layout: downstream offset {off} in {g.pages} pages")
        ch.state = ChannelState.OPENING
        ch.openid = msg.openid
        ch.ring_gpadl = g.gpadl
        ch.downstream_offset = off
        self.n.open_channel(ch, msg.userdata)

    def _close_channel(self, msg: P.CloseChannel) -> None:
        ch = self._channel(msg.child_relid)
        if ch.state in (ChannelState.OPENING, ChannelState.OPEN):
            self.n.close_channel(ch, "closed by the child")
            ch.state = ChannelState.OFFERED
        elif ch.state is not ChannelState.REVOKED:
            raise ProtocolError(f"CLOSECHANNEL on channel {ch.relid} that is not open")

    def _relid_released(self, msg: P.RelidReleased) -> None:
        ch = self._channel(msg.child_relid)
        if ch.state is not ChannelState.REVOKED:
            raise ProtocolError(f"RELID_RELEASED for channel {ch.relid} that was not rescinded")
        for gid in [gid for gid, g in self.gpadls.items() if g.relid == ch.relid]:
            # Released with its channel: no GPADL_TORNDOWN goes out (popped
            # first, so complete_teardown finds nothing to answer).
            self.n.teardown_gpadl(self.gpadls.pop(gid))
        del self.channels[ch.relid]

    def _unload(self, _msg: P.Unload) -> None:
        self.reset("unload")
        self.n.send(P.UnloadResponse())

    def reset(self, reason: str) -> None:
        """Every channel closed, every GPADL gone; offers stand for the next
        contact.  Sends nothing.  (The child went away, unloaded, or contacted
        us again.)"""
        for relid, ch in list(self.channels.items()):
            if ch.state in (ChannelState.OPENING, ChannelState.OPEN):
                self.n.close_channel(ch, reason)
            if ch.state is ChannelState.REVOKED:
                del self.channels[relid]
            else:
                ch.state = ChannelState.OFFERED
        for g in list(self.gpadls.values()):
            if g.state is not GpadlState.TEARING_DOWN:
                self.n.teardown_gpadl(g)
        self.gpadls.clear()
        self.version = None
        self.offers_requested = False

    _HANDLERS = {
        MessageType.INITIATE_CONTACT: _initiate_contact,
        MessageType.REQUESTOFFERS: _request_offers,
        MessageType.GPADL_HEADER: _gpadl_header,
        MessageType.GPADL_BODY: _gpadl_body,
        MessageType.GPADL_TEARDOWN: _gpadl_teardown,
        MessageType.OPENCHANNEL: _open_channel,
        MessageType.CLOSECHANNEL: _close_channel,
        MessageType.RELID_RELEASED: _relid_released,
        MessageType.UNLOAD: _unload,
    }
