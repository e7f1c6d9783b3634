"""The partition link: the socketpair the supervisor makes for exactly one partition.

Layer: hv.  The supervisor keeps one end and hands the other to the partition
process as fd 3.  Identity is the socket: whatever arrives on a partition's
link is from that partition, so no partition can speak as another.

It is an ``AF_UNIX``/``SOCK_SEQPACKET`` pair carrying the frames of
hv/wire.py (16-byte header: length, kind, fd count, flags, sequence),
with file descriptors riding along (SCM_RIGHTS).  Frame kinds:

=========  ======================  ===================================================
kind       direction               body
=========  ======================  ===================================================
1 HYPERCALL partition -> supervisor hypercall input value + input block (hv.wire)
2 REPLY     supervisor -> partition hypercall output value + output block
3 MEMORY    supervisor -> partition MAP / BALLOON / GRANT / ... with memfds (hv.memwire)
0x100       both                    a runtime message: one UTF-8 JSON object
RUNTIME
=========  ======================  ===================================================

Runtime messages (``{"op": ...}``):

- supervisor -> partition: ``boot`` (first frame; carries the partition's three
  SynIC fds: page memfd, interrupt eventfd, EOM eventfd; and its name, id,
  role, and the connection IDs it may use), ``stop``;
- partition -> supervisor: ``hello`` (booted; ``guest_visible_bytes``),
  ``memory`` (``guest_visible_bytes`` changed).

Trust: for the supervisor every frame from a partition is untrusted input.
The decoder bounds frame size and fd count and raises ``WireError`` on
anything malformed (the supervisor then kills that partition, nothing else);
the supervisor closes any fd a partition sends it.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from hv.wire import Frame, FrameDecoder, FrameWriter, WireError, recv_frames

__all__ = ["KIND_RUNTIME", "SupervisorEnd", "WireError", "decode_runtime", "runtime_frame",
           "socketpair"]

KIND_RUNTIME = 0x100


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A new link: (supervisor end, partition end); both close-on-exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def runtime_frame(obj: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> Frame:
    """A runtime message; ``fds`` stay the caller's (sending duplicates them)."""
    return Frame(KIND_RUNTIME, 0, json.dumps(obj, separators=(",", ":")).encode(), list(fds))


def decode_runtime(frame: Frame) -> dict[str, Any] | None:
    """The JSON object of a runtime frame, or None if it is not a valid one."""
    if frame.kind != KIND_RUNTIME:
        return None
    try:
        obj = json.loads(frame.body)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class SupervisorEnd:
    """The supervisor's end of one partition link: never blocks on the partition.

    ``send`` queues a frame and writes what the socket takes; when it returns
    False the caller waits for the socket to be writable and calls ``flush``.
    A partition that stops reading makes ``send`` raise ``WireError`` once
    1 MiB is queued.
    """

    __slots__ = ("decoder", "sock", "writer")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.decoder = FrameDecoder()
        self.writer = FrameWriter()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: Frame) -> bool:
        """Queue ``frame`` and flush; True when nothing is left queued.

        Raises:
            WireError: the partition is not reading.
            OSError: the partition is gone.
        """
        self.writer.push(frame)
        return self.writer.flush(self.sock)

    def flush(self) -> bool:
        return self.writer.flush(self.sock)

    def recv(self) -> list[Frame] | None:
        """Frames completed by one read, or None when the partition closed its end.

        Raises:
            BlockingIOError: nothing to read.
            WireError: a malformed frame (the link is unusable afterwards).
        """
        return recv_frames(self.sock, self.decoder)

    def close(self) -> None:
        self.writer.close()
        self.decoder.close()
        self.sock.close()

