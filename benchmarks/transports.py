"""The transports under test, and the worker processes that drive them.

Every benchmark runs between two worker processes started with
multiprocessing's "spawn" method (a fresh interpreter: no inherited pytest
heap), pinned with ``os.sched_setaffinity`` before anything else (so helper
threads such as mp.Queue's feeder or zmq's I/O thread inherit the pin), and
driven round by round over a control pipe by the parent (benchmarks/harness.py).

Every transport does the same work: the producer sends one prebuilt
``size``-byte ``bytes`` object again and again (the last one of a round
carries the round number in its first 8 bytes); the consumer copies every
message out of the transport into private memory (a new ``bytes`` object, or,
where stated, a preallocated buffer) and returns the last one's marker.  Before
the timed rounds every pair also runs a check round in which message i
carries i, and the consumer checks every message's length and number.

Waits: Viridian, faster-fifo, posix_ipc and zmq block with timeouts; the
busy-polling rings check a deadline while they spin.  The kernel transports
(mp.Queue, mp.Pipe, socketpair) block without one, because their timeout
variants cost an extra system call per message; for them the parent's round
deadline ends a stuck worker (it kills it), and every worker dies with its
parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

WAIT_S = 20.0  # no single wait inside a worker lasts longer
IDLE_EXIT_S = 900.0  # a ponger with no ping for this long gives up
FILL = b"\xab"
QUIT = b"QUITQUIT"  # 8-byte ping-pong message: the ponger exits


def message(size: int) -> bytes:
    return FILL * size


def marked(msg: bytes, value: int) -> bytes:
    """``msg`` with ``value`` in its first 8 bytes (little endian)."""
    return value.to_bytes(8, "little") + msg[8:]


def marker_of(m: Any) -> int:
    return int.from_bytes(bytes(m[:8]), "little")


def batch_k(size: int, ring_data: int) -> int:
    """Messages per batch call: at most 256 and at most 1/4 of the ring."""
    from vmbus.ring import packet_bytes

    return max(1, min(256, (ring_data // 4) // packet_bytes(size)))


class PassFd:
    """An fd handed to a spawned worker: multiprocessing's DupFd puts it in the
    child's pass_fds while the Process is being started (the way it passes
    sockets), so memfds and eventfds need no name."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        return (_rebuild_fd, (reduction.DupFd(self.fd),))


def _rebuild_fd(df: Any) -> int:
    return int(df.detach())


@dataclass
class Setup:
    """What the parent made for one worker pair."""

    a_args: Any  # producer / pinger / reader
    b_args: Any  # consumer / ponger
    after_ready: Callable[[], None] = lambda: None  # both workers attached
    cleanup: Callable[[], None] = lambda: None  # workers gone (always called)
    info: dict[str, Any] = field(default_factory=dict)


class Timeout(RuntimeError):
    pass


# ----------------------------------------------------------------------------
# Endpoint base classes.  ``send`` / ``recv`` are set per instance to the most
# direct callable the transport offers, so the generic loops below add no
# Python frame of their own.


class Producer:
    send: Callable[[Any], Any]

    def run(self, n: int, msg: bytes, last: bytes) -> None:
        send = self.send
        for _ in repeat(None, n - 1):
            send(msg)
        send(last)

    def run_check(self, msgs: list[bytes]) -> None:
        for m in msgs:
            self.send(m)

    def close(self) -> None:
        pass


class Consumer:
    recv: Callable[[], Any]

    def run(self, n: int) -> int:
        recv = self.recv
        m = b""
        for _ in repeat(None, n):
            m = recv()
        return marker_of(m)

    def run_check(self, n: int) -> list[bytes]:
        return [bytes(self.recv()) for _ in range(n)]

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------
# Viridian: the C ring through vmbus.ring, waits on eventfd doorbells.


def _viridian_setup(size: int, ring_data: int, opts: dict[str, Any]) -> Setup:
    from vmbus.doorbell import Doorbell
    from vmbus.ring import init_ring
    from vmbus.shm import SharedMemory

    nbytes = 4096 + ring_data
    shm = SharedMemory.create(nbytes, "viridian-bench")
    data_bell, space_bell = Doorbell(), Doorbell()
    init_ring(shm.map)
    args = (PassFd(shm.fd), nbytes, PassFd(data_bell.fileno()), PassFd(space_bell.fileno()))

    def cleanup() -> None:
        data_bell.close()
        space_bell.close()
        shm.close()

    return Setup(args, args, cleanup=cleanup)


class _ViridianEnd:
    def _attach(self, args: Any, outgoing: bool) -> None:
        from vmbus.doorbell import Doorbell
        from vmbus.ring import IncomingRing, OutgoingRing
        from vmbus.shm import SharedMemory

        fd, nbytes, data_fd, space_fd = args
        self.shm = SharedMemory.from_fd(fd, nbytes)
        self.data_bell, self.space_bell = Doorbell(data_fd), Doorbell(space_fd)
        if outgoing:
            self.ring = OutgoingRing(self.shm.map, on_signal=self.data_bell.ring)
        else:
            self.ring = IncomingRing(self.shm.map, on_signal=self.space_bell.ring)

    def stats(self) -> dict[str, int]:
        d = self.ring.debug_info()
        return {
            "signals": d["signals"],
            "signals_suppressed": d["signals_suppressed"],
            "full": d["full"],
            "doorbell_waits": self.data_bell.waits + self.space_bell.waits,
        }

    def close(self) -> None:
        self.ring.close()
        self.data_bell.close()
        self.space_bell.close()
        self.shm.close()


