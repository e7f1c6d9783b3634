"""The child side of VMBus channel management, as a sans-IO state machine.

Layer: vmbus (no I/O).  ``VmbusClient`` negotiates a version (newest first,
one INITIATE_CONTACT per attempt, as Linux does), asks for offers, builds
GPADLs (GPADL_HEADER with up to 26 page numbers, then GPADL_BODY messages of
up to 28), opens, closes and releases channels, and unloads.  Everything it
wants done goes out through a ``ClientNotifier``; the process loop in
``partitions/`` posts the messages as hypercalls.

Trust: messages come from the root, which a child does not trust either
(spec §9.1): unknown relids, GPADLs and answers out of order become one
``protocol_error`` notice, never an exception out of ``handle``.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Protocol

from hv.abi import VMBUS_MESSAGE_CONNECTION_ID, VMBUS_MESSAGE_CONNECTION_ID_4

from . import protocol as P
from .protocol import Message, MessageType, ProtocolError, Version

__all__ = ["ClientChannel", "ClientChannelState", "ClientNotifier", "ClientState", "VmbusClient"]

#: Linux hands out GPADL handles from a counter starting here.
FIRST_GPADL_HANDLE = 0xE1E10


class ClientState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"  #: INITIATE_CONTACT sent
    REQUESTING = "requesting"  #: REQUESTOFFERS sent, offers arriving
    READY = "ready"  #: ALLOFFERS_DELIVERED received
    UNLOADING = "unloading"  #: UNLOAD sent
    FAILED = "failed"  #: no version was accepted


class ClientChannelState(enum.Enum):
    OFFERED = "offered"
    OPENING = "opening"
    OPEN = "open"
    RESCINDED = "rescinded"  #: the root withdrew it; release it when done


@dataclass
class ClientChannel:
    offer: P.OfferChannel
    state: ClientChannelState = ClientChannelState.OFFERED
    openid: int = 0

    @property
    def relid(self) -> int:
        return self.offer.child_relid


class ClientNotifier(Protocol):
    def send(self, msg: Message, connection_id: int) -> None:
        """Post ``msg`` to the root on ``connection_id`` (HvPostMessage)."""

    def connected(self, version: int) -> None: ...
    def connect_failed(self) -> None: ...
    def offered(self, channel: ClientChannel) -> None: ...
    def all_offers_delivered(self) -> None: ...
    def gpadl_created(self, relid: int, gpadl: int, status: int) -> None: ...
    def gpadl_torndown(self, gpadl: int) -> None: ...
    def opened(self, channel: ClientChannel, status: int) -> None: ...
    def rescinded(self, channel: ClientChannel) -> None: ...
    def unloaded(self) -> None: ...
    def protocol_error(self, reason: str) -> None: ...


class VmbusClient:
    """Channel management for one child partition (sans-IO)."""

    def __init__(self, notifier: ClientNotifier, versions: tuple[int, ...] | None = None) -> None:
        self.n = notifier
        self.versions = tuple(versions or sorted(Version, reverse=True))
        self.state = ClientState.DISCONNECTED
        self.version: int | None = None
        self.msg_conn_id = VMBUS_MESSAGE_CONNECTION_ID
        self.channels: dict[int, ClientChannel] = {}
        self.pending_gpadls: dict[int, int] = {}  # gpadl -> relid, awaiting CREATED
        self.gpadls: dict[int, int] = {}  # created gpadl -> relid
        self.teardowns: set[int] = set()
        self._attempt = 0
        self._handles = itertools.count(FIRST_GPADL_HANDLE)

    # -- actions -------------------------------------------------------------
    def connect(self) -> None:
        self._attempt = 0
        self._contact()

    def _contact(self) -> None:
        v = self.versions[self._attempt]
        self.state = ClientState.CONNECTING
        conn = (VMBUS_MESSAGE_CONNECTION_ID_4 if v >= Version.WIN10_V5
                else VMBUS_MESSAGE_CONNECTION_ID)
        self.n.send(
            P.InitiateContact.v5(v) if v >= Version.WIN10_V5 else P.InitiateContact(v), conn
        )

    def _post(self, msg: Message) -> None:
        self.n.send(msg, self.msg_conn_id)

    def create_gpadl(self, relid: int, pfns: list[int] | tuple[int, ...]) -> int:
        """Describe ``pfns`` (whole pages of our memory) to the root; returns the
        handle, confirmed later by ``gpadl_created``."""
        if relid not in self.channels:
            raise ValueError(f"no channel {relid}")
        gpadl = next(self._handles)
        self.pending_gpadls[gpadl] = relid
        for msg in P.gpadl_messages(relid, gpadl, list(pfns)):
            self._post(msg)
        return gpadl

    def open(
        self, relid: int, gpadl: int, downstream_page_offset: int, userdata: bytes = bytes(120)
    ) -> None:
        ch = self.channels.get(relid)
        if ch is None or ch.state is not ClientChannelState.OFFERED:
            raise ValueError(f"channel {relid} cannot be opened now")
        if self.gpadls.get(gpadl) != relid:
            raise ValueError(f"GPADL {gpadl:#x} is not a created GPADL of channel {relid}")
        ch.state = ClientChannelState.OPENING
        ch.openid = relid  # Linux uses the relid as openid
        self._post(
            P.OpenChannel(
                relid, ch.openid, gpadl, 0, downstream_page_offset, userdata.ljust(120, b"\0")[:120]
            )
        )

    def close(self, relid: int) -> None:
        ch = self.channels.get(relid)
        if ch is None:
            raise ValueError(f"no channel {relid}")
        if ch.state in (ClientChannelState.OPEN, ClientChannelState.OPENING):
            self._post(P.CloseChannel(relid))
            ch.state = ClientChannelState.OFFERED

    def teardown_gpadl(self, gpadl: int) -> None:
        relid = self.gpadls.pop(gpadl, None)
        if relid is None:
            raise ValueError(f"no GPADL {gpadl:#x}")
        self.teardowns.add(gpadl)
        self._post(P.GpadlTeardown(relid, gpadl))

    def release(self, relid: int) -> None:
        """After a rescind: tell the root the relid may be reused."""
        ch = self.channels.get(relid)
        if ch is None or ch.state is not ClientChannelState.RESCINDED:
            raise ValueError(f"channel {relid} was not rescinded")
        del self.channels[relid]
        self._post(P.RelidReleased(relid))

    def unload(self) -> None:
        self.state = ClientState.UNLOADING
        self._post(P.Unload())

    # -- messages from the root ----------------------------------------------
    def handle_bytes(self, data: bytes) -> None:
        try:
            msg = P.decode(data)
        except ProtocolError as e:
            self.n.protocol_error(str(e))
            return
        self.handle(msg)

    def handle(self, msg: Message) -> None:
        handler = self._HANDLERS.get(msg.TYPE)
        if handler is None:
            self.n.protocol_error(f"{msg.TYPE.name} is not a message the root sends")
            return
        try:
            handler(self, msg)
        except ProtocolError as e:
            self.n.protocol_error(str(e))

    def _version_response(self, msg: P.VersionResponse) -> None:
        if self.state is not ClientState.CONNECTING:
            raise ProtocolError("VERSION_RESPONSE without INITIATE_CONTACT")
        v = self.versions[self._attempt]
        if msg.version_supported:
            self.version = v
            if v >= Version.WIN10_V5:
                self.msg_conn_id = msg.msg_conn_id
            self.state = ClientState.REQUESTING
            self.n.connected(v)
            self._post(P.RequestOffers())
            return
        self._attempt += 1
        if self._attempt < len(self.versions):
            self._contact()
        else:
            self.state = ClientState.FAILED
            self.n.connect_failed()

    def _offer(self, msg: P.OfferChannel) -> None:
        if self.state not in (ClientState.REQUESTING, ClientState.READY):
            raise ProtocolError("OFFERCHANNEL before REQUESTOFFERS")
        relid = msg.child_relid
        if relid == 0 or relid in self.channels:
            raise ProtocolError(f"offer of relid {relid} that is reserved or in use")
        ch = self.channels[relid] = ClientChannel(msg)
        self.n.offered(ch)

    def _all_offers(self, _msg: P.AllOffersDelivered) -> None:
        if self.state is not ClientState.REQUESTING:
            raise ProtocolError("ALLOFFERS_DELIVERED out of order")
        self.state = ClientState.READY
        self.n.all_offers_delivered()

    def _gpadl_created(self, msg: P.GpadlCreated) -> None:
        relid = self.pending_gpadls.pop(msg.gpadl, None)
        if relid is None or relid != msg.child_relid:
            raise ProtocolError(f"GPADL_CREATED for unknown GPADL {msg.gpadl:#x}")
        if msg.creation_status == 0:
            self.gpadls[msg.gpadl] = relid
        self.n.gpadl_created(relid, msg.gpadl, msg.creation_status)

    def _gpadl_torndown(self, msg: P.GpadlTorndown) -> None:
        if msg.gpadl not in self.teardowns:
            raise ProtocolError(f"GPADL_TORNDOWN for GPADL {msg.gpadl:#x} not torn down")
        self.teardowns.discard(msg.gpadl)
        self.n.gpadl_torndown(msg.gpadl)

    def _open_result(self, msg: P.OpenChannelResult) -> None:
        ch = self.channels.get(msg.child_relid)
        if ch is None or ch.state is not ClientChannelState.OPENING or ch.openid != msg.openid:
            raise ProtocolError(f"OPENCHANNEL_RESULT for relid {msg.child_relid} not opening")
        ch.state = ClientChannelState.OPEN if msg.status == 0 else ClientChannelState.OFFERED
        self.n.opened(ch, msg.status)

    def _rescind(self, msg: P.RescindChannelOffer) -> None:
        ch = self.channels.get(msg.child_relid)
        if ch is None:
            raise ProtocolError(f"rescind of unknown relid {msg.child_relid}")
        ch.state = ClientChannelState.RESCINDED
        self.n.rescinded(ch)

    def _unload_response(self, _msg: P.UnloadResponse) -> None:
        if self.state is not ClientState.UNLOADING:
            raise ProtocolError("UNLOAD_RESPONSE without UNLOAD")
        self.channels.clear()
        self.gpadls.clear()
        self.pending_gpadls.clear()
        self.teardowns.clear()
        self.state = ClientState.DISCONNECTED
        self.version = None
        self.n.unloaded()

    _HANDLERS = {
        MessageType.VERSION_RESPONSE: _version_response,
        MessageType.OFFERCHANNEL: _offer,
        MessageType.ALLOFFERS_DELIVERED: _all_offers,
        MessageType.GPADL_CREATED: _gpadl_created,
        MessageType.GPADL_TORNDOWN: _gpadl_torndown,
        MessageType.OPENCHANNEL_RESULT: _open_result,
        MessageType.RESCIND_CHANNELOFFER: _rescind,
        MessageType.UNLOAD_RESPONSE: _unload_response,
    }
