"""The control protocol: JSON lines over the cluster's Unix control socket.

Layer: hv.  The supervisor serves it (hv/supervisor/requests.py); the ``viridian`` CLI
is one client, tests and scripts are others (``ControlClient`` below, or any
language: ``socat - UNIX-CONNECT:$RUN/control.sock``).

Wire format: UTF-8 JSON objects, one per line (``\\n``-terminated, at most
1 MiB).  A connection carries any number of requests, each answered in order
by one response line::

    -> {"op": "status"}
    <- {"ok": true, "status": {...}}            # docs/status-schema.md
    -> {"op": "partition.stop", "name": "child9"}
    <- {"ok": false, "error": "no such partition: child9", "code": "not_found"}

Error codes: ``bad_request`` (not JSON, unknown op, missing field),
``not_found`` (no such partition), ``invalid`` (a value out of range or a
state that forbids the op), ``failed`` (the op was tried and did not work).

Ops (``name`` is a partition name or its numeric id; the root is 0):

============================  ===================================================
``ping``                      ``{"ok", "cluster", "pid", "protocol"}``
``status``                    ``{"ok", "status": <status object>}``
``stop``                      stop the cluster: children, then the root, then the
                              supervisor; answers at once; ``"force": true`` kills
``partition.start``           start a stopped or crashed partition
``partition.stop``            stop one partition (it is not restarted)
``partition.restart``         stop it, then start it again
``partition.kill``            SIGKILL it and keep it stopped (Hyper-V "Turn Off")
``partition.set``             ``cpu_weight`` 1-10000, ``cpu_limit`` (0, 100],
                              ``cpu_reserve`` [0, 100]; live; answers ``"cpu"``
``memory.add``                ``bytes`` (a multiple of 4096): hot-add to a running
                              child through its Dynamic Memory channel; answers
                              when the guest has (``"assigned_bytes"``, ``"pages"``,
                              ``"ms"``); refused with the reason: above its
                              maximum, not enough host memory, the guest refused,
                              the channel is not open
``memory.balloon``            ``bytes``: the child gives back its highest free
                              pages (punched out of its memfd); refused below its
                              minimum or when the guest does not answer
``memory.set``                ``minimum``, ``maximum``, ``buffer``, ``weight``,
                              ``dynamic``: live; answers ``"memory"``
``workload``                  ``device``, ``action``, ``args``: relayed to a
                              child's device (echo ``stream``, dynmem ``bursts``,
                              ``close`` / ``open`` of its channel, ``stop``)
``channel.rescind``           ``relid``: the root withdraws a child's channel
``trace``                     turns the connection into a stream of the
                              partition's decoded control messages and packet
                              headers (``{"event": "trace", "events": [...]}``)
``watch``                     turns the connection into an event stream: one
                              ``{"event": "snapshot", "status": {...}}``, then
                              ``{"event": "state", "name", "state", "pid",
                              "restarts", "t"}`` per state change, and
                              ``{"event": "stopped"}`` before the supervisor exits
============================  ===================================================

``partition.*`` answers once the request is taken (``"state"`` is the new
state, e.g. ``stopping``); watch the events to know when it is reached.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_LINE_BYTES",
    "PROTOCOL_VERSION",
    "ControlClient",
    "ControlError",
    "LineReader",
    "encode",
]

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1 << 20


class ControlError(Exception):
    """An ``{"ok": false}`` answer, or no answer at all (``code="unreachable"``)."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


def encode(obj: dict[str, Any]) -> bytes:
    """One protocol line."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class LineReader:
    """Splits a byte stream into JSON-line objects (sans-IO: feed bytes, get objects)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any] | ControlError]:
        """Objects completed by ``data``; a bad line yields a ControlError in its place.

        Raises:
            ControlError: a line longer than MAX_LINE_BYTES (drop the connection).
        """
        self._buf += data
        out: list[dict[str, Any] | ControlError] = []
        while (i := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:i])
            del self._buf[: i + 1]
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                out.append(ControlError(f"not JSON: {e}", "bad_request"))
                continue
            if not isinstance(obj, dict):
                out.append(ControlError("a request is a JSON object", "bad_request"))
                continue
            out.append(obj)
        if len(self._buf) > MAX_LINE_BYTES:
            raise ControlError("line too long", "bad_request")
        return out


class ControlClient:
    """A blocking client of one cluster's control socket.

    Args:
        path: the control socket (``RunDir.control_socket``).
        timeout: seconds any single wait may block.

    Raises:
        ControlError: (code ``unreachable``) nobody listens on ``path``.
    """

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as e:
            self._sock.close()
            raise ControlError(f"cannot reach the supervisor at {path}: {e.strerror}",
                               "unreachable") from None
        self._reader = LineReader()
        self._pending: list[dict[str, Any] | ControlError] = []

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def _next(self, timeout: float | None) -> dict[str, Any] | None:
        """The next line, or None at EOF.  Raises TimeoutError after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no answer from the supervisor")
                self._sock.settimeout(left)
            else:
                self._sock.settimeout(None)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no answer from the supervisor") from None
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self._pending += self._reader.feed(data)
        item = self._pending.pop(0)
        if isinstance(item, ControlError):
            raise item
        return item

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its ``{"ok": true}`` answer.

        Raises:
            ControlError: the answer was ``{"ok": false}`` (``.code`` says why), or
                the supervisor closed the connection (code ``unreachable``).
            TimeoutError: no answer within ``timeout``.
        """
        self._sock.sendall(encode({"op": op, **args}))
        ans = self._next(self.timeout)
        if ans is None:
            raise ControlError("the supervisor closed the connection", "unreachable")
        if not ans.get("ok"):
            raise ControlError(str(ans.get("error", "failed")), str(ans.get("code", "failed")))
        return ans

    def watch(self) -> dict[str, Any]:
        """Turn this connection into an event stream; returns the snapshot status."""
        self._sock.sendall(encode({"op": "watch"}))
        ev = self._next(self.timeout)
        if ev is None or ev.get("event") != "snapshot":
            raise ControlError("the supervisor did not start the event stream", "failed")
        status = ev["status"]
        assert isinstance(status, dict)
        return status

    def events(self, timeout: float | None) -> Iterator[dict[str, Any]]:
        """Events after ``watch()``, until the supervisor goes away.

        Args:
            timeout: the longest wait for any one event (None: forever).

        Raises:
            TimeoutError: no event within ``timeout``.
        """
        while (ev := self._next(timeout)) is not None:
            yield ev