class ViridianPacketProducer(_ViridianEnd, Producer):
    """``try_write`` one packet per call; ``wait_writable`` when full."""

    def __init__(self, args: Any, size: int, opts: dict[str, Any]) -> None:
        from vmbus.ring import packet_bytes

        self._attach(args, outgoing=True)
        self.need = packet_bytes(size)

    def run(self, n: int, msg: bytes, last: bytes) -> None:
        tw, ww = self.ring.try_write, self.ring.wait_writable
        need, bell = self.need, self.space_bell
        for _ in repeat(None, n - 1):
            while not tw(msg):
                if not ww(need, bell, WAIT_S):
                    raise Timeout("no space in the ring")
        while not tw(last):
            if not ww(need, bell, WAIT_S):
                raise Timeout("no space in the ring")

    def run_check(self, msgs: list[bytes]) -> None:
        for m in msgs:
            while not self.ring.try_write(m):
                if not self.ring.wait_writable(self.need, self.space_bell, WAIT_S):
                    raise Timeout("no space in the ring")


class ViridianPacketConsumer(_ViridianEnd, Consumer):
    """One packet per call: ``try_read_payload`` (the payload as a new bytes);
    with ``packet_objects``, ``try_read`` and the Packet's ``payload``; with
    ``read_into`` (used for 64 KiB) the payload is copied straight into a
    preallocated bytearray instead."""

    def __init__(self, args: Any, size: int, opts: dict[str, Any]) -> None:
        self._attach(args, outgoing=False)
        self.buf = bytearray(size) if opts.get("read_into") else None
        self.packets = bool(opts.get("packet_objects"))

    def run(self, n: int) -> int:
        ring, bell = self.ring, self.data_bell
        wr = ring.wait_readable
        if self.buf is not None:
            buf = self.buf
            ri = ring.read_into
            for _ in repeat(None, n):
                while ri(buf) is None:
                    if not wr(bell, WAIT_S):
                        raise Timeout("no data in the ring")
            return marker_of(buf)
        m = b""
        if self.packets:
            tr = ring.try_read
            for _ in repeat(None, n):
                p = tr()
                while p is None:
                    if not wr(bell, WAIT_S):
                        raise Timeout("no data in the ring")
                    p = tr()
                m = p.payload
            return marker_of(m)
        trp = ring.try_read_payload
        for _ in repeat(None, n):
            m = trp()
            while m is None:
                if not wr(bell, WAIT_S):
                    raise Timeout("no data in the ring")
                m = trp()
        return marker_of(m)

    def run_check(self, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            if self.buf is not None:
                while (info := self.ring.read_into(self.buf)) is None:
                    if not self.ring.wait_readable(self.data_bell, WAIT_S):
                        raise Timeout("no data in the ring")
                out.append(bytes(self.buf[: info.payload_bytes]))
                continue
            while (p := self.ring.try_read()) is None:
                if not self.ring.wait_readable(self.data_bell, WAIT_S):
                    raise Timeout("no data in the ring")
            out.append(p.payload)
        return out


class ViridianBatchProducer(_ViridianEnd, Producer):
    """``write_many`` of k messages per call (one C call, one publication)."""

    def __init__(self, args: Any, size: int, opts: dict[str, Any]) -> None:
        from vmbus.ring import packet_bytes

        self._attach(args, outgoing=True)
        self.need = packet_bytes(size)
        self.k = opts["batch_k"]

    @classmethod
    def on_ring(cls, ring: Any, space_bell: Any, size: int, k: int) -> ViridianBatchProducer:
        """The same producer on a ring someone else owns (a VMBus channel's
        outgoing ring and its doorbell: benchmarks/channel_hook.py).  Its
        ``close`` must not be called (the ring is not its own)."""
        from vmbus.ring import packet_bytes

        self = cls.__new__(cls)
        self.ring, self.space_bell = ring, space_bell
        self.need, self.k = packet_bytes(size), k
        return self

    def _rest(self, items: list[bytes], w: int) -> None:
        wm, ww = self.ring.write_many, self.ring.wait_writable
        while w < len(items):
            items = items[w:]
            if not ww(self.need, self.space_bell, WAIT_S):
                raise Timeout("no space in the ring")
            w = wm(items)

    def run(self, n: int, msg: bytes, last: bytes) -> None:
        k = self.k
        chunk = [msg] * k
        full, rest = divmod(n, k)
        tail = [*chunk[: rest - 1], last] if rest else [*chunk[:-1], last]
        wm = self.ring.write_many
        for _ in repeat(None, full if rest else full - 1):
            w = wm(chunk)
            if w < k:
                self._rest(chunk, w)
        w = wm(tail)
        if w < len(tail):
            self._rest(tail, w)

    def run_check(self, msgs: list[bytes]) -> None:
        for i in range(0, len(msgs), self.k):
            chunk = msgs[i : i + self.k]
            self._rest(chunk, self.ring.write_many(chunk))


class ViridianBatchConsumer(_ViridianEnd, Consumer):
    """``drain(256)``: one C call copies up to 256 packets into a private
    ``bytes`` (the PacketBatch); payloads are not sliced into one object each.
    With ``read_into`` (64 KiB) it is ``drain_into``: the payloads go straight
    into a private 1 MiB bytearray, one copy each, as the C consumer does."""

    def __init__(self, args: Any, size: int, opts: dict[str, Any]) -> None:
        self._attach(args, outgoing=False)
        self.buf = bytearray(max(1 << 20, size)) if opts.get("read_into") else None

    def run(self, n: int) -> int:
        if self.buf is not None:
            return self._run_into(n)
        ring, bell = self.ring, self.data_bell
        dr, wr = ring.drain, ring.wait_readable
        got = 0
        b = None
        while got < n:
            b = dr(256)
            k = len(b)
            if not k:
                if not wr(bell, WAIT_S):
                    raise Timeout("no data in the ring")
                continue
            got += k
        if got != n or b is None:
            raise RuntimeError(f"drained {got} packets, expected {n}")
        return marker_of(b[-1].payload)

    def _run_into(self, n: int) -> int:
        ring, bell, buf = self.ring, self.data_bell, self.buf
        di, wr = ring.drain_into, ring.wait_readable
        got = 0
        infos: Any = ()
        while got < n:
            infos = di(buf)
            k = len(infos)
            if not k:
                if not wr(bell, WAIT_S):
                    raise Timeout("no data in the ring")
                continue
            got += k
        if got != n or not infos:
            raise RuntimeError(f"drained {got} packets, expected {n}")
        last = infos.payload_offsets()[-1]
        return marker_of(buf[last : last + infos[-1].payload_bytes])

    def run_check(self, n: int) -> list[bytes]:
        if self.buf is not None:
            out: list[bytes] = []
            while len(out) < n:
                infos = self.ring.drain_into(self.buf)
                if not infos:
                    if not self.ring.wait_readable(self.data_bell, WAIT_S):
                        raise Timeout("no data in the ring")
                    continue
                for off, i in zip(infos.payload_offsets(), infos, strict=True):
                    out.append(bytes(self.buf[off : off + i.payload_bytes]))
            return out
        out = []
        while len(out) < n:
            b = self.ring.drain(256)
            if not len(b):
                if not self.ring.wait_readable(self.data_bell, WAIT_S):
                    raise Timeout("no data in the ring")
                continue
            out.extend(b.payloads())
        return out


# ----------------------------------------------------------------------------
# The pure-Python shared-memory ring of shared/perf/ipc-baselines (shm_pyring),
# rebuilt: SPSC byte ring in multiprocessing.shared_memory, 8-byte record header
# (u32 length), records 8-aligned, head and tail u64s on separate cache lines,
# busy-poll on both sides.  Indices are read and written with
# ctypes.c_uint64.from_buffer(...).value: one aligned 8-byte load or store.
# (struct.pack_into must not be used for them: it zeroes the target before it
# writes, so the peer can see a torn or zero index.)

_U32 = struct.Struct("<I")
_PR_DATA = 128  # head u64 at 0, tail u64 at 64, data from 128


class PyRing:
    def __init__(self, name: str, cap: int) -> None:
        from multiprocessing import shared_memory

        self.shm = shared_memory.SharedMemory(name=name)
        self.cap = cap
        self.mask = cap - 1
        self.buf = self.shm.buf
        self.head = ctypes.c_uint64.from_buffer(self.buf, 0)
        self.tail = ctypes.c_uint64.from_buffer(self.buf, 64)
        self.local = 0  # producer: our head; consumer: our tail
        self.cached = 0  # producer: last tail seen; consumer: last head seen

    def send(self, msg: bytes) -> None:
        buf = self.buf
        n = len(msg)
        need = 8 + ((n + 7) & ~7)
        cap = self.cap
        head = self.local
        if cap - (head - self.cached) < need:
            tail = self.tail
            spins = 0
            deadline = 0.0
            while cap - (head - self.cached) < need:
                self.cached = tail.value
                spins += 1
                if not spins & 0xFFFFF:
                    now = time.monotonic()
                    if not deadline:
                        deadline = now + WAIT_S
                    elif now > deadline:
                        raise Timeout("pyring: no space")
        off = head & self.mask
        _U32.pack_into(buf, _PR_DATA + off, n)  # the record header, not an index
        o2 = (off + 8) & self.mask
        if o2 + n <= cap:
            buf[_PR_DATA + o2 : _PR_DATA + o2 + n] = msg
        else:
            first = cap - o2
            buf[_PR_DATA + o2 : _PR_DATA + cap] = msg[:first]
            buf[_PR_DATA : _PR_DATA + n - first] = msg[first:]
        head += need
        self.local = head
        self.head.value = head

    def recv(self) -> bytes:
        buf = self.buf
        tail = self.local
        if self.cached == tail:
            h = self.head
            spins = 0
            deadline = 0.0
            while self.cached == tail:
                self.cached = h.value
                spins += 1
                if not spins & 0xFFFFF:
                    now = time.monotonic()
                    if not deadline:
                        deadline = now + WAIT_S
                    elif now > deadline:
                        raise Timeout("pyring: no data")
        off = tail & self.mask
        n = _U32.unpack_from(buf, _PR_DATA + off)[0]
        o2 = (off + 8) & self.mask
        if o2 + n <= self.cap:
            m = buf[_PR_DATA + o2 : _PR_DATA + o2 + n].tobytes()
        else:
            first = self.cap - o2
            m = buf[_PR_DATA + o2 : _PR_DATA + self.cap].tobytes() + buf[
                _PR_DATA : _PR_DATA + n - first
            ].tobytes()
        tail += 8 + ((n + 7) & ~7)
        self.local = tail
        self.tail.value = tail
        return m

    def close(self) -> None:
        del self.head, self.tail
        self.buf = None
        self.shm.close()


def _pyring_setup(size: int, ring_data: int, opts: dict[str, Any]) -> Setup:
    from multiprocessing import shared_memory

    if ring_data & (ring_data - 1):
        raise ValueError("the pure-Python ring needs a power-of-two size")
    shm = shared_memory.SharedMemory(create=True, size=_PR_DATA + ring_data)
    shm.buf[:_PR_DATA] = bytes(_PR_DATA)
    args = (shm.name, ring_data)
    state = {"unlinked": False}

    def unlink() -> None:
        # Both workers have it mapped: the name is not needed any more.
        if not state["unlinked"]:
            state["unlinked"] = True
            shm.close()
            shm.unlink()

    return Setup(args, args, after_ready=unlink, cleanup=unlink)


class PyRingProducer(Producer):
    def __init__(self, args: Any, size: int, opts: dict[str, Any]) -> None:
        self.r = PyRing(*args)
        self.send = self.r.send

    def close(self) -> None:
        self.r.close()


class PyRingConsumer(Consumer):
    def __init__(self, args: Any, size: int, opts: dict[str, Any]) -> None:
        self.r = PyRing(*args)
        self.recv = self.r.recv

    def close(self) -> None:
        self.r.close()


# ----------------------------------------------------------------------------
# multiprocessing.Queue and multiprocessing.Pipe


def release_semaphores(*locks: Any) -> None:
    """Unlink multiprocessing's named semaphores (/dev/shm/sem.mp-*) now, by
    running their finalizers: with "spawn" a name is only needed until every
    child has opened it.  After that a name in /dev/shm is only a target for
    other processes' cleanups (a leak guard that unlinks it makes the
    finalizer fail later, at some garbage collection); a name that is already
    gone is not an error here."""
    from multiprocessing import resource_tracker, util
    from multiprocessing.synchronize import SemLock

    names = {getattr(lk._semlock, "name", None) for lk in locks if lk is not None} - {None}
    for f in list(util._finalizer_registry.values()):
        args = getattr(f, "_args", None)
        if getattr(f, "_callback", None) is SemLock._cleanup and args and args[0] in names:
            try:
                f()
            except FileNotFoundError:
                resource_tracker.unregister(args[0], "semaphore")


def _mpq_setup(size: int, ring_data: int, opts: dict[str, Any]) -> Setup:
    q = opts["ctx"].Queue(maxsize=1024)  # bounded, as in the baselines

    def unlink() -> None:
        release_semaphores(q._rlock, q._wlock, q._sem)

    def cleanup() -> None:
        unlink()
        q.close()
        q.join_thread()

    return Setup(q, q, after_ready=unlink, cleanup=cleanup, info={"maxsize": 1024})


class MpQueueProducer(Producer):
    def __init__(self, q: Any, size: int, opts: dict[str, Any]) -> None:
        self.q = q
        self.send = q.put

    def close(self) -> None:
        self.q.close()
        self.q.join_thread()


class MpQueueConsumer(Consumer):
    def __init__(self, q: Any, size: int, opts: dict[str, Any]) -> None:
        self.recv = q.get


def _mppipe_setup(size: int, ring_data: int, opts: dict[str, Any]) -> Setup:
    r, w = opts["ctx"].Pipe(duplex=False)

    def cleanup() -> None:
        r.close()
        w.close()

    return Setup(w, r, cleanup=cleanup)


class MpPipeProducer(Producer):
    def __init__(self, w: Any, size: int, opts: dict[str, Any]) -> None:
        self.w = w
        self.send = w.send_bytes

    def close(self) -> None:
        self.w.close()


class MpPipeConsumer(Consumer):
    def __init__(self, r: Any, size: int, opts: dict[str, Any]) -> None:
        self.r = r
        self.recv = r.recv_bytes

    def close(self) -> None:
        self.r.close()


# ----------------------------------------------------------------------------
# socketpair (AF_UNIX stream): a 4-byte length, then the payload; the reader
# goes through a 256 KiB buffered file, as in the baselines.


def _sock_setup(size: int, ring_data: int, opts: dict[str, Any]) -> Setup:
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def cleanup() -> None:
        a.close()
        b.close()

    return Setup(a, b, cleanup=cleanup)


class SocketProducer(Producer):
    def __init__(self, s: Any, size: int, opts: dict[str, Any]) -> None:
        self.s = s
        sendall, pack = s.sendall, _U32.pack

        def send(m: bytes) -> None:
            sendall(pack(len(m)) + m)

        self.send = send

    def close(self) -> None:
        self.s.close()


class SocketConsumer(Consumer):
    def __init__(self, s: Any, size: int, opts: dict[str, Any]) -> None:
        self.s = s
        self.f = s.makefile("rb", buffering=1 << 18)
        read, unpack = self.f.read, _U32.unpack

        def recv() -> bytes:
            n = unpack(read(4))[0]
            return read(n)

        self.recv = recv

    def close(self) -> None:
        self.f.close()
        self.s.close()


# ----------------------------------------------------------------------------
# POSIX message queue (posix_ipc): at most msg_max = 10 messages of at most
# msgsize_max = 8192 bytes here.  Unlinked as soon as both ends have it open.

_counter = [0]


def _unique(prefix: str) -> str:
    _counter[0] += 1
    return f"{prefix}-{os.getpid()}-{_counter[0]}"


def _mq_limit(name: str, default: int) -> int:
    try:
        with open(f"/proc/sys/fs/mqueue/{name}") as f:
            return int(f.read())
    except OSError:
        return default


def _mq_setup(size: int, ring_data: int, opts: dict[str, Any]) -> Setup:
    import posix_ipc

    depth = min(10, _mq_limit("msg_max", 10))
    name = "/" + _unique("viridian-bench-mq")
    mq = posix_ipc.MessageQueue(
        name, posix_ipc.O_CREX, max_messages=depth, max_message_size=size
    )
    mq.close()
    state = {"unlinked": False}

    def unlink() -> None:
        if not state["unlinked"]:
            state["unlinked"] = True
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_message_queue(name)

    return Setup(name, name, after_ready=unlink, cleanup=unlink, info={"max_messages": depth})


class MqProducer(Producer):
    def __init__(self, name: str, size: int, opts: dict[str, Any]) -> None:
        import posix_ipc

        self.mq = posix_ipc.MessageQueue(name)
        snd = self.mq.send

        def send(m: bytes) -> None:
            snd(m, WAIT_S)

        self.send = send

    def close(self) -> None:
        self.mq.close()


class MqConsumer(Consumer):
    def __init__(self, name: str, size: int, opts: dict[str, Any]) -> None:
        import posix_ipc

        self.mq = posix_ipc.MessageQueue(name)
        rcv = self.mq.receive

        def recv() -> bytes:
            return rcv(WAIT_S)[0]

        self.recv = recv

    def close(self) -> None:
        self.mq.close()


# ----------------------------------------------------------------------------
# faster-fifo: a C ring in shared memory with a process-shared mutex;
# put/get pickle the message.  Its default timeouts (10 s) apply.


def _ff_setup(size: int, ring_data: int, opts: dict[str, Any]) -> Setup:
    import faster_fifo

    q = faster_fifo.Queue(max_size_bytes=ring_data)
    return Setup(q, q, info={"max_size_bytes": ring_data})


class FasterFifoProducer(Producer):
    def __init__(self, q: Any, size: int, opts: dict[str, Any]) -> None:
        self.send = q.put


class FasterFifoConsumer(Consumer):
    def __init__(self, q: Any, size: int, opts: dict[str, Any]) -> None:
        self.recv = q.get


# ----------------------------------------------------------------------------
# pyzmq PUSH/PULL over ipc:// (default HWM 1000, copy=True).


def _zmq_setup(size: int, ring_data: int, opts: dict[str, Any]) -> Setup:
    d = tempfile.mkdtemp(prefix="viridian-bench-zmq-")
    path = "ipc://" + os.path.join(d, "s")
    return Setup(path, path, cleanup=lambda: shutil.rmtree(d, ignore_errors=True))


class ZmqProducer(Producer):
    def __init__(self, path: str, size: int, opts: dict[str, Any]) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.PUSH)
        self.s.setsockopt(zmq.SNDTIMEO, int(WAIT_S * 1000))
        self.s.connect(path)
        self.send = self.s.send

    def close(self) -> None:
        self.s.close(linger=0)
        self.ctx.term()


