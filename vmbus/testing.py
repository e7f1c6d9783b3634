"""Test doubles for the sans-IO control plane: recording notifiers and a
loopback that wires a ``VmbusServer`` to a ``VmbusClient`` through the wire
encoding (every message is encoded and decoded, as it would be between
processes).  Used by the tests; handy when writing a new device.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from . import protocol as P
from .client import VmbusClient
from .server import ServerChannel, ServerGpadl, VmbusServer

__all__ = ["Loopback", "RecordingClientNotifier", "RecordingServerNotifier"]


class RecordingServerNotifier:
    """Records every call; answers nothing by itself (the test decides)."""

    def __init__(self) -> None:
        self.sent: list[P.Message] = []
        self.events: list[tuple[str, Any]] = []

    def send(self, msg: P.Message) -> None:
        self.sent.append(msg)

    def validate_gpadl(self, relid: int, gpadl: ServerGpadl) -> None:
        self.events.append(("validate_gpadl", gpadl))

    def open_channel(self, channel: ServerChannel, userdata: bytes) -> None:
        self.events.append(("open_channel", channel.relid))

    def close_channel(self, channel: ServerChannel, reason: str) -> None:
        self.events.append(("close_channel", (channel.relid, reason)))

    def teardown_gpadl(self, gpadl: ServerGpadl) -> None:
        self.events.append(("teardown_gpadl", gpadl.gpadl))

    def protocol_error(self, reason: str, relid: int | None) -> None:
        self.events.append(("protocol_error", (reason, relid)))

    def names(self) -> list[str]:
        return [e[0] for e in self.events]

    def errors(self) -> list[tuple[str, int | None]]:
        return [e[1] for e in self.events if e[0] == "protocol_error"]


class RecordingClientNotifier:
    def __init__(self) -> None:
        self.sent: list[tuple[P.Message, int]] = []
        self.events: list[tuple[str, Any]] = []

    def send(self, msg: P.Message, connection_id: int) -> None:
        self.sent.append((msg, connection_id))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args: Any) -> None:
            self.events.append((name, args))

        return record

    def names(self) -> list[str]:
        return [e[0] for e in self.events]


class Loopback:
    """A server and a client whose messages cross through encode/decode.
    ``pump()`` delivers queued messages until both sides are quiet; the
    server's device decisions are answered automatically (GPADLs accepted,
    opens succeed, teardowns complete) unless the test overrides them."""

    def __init__(self, accept_gpadls: bool = True, open_status: int = 0) -> None:
        self.sn = RecordingServerNotifier()
        self.cn = RecordingClientNotifier()
        self.server = VmbusServer(self.sn)
        self.client = VmbusClient(self.cn)
        self.accept_gpadls = accept_gpadls
        self.open_status = open_status
        self._to_server: deque[bytes] = deque()
        self._to_client: deque[bytes] = deque()
        self.sn_log: list[tuple[str, Any]] = []  # the server's device calls, answered

    def pump(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            self._collect()
            if self._to_server:
                self.server.handle_bytes(self._to_server.popleft())
            elif self._to_client:
                self.client.handle_bytes(self._to_client.popleft())
            else:
                return
        raise RuntimeError("loopback did not settle")

    def _collect(self) -> None:
        # Device decisions first: answering them queues more messages below.
        while self.sn.events:
            name, arg = self.sn.events.pop(0)
            self.sn_log.append((name, arg))
            if name == "validate_gpadl":
                self.server.complete_gpadl(arg.gpadl, self.accept_gpadls)
            elif name == "open_channel":
                self.server.complete_open(arg, self.open_status)
            elif name == "teardown_gpadl":
                self.server.complete_teardown(arg)
        while self.cn.sent:
            msg, _conn = self.cn.sent.pop(0)
            self._to_server.append(P.encode(msg))
        while self.sn.sent:
            self._to_client.append(P.encode(self.sn.sent.pop(0)))
