"""Fuzz the hypercall wire as a partition writes it: ``FrameDecoder.feed`` over
the bytes (and fds) of several ``recvmsg`` calls, split where the input says,
and every frame that decodes through ``HypercallRouter.handle_frame`` (each
hypercall's input block: HvPostMessage, HvSignalEvent, the Viridian memory
and grant calls) for a root and two children with stand-in SynICs and
memory.

Allowed: ``WireError`` (the supervisor then drops that partition).  Also
checked: every fd a partition sent is either in a frame or closed by the
decoder (no fd leaks, none closed twice); a reply decodes as a REPLY; the
router's SynIC posts are within the spec's limits.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from _fuzzlib import Reader, Writer, instrumented, main

with instrumented():
    from hv import abi, wire
    from hv import link as L
    from hv import router as R
    from hv.abi import HvStatus, HypercallCode
    from hv.memory import GrantError, MemoryLimitError
    from hv.memwire import GuestMemoryError
    from hv.wire import Frame, FrameKind

ROOT, CHILD1, CHILD2 = 0, 1, 2
CODES = [*HypercallCode, 0x0001, 0x8007]
FAILURES = [None, None, GrantError(HvStatus.ACCESS_DENIED, "not yours"),
            MemoryLimitError("limit"), GuestMemoryError("bad")]


class _Synic:
    def __init__(self) -> None:
        self.posts = 0
        self.signals = 0

    def post(self, sint: int, message_type: int, payload: bytes, origination_id: int,
             port: Any) -> HvStatus:
        assert 0 <= sint < 16 and 0 < message_type < 1 << 31 and len(payload) <= abi.MAX_PAYLOAD
        self.posts += 1
        return HvStatus.SUCCESS if self.posts % 17 else HvStatus.INSUFFICIENT_BUFFERS

    def signal_event(self, sint: int, flag: int) -> HvStatus:
        assert 0 <= sint < 16 and 0 <= flag < abi.FLAGS_PER_SINT
        self.signals += 1
        return HvStatus.SUCCESS


class _Memory:
    """A child's memory as the router uses it; failures are the input's choice."""

    maximum_bytes = 512 << 20
    assigned_bytes = 256 << 20

    def __init__(self, r: Reader) -> None:
        self.r = r
        self.grants = 0

    def _maybe_fail(self, *raises: type[Exception]) -> None:
        """Fail the way the real GuestMemory may (``raises``), if the input says so."""
        e = self.r.pick(FAILURES)
        if e is not None and isinstance(e, raises):
            raise e

    def _msg(self, pfn: int = 0x40000, n: int = 1) -> Any:
        seg = SimpleNamespace(gpa_pfn=pfn, npages=n)
        return SimpleNamespace(segments=[seg], frame=lambda: Frame(FrameKind.MEMORY, 0, b"m"))

    def share_with_root(self, caller: int, pfns: Any) -> Any:
        assert 1 <= len(pfns) <= abi.MAX_SHARE_PAGES
        self._maybe_fail(GrantError)
        self.grants += 1
        return SimpleNamespace(grant_id=self.grants,
                               frame=lambda: Frame(FrameKind.MEMORY, 0, b"g"))

    def revoke(self, grant_id: int) -> Frame | None:
        return Frame(FrameKind.MEMORY, 0, b"r")

    def hot_add(self, nbytes: int, align_bytes: int) -> Any:
        assert nbytes > 0 and nbytes % 4096 == 0
        self._maybe_fail(GuestMemoryError)
        return self._msg(n=nbytes // 4096)

    def balloon(self, ranges: Any) -> Any:
        assert 1 <= len(ranges) <= abi.MAX_MEMORY_RANGES
        self._maybe_fail(GuestMemoryError)
        return self._msg()

    def ballooned_runs(self, max_pages: int, max_ranges: int) -> list[tuple[int, int]]:
        assert max_pages >= 0
        return [(0x100 + 2 * i, 1) for i in range(min(max_pages, max_ranges, self.r.below(4)))]

    def unballoon(self, ranges: Any) -> Any:
        self._maybe_fail(GuestMemoryError)
        return self._msg()


def _router(r: Reader) -> R.HypercallRouter:
    router = R.HypercallRouter(ROOT)
    router.host_available = lambda: 8 << 30
    router.add_partition(ROOT, _Synic())
    router.add_partition(CHILD1, _Synic(), memory=_Memory(r))  # type: ignore[arg-type]
    router.add_partition(CHILD2, None, memory=_Memory(r))  # type: ignore[arg-type]
    MSG, EV = R.ConnectionKind.MESSAGE, R.ConnectionKind.EVENT
    router.add_connection(R.Connection(1, ROOT, MSG, frozenset({CHILD1, CHILD2})))
    router.add_connection(R.Connection(4, ROOT, MSG, frozenset({CHILD1})))
    router.add_connection(R.Connection(0x2001, CHILD1, MSG, frozenset({ROOT})))
    router.add_connection(R.Connection(0x10001, ROOT, EV, frozenset({CHILD1}), flag_base=1,
                                       flag_count=8))
    router.add_connection(R.Connection(0x10002, CHILD2, EV, frozenset({ROOT})))
    return router


def _pipe_fd() -> tuple[int, int]:
    """An fd to send, and its inode: a pipe's read end is one of a kind, so an
    fd number the code under test closed and the kernel reused is told apart."""
    rd, wr = os.pipe2(os.O_CLOEXEC)
    os.close(wr)
    return rd, os.fstat(rd).st_ino


def _gone(fd: int, ino: int) -> bool:
    try:
        return os.fstat(fd).st_ino != ino
    except OSError:
        return True


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    caller = r.pick([CHILD1, CHILD1, ROOT, CHILD2, 9])
    router = _router(r)
    dec = wire.FrameDecoder()
    sent: list[tuple[int, int]] = []  # (fd, inode) of every fd the partition sent
    try:
        for _ in range(8):
            if not r.left():
                break
            chunk = r.chunk(2000)
            new = [_pipe_fd() for _ in range(r.pick([0, 0, 0, 1, 2, 17]))]
            sent += new
            queued = [x for x in sent if x[0] in dec._fds]
            try:
                frames = dec.feed(chunk, [fd for fd, _ in new])
            except wire.WireError:
                frames = []
                assert not dec._fds
            # each fd is in a frame, still queued, or closed by the decoder
            taken = {fd for fr in frames for fd in fr.fds}
            for fd, ino in queued + new:
                assert fd in taken or fd in dec._fds or _gone(fd, ino), fd
            if dec._broken:
                break
            for fr in frames:
                ours = [x for x in new + queued if x[0] in fr.fds]
                _serve(router, caller, fr)
                assert all(_gone(fd, ino) for fd, ino in ours), "a partition's fd kept"
    finally:
        dec.close()
        for fd, ino in sent:
            if not _gone(fd, ino):
                os.close(fd)
        for _target, fr in router.take_outbox():
            fr.close_fds()


def _serve(router: R.HypercallRouter, caller: int, fr: Frame) -> None:
    if fr.kind == L.KIND_RUNTIME:
        L.decode_runtime(fr)  # the supervisor's other reader of partition frames
        fr.close_fds()
        return
    try:
        reply = router.handle_frame(caller, fr)
    except wire.WireError:
        fr.close_fds()
        return
    if reply is not None:
        # as the partition reads it (stand-ins for the fds riding along)
        back = wire.decode_frame(reply.encode(), [-1] * len(reply.fds))
        assert back.kind == FrameKind.REPLY and back.seq == fr.seq and len(back.body) >= 8
        assert isinstance(wire.result_status(int.from_bytes(back.body[:8], "little")), HvStatus)
        reply.close_fds()


def _frame(code: int, inp: bytes, seq: int = 1, reply: bool = True) -> bytes:
    return wire.encode_request(code, inp, seq=seq, reply=reply)


def seeds() -> Iterator[bytes]:
    requests = [
        wire.request_post_message(1, 1, b"\x0e" + bytes(39)),
        wire.request_post_message(4, 1, bytes(range(200)), seq=2),
        wire.request_signal_event(0x10001, 3),
        _frame(HypercallCode.VIRIDIAN_SHARE_PAGES, wire.encode_share_pages([0x100, 0x101, 0x102])),
        _frame(HypercallCode.VIRIDIAN_REVOKE_GRANT, struct.pack("<Q", 1)),
        _frame(HypercallCode.VIRIDIAN_MEMORY_HOT_ADD, struct.pack("<IIQ", CHILD1, 0, 128 << 20)),
        _frame(HypercallCode.VIRIDIAN_MEMORY_BALLOON,
               struct.pack("<IIQQ", CHILD1, 2, 0x100 | 4 << 40, 0x200 | 1 << 40)),
        _frame(HypercallCode.VIRIDIAN_MEMORY_UNBALLOON, struct.pack("<IIQ", CHILD1, 0, 100)),
        _frame(HypercallCode.VIRIDIAN_CHANNEL_DOORBELLS, struct.pack("<II", CHILD1, 1)),
        L.runtime_frame({"op": "hello", "guest_visible_bytes": 1 << 28}).encode(),
    ]
    for caller in (CHILD1, ROOT):
        for req in requests:
            w = Writer().pick([CHILD1, CHILD1, ROOT, CHILD2, 9], caller)
            yield w.chunk(req, 2000).below(6, 0).u8(0).u8(2).done()
    # several frames in one recvmsg, then one split across two with an fd
    both = requests[0] + requests[2]
    yield Writer().pick([CHILD1], CHILD1).chunk(both, 2000).below(6, 0).done()
    body = struct.pack("<Q", wire.encode_control(HypercallCode.POST_MESSAGE))
    with_fd = struct.pack("<IHBBQ", 16 + len(body), FrameKind.HYPERCALL, 1, 0, 5) + body
    w = Writer().below(5, 0).chunk(with_fd[:10], 2000).below(6, 0)
    yield w.chunk(with_fd[10:], 2000).below(6, 3).done()


if __name__ == "__main__":
    main(TestOneInput)
