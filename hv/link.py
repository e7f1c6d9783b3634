"""The partition link: the socketpair the supervisor makes for exactly one partition.

Layer: hv, shared by both sides (the supervisor's non-blocking end is
hv/supervisor/link_end.py).  The supervisor keeps one end and hands the other to the partition
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

from hv.wire import Frame, WireError

__all__ = ["KIND_RUNTIME", "WireError", "decode_runtime", "runtime_frame", "socketpair"]

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