class ZmqConsumer(Consumer):
    def __init__(self, path: str, size: int, opts: dict[str, Any]) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.s = self.ctx.socket(zmq.PULL)
        self.s.setsockopt(zmq.RCVTIMEO, int(WAIT_S * 1000))
        self.s.bind(path)
        self.recv = self.s.recv

    def close(self) -> None:
        self.s.close(linger=0)
        self.ctx.term()


# ----------------------------------------------------------------------------
# iceoryx2 publish/subscribe, Slice[c_uint8], no overflow, RetryUntilDelivered,
# subscriber buffer 256 (the baselines' setup).  The producer loans a sample,
# memmoves the message in and sends; the consumer busy-polls receive() and
# copies the payload out with ctypes.string_at.


# Each pair runs iceoryx2 under a private prefix (its /dev/shm segments, the
# global management segment included, are named "<prefix>...") and a private
# root directory (its node and service files), both carrying this process's
# pid.  The pair's cleanup removes them whatever became of the workers (kill -9
# included); a later setup removes those of a benchmark run that was itself
# killed (its pid is gone).
IOX_SHM = "/dev/shm"
IOX_TAG = "vbiox"  # prefixes are "vbiox<pid>x<n>_"
IOX_ROOT = "viridian-bench-iox-"  # root dirs are tempdir/"viridian-bench-iox-<pid>-..."


