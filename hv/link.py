"""The partition link: the socketpair the supervisor makes for exactly one partition.

Layer: hv.  The supervisor keeps one end and hands the other to the partition
process as fd 3.  Identity is the socket: whatever arrives on a partition's
link is from that partition, so no partition can speak as another.

It is an ``AF_UNIX``/``SOCK_SEQPACKET`` pair, so message boundaries are kept
and file descriptors ride along (SCM_RIGHTS: memory grants, doorbells).  Each
message starts with one kind byte:

``J`` (0x4A)  control, a UTF-8 JSON object, both directions
              supervisor -> partition: ``boot`` (with the memory fds), ``stop``
              partition -> supervisor: ``hello``, ``memory`` (reports)
``H`` (0x48)  a hypercall: request partition -> supervisor, reply back; the
              bytes after the kind byte are hv/hypercalls.py's encoding

Trust: for the supervisor every message from a partition is untrusted input;
``recv`` bounds the size and the number of fds, and the supervisor closes any
fd a partition sends it.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

__all__ = ["KIND_CONTROL", "KIND_HYPERCALL", "MAX_FDS", "MAX_MESSAGE_BYTES", "Link", "socketpair"]

KIND_CONTROL = 0x4A  # "J"
KIND_HYPERCALL = 0x48  # "H"
MAX_MESSAGE_BYTES = 65536
MAX_FDS = 16


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A new link: (supervisor end, partition end); both close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class Link:
    """One end of a partition link.  Owns the socket.

    Raises from every method: ``OSError`` when the peer is gone.
    """

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def from_fd(cls, fd: int) -> Link:
        return cls(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send_control(self, obj: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        data = bytes([KIND_CONTROL]) + json.dumps(obj, separators=(",", ":")).encode()
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def send_hypercall(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [bytes([KIND_HYPERCALL]) + data], list(fds))
        else:
            self.sock.send(bytes([KIND_HYPERCALL]) + data)

    def recv(self) -> tuple[int, bytes, list[int]] | None:
        """The next message as (kind, body, fds), or None when the peer closed.

        The caller owns the returned fds.  A truncated message is dropped
        (kind 0) with its fds closed.

        Raises:
            BlockingIOError: non-blocking socket and nothing to read.
        """
        data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE_BYTES, MAX_FDS)
        if not data and not fds:
            return None
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            return (0, b"", [])
        return (data[0] if data else 0, bytes(data[1:]), list(fds))

    @staticmethod
    def decode_control(body: bytes) -> dict[str, Any] | None:
        """The JSON object of a control message, or None if it is not one."""
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
