"""The supervisor's end of a partition link (hv/link.py): never blocks on the partition.

Layer: hv (the supervisor's side).  Trust: every frame from a partition is
untrusted; the decoder bounds frame size and fd count (hv.wire).
"""

from __future__ import annotations

import socket

from hv.wire import Frame, FrameDecoder, FrameWriter, recv_frames

__all__ = ["SupervisorEnd"]


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