def iox_remove(prefix: str, root: str) -> None:
    """Every trace of one iceoryx2 prefix and root directory."""
    with contextlib.suppress(OSError):
        for e in os.listdir(IOX_SHM):
            if e.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(IOX_SHM, e))
    shutil.rmtree(root, ignore_errors=True)


def iox_sweep_dead() -> list[str]:
    """Remove the iceoryx2 state of benchmark runs whose process is gone."""
    import psutil

    def dead(pid: str) -> bool:
        return pid.isdigit() and not psutil.pid_exists(int(pid))

    gone = []
    with contextlib.suppress(OSError):
        for e in os.listdir(IOX_SHM):
            if e.startswith(IOX_TAG) and dead(e[len(IOX_TAG):].split("x", 1)[0]):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(IOX_SHM, e))
                    gone.append(os.path.join(IOX_SHM, e))
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for e in os.listdir(tmp):
            if e.startswith(IOX_ROOT) and dead(e[len(IOX_ROOT):].split("-", 1)[0]):
                shutil.rmtree(os.path.join(tmp, e), ignore_errors=True)
                gone.append(os.path.join(tmp, e))
    return gone


def _iox_setup(size: int, ring_data: int, opts: dict[str, Any]) -> Setup:
    iox_sweep_dead()
    name = _unique("viridian-bench/iox").replace("-", "_")  # ..._<pid>_<n>
    prefix = f"{IOX_TAG}{os.getpid()}x{name.rsplit('_', 1)[1]}_"
    root = tempfile.mkdtemp(prefix=f"{IOX_ROOT}{os.getpid()}-")
    args = (name, prefix, root)
    return Setup(args, args, cleanup=lambda: iox_remove(prefix, root),
                 info={"subscriber_buffer": 256})


