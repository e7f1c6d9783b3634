"""The hypercall client: a partition's side of its link to the supervisor.

Layer: hv, the partition's side.  ``HypercallClient`` makes blocking
hypercalls with a timeout over the partition's socket (fd 3, hv/link.py),
encoding inputs and decoding replies with hv/wire.py; frames that are not the
reply being waited for (memory, runtime) are queued for the partition's loop.

Trust: the supervisor is trusted; a malformed frame from it still raises
``WireError`` rather than being guessed at.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence

from .abi import HvStatus, HypercallCode
from .wire import (
    FLAG_NO_REPLY_ON_SUCCESS,
    Frame,
    FrameDecoder,
    FrameKind,
    WireError,
    encode_control,
    encode_post_message,
    encode_share_pages,
    encode_signal_event,
    recv_frames,
    result_status,
    send_frame,
)

__all__ = ["HypercallClient"]

_U64 = struct.Struct("<Q")


class HypercallClient:
    """A partition's side of the hypercall wire: blocking calls with timeouts.

    Owns the frame decoder of ``sock`` (the partition's socket to the
    supervisor).  Frames that are not the reply being waited for (memory
    notifications, runtime frames, late replies) are queued in
    ``unsolicited`` in arrival order; the partition's loop reads them with
    ``poll(timeout)``.  Not thread-safe: use it from one thread.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.decoder = FrameDecoder()
        self.unsolicited: deque[Frame] = deque()
        self._seq = 0
        self.calls = 0  # hypercalls this partition made
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._eof = False

    def _read_some(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout``); False on timeout."""
        if self._eof:
            raise ConnectionError("the supervisor closed the connection")
        if not self._poll.poll(max(0, int(timeout * 1000 + 0.999))):
            return False
        was_blocking = self.sock.getblocking()
        self.sock.setblocking(False)
        try:
            frames = recv_frames(self.sock, self.decoder)
        except BlockingIOError:
            return True
        finally:
            self.sock.setblocking(was_blocking)
        if frames is None:
            self._eof = True
            raise ConnectionError("the supervisor closed the connection")
        self.unsolicited.extend(frames)
        return True

    def call(
        self, code: int, inp: bytes, *, rep_count: int = 0, wait: bool = True
    ) -> tuple[HvStatus | int, bytes]:
        """Issue a hypercall; returns (status, output block) (see ``call_fds``)."""
        st, out, fds = self.call_fds(code, inp, rep_count=rep_count, wait=wait)
        for fd in fds:
            os.close(fd)
        return st, out

    def call_fds(
        self, code: int, inp: bytes, *, rep_count: int = 0, wait: bool = True
    ) -> tuple[HvStatus | int, bytes, list[int]]:
        """Issue a hypercall; returns (status, output block).

        With ``wait=False`` the supervisor replies only on failure (the reply
        then shows up in ``unsolicited``) and this returns (SUCCESS, b"")
        at once.  Raises TimeoutError if no reply comes within the timeout."""
        self._seq += 1
        self.calls += 1
        seq = self._seq
        body = _U64.pack(encode_control(code, rep_count=rep_count)) + inp
        flags = 0 if wait else FLAG_NO_REPLY_ON_SUCCESS
        send_frame(self.sock, Frame(FrameKind.HYPERCALL, seq, body, flags=flags))
        if not wait:
            return HvStatus.SUCCESS, b"", []
        deadline = time.monotonic() + self.timeout
        while True:
            for i, fr in enumerate(self.unsolicited):
                if fr.kind == FrameKind.REPLY and fr.seq == seq:
                    del self.unsolicited[i]
                    if len(fr.body) < 8:
                        raise WireError("reply without a result value")
                    (result,) = _U64.unpack_from(fr.body)
                    fds, fr.fds = fr.fds, []
                    return result_status(result), fr.body[8:], fds
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to hypercall {code:#x} within {self.timeout} s")
            self._read_some(left)

    def post_message(
        self, connection_id: int, message_type: int, payload: bytes, *, wait: bool = True
    ) -> HvStatus | int:
        inp = encode_post_message(connection_id, message_type, payload)
        return self.call(HypercallCode.POST_MESSAGE, inp, wait=wait)[0]

    def signal_event(
        self, connection_id: int, flag_number: int = 0, *, wait: bool = True
    ) -> HvStatus | int:
        inp = encode_signal_event(connection_id, flag_number)
        return self.call(HypercallCode.SIGNAL_EVENT, inp, wait=wait)[0]

    def share_pages(self, pfns: Sequence[int]) -> tuple[HvStatus | int, int]:
        st, out = self.call(HypercallCode.VIRIDIAN_SHARE_PAGES, encode_share_pages(pfns))
        gid = _U64.unpack(out)[0] if st == HvStatus.SUCCESS and len(out) == 8 else 0
        return st, gid

    def revoke_grant(self, grant_id: int) -> HvStatus | int:
        return self.call(HypercallCode.VIRIDIAN_REVOKE_GRANT, _U64.pack(grant_id))[0]

    def channel_doorbells(self, child: int, relid: int) -> tuple[HvStatus | int, list[int]]:
        """Root only: the two doorbell eventfds of a channel being opened
        (root's, child's); the caller owns them."""
        st, _out, fds = self.call_fds(HypercallCode.VIRIDIAN_CHANNEL_DOORBELLS,
                                      struct.pack("<II", child, relid))
        if st != HvStatus.SUCCESS or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return (st if st != HvStatus.SUCCESS else HvStatus.INVALID_PARAMETER), []
        return st, fds

    def memory_hot_add(self, child: int, nbytes: int) -> tuple[HvStatus | int, int, int]:
        """Root only: (status, first pfn, pages) of a new range for ``child``."""
        st, out = self.call(HypercallCode.VIRIDIAN_MEMORY_HOT_ADD,
                            struct.pack("<IIQ", child, 0, nbytes))
        if st != HvStatus.SUCCESS or len(out) != 16:
            return st, 0, 0
        start, count = struct.unpack("<QQ", out)
        return st, start, count

    def memory_balloon(self, child: int,
                       ranges: Sequence[tuple[int, int]]) -> tuple[HvStatus | int, int]:
        """Root only: take back ``ranges`` (pfn, pages) the child gave up."""
        inp = struct.pack("<II", child, len(ranges)) + b"".join(
            _U64.pack(p | n << 40) for p, n in ranges)
        st, out = self.call(HypercallCode.VIRIDIAN_MEMORY_BALLOON, inp)
        return st, (_U64.unpack(out)[0] if st == HvStatus.SUCCESS and len(out) == 8 else 0)

    def memory_unballoon(self, child: int,
                         max_pages: int) -> tuple[HvStatus | int, list[tuple[int, int]]]:
        """Root only: up to ``max_pages`` ballooned pages given back, as ranges."""
        st, out = self.call(HypercallCode.VIRIDIAN_MEMORY_UNBALLOON,
                            struct.pack("<IIQ", child, 0, max_pages))
        if st != HvStatus.SUCCESS or len(out) < 8:
            return st, []
        (n, _r) = struct.unpack_from("<II", out)
        words = struct.unpack_from(f"<{n}Q", out, 8) if len(out) == 8 + 8 * n else ()
        return st, [(w & (1 << 40) - 1, w >> 40) for w in words]

    def read_available(self, limit: int = 256) -> None:
        """Read every frame already waiting in the socket into ``unsolicited``
        (no waiting; at most ``limit`` reads)."""
        for _ in range(limit):
            if not self._read_some(0.0):
                return

    def poll(self, timeout: float) -> list[Frame]:
        """Frames other than awaited replies: those queued, else wait up to
        ``timeout`` for more."""
        if not self.unsolicited:
            deadline = time.monotonic() + timeout
            while not self.unsolicited:
                left = max(0.0, deadline - time.monotonic())
                # one read even when no time is left: poll(0) must not ignore
                # frames already waiting in the socket
                if not self._read_some(left) or left == 0.0:
                    break
        out = list(self.unsolicited)
        self.unsolicited.clear()
        return out

    def close(self) -> None:
        """Close fds of queued frames (the socket belongs to the caller)."""
        for fr in self.unsolicited:
            fr.close_fds()
        self.unsolicited.clear()
        self.decoder.close()