def _iox_service(args: tuple[str, str, str]) -> tuple[Any, Any, Any]:
    import iceoryx2 as iox2

    name, prefix, root = args
    iox2.set_log_level(iox2.LogLevel.Error)
    cfg = iox2.config.default()
    cfg.global_cfg.prefix = iox2.FileName.new(prefix)
    cfg.global_cfg.root_path = iox2.Path.new(root + "/")
    node = iox2.NodeBuilder.new().config(cfg).create(iox2.ServiceType.Ipc)
    svc = (
        node.service_builder(iox2.ServiceName.new(name))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .enable_safe_overflow(False)
        .subscriber_max_buffer_size(256)
        .history_size(0)
        .open_or_create()
    )
    return iox2, node, svc


class IoxProducer(Producer):
    """Created before the subscriber: with enable_safe_overflow(False) a
    subscriber created first is sometimes never connected (the samples are
    dropped; iceoryx2 issue #1697, seen here with 0.10), so the parent starts
    the producer first and the connection is made before the first round."""

    def __init__(self, args: Any, size: int, opts: dict[str, Any]) -> None:
        iox2, self.node, self.svc = _iox_service(args)
        self.pub = (
            self.svc.publisher_builder()
            .initial_max_slice_len(max(size, 64))
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        self.connected = False
        loan, memmove = self.pub.loan_slice_uninit, ctypes.memmove

        def send(m: bytes) -> None:
            s = loan(len(m))
            memmove(s.payload_ptr, m, len(m))
            s.assume_init().send()

        self.send = send

    def _connect(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.svc.dynamic_config.number_of_subscribers < 1:
            if time.monotonic() > deadline:
                raise Timeout("iceoryx2: no subscriber")
            time.sleep(0.001)
        self.pub.update_connections()
        self.connected = True

    def run(self, n: int, msg: bytes, last: bytes) -> None:
        if not self.connected:
            self._connect()
        super().run(n, msg, last)

    def run_check(self, msgs: list[bytes]) -> None:
        if not self.connected:
            self._connect()
        super().run_check(msgs)

    def close(self) -> None:
        self.pub.delete()
        self.node = None


class IoxConsumer(Consumer):
    def __init__(self, args: Any, size: int, opts: dict[str, Any]) -> None:
        _, self.node, self.svc = _iox_service(args)
        self.sub = self.svc.subscriber_builder().buffer_size(256).create()
        rcv, string_at = self.sub.receive, ctypes.string_at

        def recv() -> bytes:
            s = rcv()
            if s is None:
                spins = 0
                deadline = 0.0
                while s is None:
                    s = rcv()
                    spins += 1
                    if not spins & 0xFFFF:
                        now = time.monotonic()
                        if not deadline:
                            deadline = now + WAIT_S
                        elif now > deadline:
                            raise Timeout(
                                "iceoryx2: no data; has_samples="
                                f"{self.sub.has_samples()}, publishers="
                                f"{self.svc.dynamic_config.number_of_publishers}")
            m = string_at(s.payload_ptr, s.header.number_of_elements)
            s.delete()
            return m

        self.recv = recv

    def close(self) -> None:
        self.sub.delete()
        self.node = None


# ----------------------------------------------------------------------------
# The registry.  ``needs``: the optional module (the ``bench`` extra); the
# benchmark is skipped with a reason when it does not import.


@dataclass(frozen=True)
class Transport:
    key: str
    label: str
    setup: Callable[[int, int, dict[str, Any]], Setup]
    producer: type[Producer]
    consumer: type[Consumer]
    api: str
    needs: str | None = None
    max_size: int | None = None
    ring_bytes: bool = False  # a byte ring sized like the others
    producer_first: bool = False  # start the producer before the consumer


TRANSPORTS: dict[str, Transport] = {
    t.key: t
    for t in (
        Transport(
            "viridian-packet", "Viridian ring, per packet", _viridian_setup,
            ViridianPacketProducer, ViridianPacketConsumer,
            "try_write / try_read_payload() (read_into a preallocated buffer at 64 KiB)",
            ring_bytes=True,
        ),
        Transport(
            "viridian-packet-obj", "Viridian ring, per packet, Packet objects", _viridian_setup,
            ViridianPacketProducer, ViridianPacketConsumer,
            "try_write / try_read() -> Packet, .payload", ring_bytes=True,
        ),
        Transport(
            "viridian-batch", "Viridian ring, batch", _viridian_setup,
            ViridianBatchProducer, ViridianBatchConsumer,
            "write_many(k msgs) / drain(256) -> PacketBatch", ring_bytes=True,
        ),
        Transport(
            "pyring", "pure-Python shm ring", _pyring_setup, PyRingProducer, PyRingConsumer,
            "memoryview slice in / .tobytes() out, busy-poll", ring_bytes=True,
        ),
        Transport(
            "mp-queue", "multiprocessing.Queue", _mpq_setup, MpQueueProducer, MpQueueConsumer,
            "put / get (maxsize 1024)",
        ),
        Transport(
            "mp-pipe", "multiprocessing.Pipe", _mppipe_setup, MpPipeProducer, MpPipeConsumer,
            "send_bytes / recv_bytes",
        ),
        Transport(
            "socketpair", "socketpair (AF_UNIX)", _sock_setup, SocketProducer, SocketConsumer,
            "sendall(len+msg) / buffered read",
        ),
        Transport(
            "posix-mq", "posix_ipc MessageQueue", _mq_setup, MqProducer, MqConsumer,
            "send / receive (10 msgs deep)", needs="posix_ipc", max_size=8192,
        ),
        Transport(
            "faster-fifo", "faster-fifo", _ff_setup, FasterFifoProducer, FasterFifoConsumer,
            "put / get", needs="faster_fifo", ring_bytes=True,
        ),
        Transport(
            "zmq", "pyzmq PUSH/PULL ipc://", _zmq_setup, ZmqProducer, ZmqConsumer,
            "send / recv (copy=True)", needs="zmq",
        ),
        Transport(
            "iceoryx2", "iceoryx2 pub/sub", _iox_setup, IoxProducer, IoxConsumer,
            "loan+memmove+send / busy-poll receive + string_at", needs="iceoryx2",
            producer_first=True,
        ),
    )
}


# ----------------------------------------------------------------------------
# Viridian ping-pong (latency) and the idle reader.


def viridian_pingpong_setup(ring_data: int) -> Setup:
    from vmbus.doorbell import Doorbell
    from vmbus.ring import init_ring
    from vmbus.shm import SharedMemory

    nbytes = 4096 + ring_data
    ab = SharedMemory.create(nbytes, "viridian-bench-ping")
    ba = SharedMemory.create(nbytes, "viridian-bench-pong")
    init_ring(ab.map)
    init_ring(ba.map)
    bell_b, bell_a = Doorbell(), Doorbell()  # the ponger waits on b, the pinger on a
    a_args = (PassFd(ab.fd), PassFd(ba.fd), nbytes, PassFd(bell_a.fileno()),
              PassFd(bell_b.fileno()))
    b_args = (PassFd(ba.fd), PassFd(ab.fd), nbytes, PassFd(bell_b.fileno()),
              PassFd(bell_a.fileno()))

    def cleanup() -> None:
        for x in (bell_a, bell_b, ab, ba):
            x.close()

    return Setup(a_args, b_args, cleanup=cleanup)


class ViridianPingEnd:
    """One end of a ping-pong: writes on one ring, reads the other.  Pings are
    ``size`` bytes (64 B in bench_latency; bench_channels also uses 1 KiB).
    ``calls``, how a round trip is made:

    * ``"read"``: ``try_write``, then ``read`` (a Packet; its ``.payload``);
    * ``"read_payload"``: ``try_write``, then ``read_payload`` (the bytes);
    * ``"exchange"``: ``IncomingRing.exchange`` (the request/answer call:
      both in one C call while the peer polls)."""

    CALLS = ("read", "read_payload", "exchange")

    def __init__(self, args: Any, spin_ns: int | None, size: int = 64,
                 calls: str = "read") -> None:
        from vmbus.doorbell import Doorbell
        from vmbus.ring import IncomingRing, OutgoingRing
        from vmbus.shm import SharedMemory

        if calls not in self.CALLS:
            raise ValueError(f"calls: one of {self.CALLS}, not {calls!r}")
        out_fd, in_fd, nbytes, my_fd, peer_fd = args
        self.out_shm = SharedMemory.from_fd(out_fd, nbytes)
        self.in_shm = SharedMemory.from_fd(in_fd, nbytes)
        self.bell, self.peer = Doorbell(my_fd), Doorbell(peer_fd)
        self.out = OutgoingRing(self.out_shm.map, on_signal=self.peer.ring)
        self.inc = IncomingRing(self.in_shm.map, on_signal=self.peer.ring)
        self.inc.bind_reply_ring(self.out)
        self.spin_ns = spin_ns
        self.size = size
        self.calls = calls

    def _reader(self) -> tuple[Callable[..., Any], int]:
        """``IncomingRing.read`` (or ``read_payload``), the blocking read (its
        spin is one C call that polls and copies one packet out), and its
        spin: called as ``rd(bell, WAIT_S, spin_ns=spin)`` in the loops, not
        through a wrapper (a lambda's frame is ~40 ns a side, ``**kw`` ~80)."""
        from vmbus.ring import DEFAULT_SPIN_NS

        rd = self.inc.read if self.calls == "read" else self.inc.read_payload
        return rd, DEFAULT_SPIN_NS if self.spin_ns is None else self.spin_ns

    def pings(self, k: int, w: int) -> list[int]:
        """w unrecorded round trips, then k timed ones (ns each): try_write,
        then the blocking read of the answer (or the two as one exchange)."""
        if self.calls == "exchange":
            return self._exchange_pings(k, w)
        msg = b"\x01" * self.size
        tw = self.out.try_write
        rd, spin = self._reader()
        bell = self.bell
        pc = time.perf_counter_ns
        lat: list[int] = []
        app = lat.append
        po = self.calls != "read"
        for _ in range(w + k):
            t0 = pc()
            if not tw(msg):
                raise RuntimeError("ping ring full")
            p = rd(bell, WAIT_S, spin_ns=spin)
            if p is None:
                raise Timeout("no pong")
            m = p if po else p.payload
            t1 = pc()
            app(t1 - t0)
        if len(m) != self.size:
            raise RuntimeError("bad pong")
        return lat[w:]

    def _exchange_pings(self, k: int, w: int) -> list[int]:
        msg = b"\x01" * self.size
        ex = self.inc.exchange
        _, spin = self._reader()
        if self.spin_ns is not None:  # (a keyword costs ~10 ns a call: only when set)
            ex = functools.partial(ex, spin_ns=spin)
        bell = self.bell
        pc = time.perf_counter_ns
        lat: list[int] = []
        app = lat.append
        for _ in range(w + k):
            t0 = pc()
            m = ex(msg, bell, WAIT_S)
            t1 = pc()
            if m is None:
                raise Timeout("no pong")
            app(t1 - t0)
        if m != msg:
            raise RuntimeError("bad pong")
        return lat[w:]

    def pong_forever(self) -> None:
        tw = self.out.try_write
        rd, spin = self._reader()
        bell = self.bell
        size = self.size
        timeouts = 0  # waits that timed out (WAIT_S each) over the ponger's life
        po = self.calls != "read"
        ex = self.inc.exchange if self.calls == "exchange" else None
        if ex is not None and self.spin_ns is not None:
            ex = functools.partial(ex, spin_ns=spin)
        while True:
            p = rd(bell, WAIT_S, spin_ns=spin)
            while p is None:
                timeouts += 1
                if timeouts * WAIT_S > IDLE_EXIT_S:
                    return
                p = rd(bell, WAIT_S, spin_ns=spin)
            m = p if po else p.payload
            if len(m) != size:
                return  # QUIT
            if ex is not None:  # the pong, then the next ping, in one call
                while (m := ex(m, bell, WAIT_S)) is not None and len(m) == size:
                    pass
                if m is not None:
                    return  # QUIT
                timeouts += 1  # (no ping within WAIT_S: wait as above)
                continue
            if not tw(m):
                raise RuntimeError("pong ring full")

    def quit_peer(self) -> None:
        self.out.try_write(QUIT)

    def stats(self) -> dict[str, int]:
        return {"doorbell_waits": self.bell.waits, "doorbell_rings": self.peer.rings}

    def close(self) -> None:
        self.out.close()
        self.inc.close()
        for x in (self.bell, self.peer, self.out_shm, self.in_shm):
            x.close()


def idle_setup(ring_data: int) -> tuple[Setup, Any]:
    """The idle reader's ring, plus a writer the parent keeps to wake it."""
    from vmbus.doorbell import Doorbell
    from vmbus.ring import OutgoingRing, init_ring
    from vmbus.shm import SharedMemory

    nbytes = 4096 + ring_data
    shm = SharedMemory.create(nbytes, "viridian-bench-idle")
    init_ring(shm.map)
    bell, space = Doorbell(), Doorbell()
    writer = OutgoingRing(shm.map, on_signal=bell.ring)
    args = (PassFd(shm.fd), nbytes, PassFd(bell.fileno()), PassFd(space.fileno()))

    def cleanup() -> None:
        writer.close()
        for x in (bell, space, shm):
            x.close()

    return Setup(args, None, cleanup=cleanup), writer


class IdleReader(_ViridianEnd):
    def __init__(self, args: Any) -> None:
        self._attach(args, outgoing=False)


# ----------------------------------------------------------------------------
# The worker process.


def _cpu_now() -> int:
    try:
        import psutil

        return int(psutil.Process().cpu_num())
    except Exception:  # pragma: no cover - diagnostics only
        return -1


def worker_main(role: str, key: str, size: int, cpu: int | None, conn: Any, args: Any,
                opts: dict[str, Any]) -> None:
    """Entry point of every Python worker process (multiprocessing spawn)."""
    ep: Any = None
    try:
        from hv.proc import die_with_parent

        die_with_parent()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # before any helper thread exists
        if role in ("producer", "consumer"):
            t = TRANSPORTS[key]
            ep = (t.producer if role == "producer" else t.consumer)(args, size, opts)
        elif role in ("pinger", "ponger"):
            ep = ViridianPingEnd(args, opts.get("spin_ns"), size or 64,
                                 opts.get("calls", "read"))
        elif role == "idle":
            ep = IdleReader(args)
        else:
            raise ValueError(role)
        conn.send(("ready", {"affinity": sorted(os.sched_getaffinity(0)), "cpu": _cpu_now(),
                             "pid": os.getpid()}))
        if role == "ponger":
            ep.pong_forever()
            return
        msg = message(size)
        while True:
            if not conn.poll(IDLE_EXIT_S):
                return
            cmd = conn.recv()
            op = cmd[0]
            if op == "quit":
                if role == "pinger":
                    ep.quit_peer()
                conn.send(("bye", {"cpu": _cpu_now(), **_stats(ep)}))
                return
            if op == "round" and role == "producer":
                _, n, rid = cmd
                ep.run(n, msg, marked(msg, rid))
                conn.send(("sent", n))
            elif op == "round" and role == "consumer":
                _, n, rid = cmd
                t0 = time.perf_counter()
                marker = ep.run(n)
                conn.send(("done", {"n": n, "marker": marker,
                                    "secs": time.perf_counter() - t0}))
            elif op == "check" and role == "producer":
                ep.run_check([marked(msg, i) for i in range(cmd[1])])
                conn.send(("sent", cmd[1]))
            elif op == "check" and role == "consumer":
                got = ep.run_check(cmd[1])
                bad = sum(1 for i, m in enumerate(got) if len(m) != size or marker_of(m) != i)
                conn.send(("checked", {"n": len(got), "bad": bad}))
            elif op == "pings":
                conn.send(("lat", ep.pings(cmd[1], cmd[2])))
            elif op == "idle" or op == "wake":
                t_cpu, t0 = time.process_time(), time.monotonic()
                conn.send(("waiting", None))
                ok = ep.ring.wait_readable(ep.data_bell, cmd[1])
                wall = time.monotonic() - t0
                p = ep.ring.try_read() if ok else None
                conn.send((op + "_done", {"woke": ok, "wall": wall,
                                          "cpu": time.process_time() - t_cpu,
                                          "payload": len(p.payload) if p else 0}))
            else:
                raise ValueError(f"{role} got {cmd!r}")
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{role} ({key}, {size} B):\n{traceback.format_exc()}"))
        sys.exit(1)
    finally:
        if ep is not None:
            with contextlib.suppress(Exception):
                ep.close()


def _stats(ep: Any) -> dict[str, Any]:
    try:
        return dict(ep.stats())
    except Exception:
        return {}
