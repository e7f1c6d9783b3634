"""I/O-port intercepts: a child's trapped port access, routed by the supervisor
to the device worker in the root that emulates it.

Layer: hv.  This is the *emulated-device* path of Hyper-V's design, built
for real: an unenlightened guest touches an I/O port; its virtual processor
stops ("intercept"); the hypervisor hands the access to the VM worker process
in the root, which emulates the device and answers; the hypervisor resumes
the virtual processor.  Four crossings per access:

    child ──exit──▶ supervisor ──request──▶ worker (root)
    child ◀─resume── supervisor ◀──done──── worker

Each link is one 64-byte slot in a shared memfd page plus two eventfds, with
the same spin-then-block waits channels use (so the comparison with VMBus
measures the architecture, not a slow transport): the requester writes the
access, then its sequence number; the responder answers, then its own
sequence number; each side rings the other's eventfd after its last store and
waits by spinning on the sequence word for ``SPIN_NS`` before blocking on its
eventfd.  Eventfds count, so a ring that races with a wait is never lost.

Slot layout (little-endian u32 words; one writer per word)::

    off field      written by
      0 req_seq    requester, last (after the fields below)
      4 done_seq   responder, last (after result/status/irq)
      8 op         requester: 1 IN, 2 OUT
     12 port       requester: 0..0xFFFF
     16 size       requester: 1, 2 or 4 bytes
     20 value      requester: the OUT value
     24 result     responder: the IN value
     28 status     responder: 0 done, 1 no device there (IN reads all ones)
     32 irqs       responder: interrupts the device raised so far (a counter)

Ordering: x86-64 TSO keeps stores in order and loads in order, so a reader
that sees the new sequence word sees the fields written before it; nothing
here needs store->load ordering across processes (the eventfd handshake
covers sleeping).  ``hv._atomic.SharedWords`` makes every access one aligned
4-byte load or store.

Trust: the supervisor reads a child's slot once, validates op, size and port,
and forwards only ports of the device that child has; anything else is
answered at once as "no device" (a floating bus).  A worker's answer is
copied back as three numbers; nothing else of the worker's page is read.
"""

from __future__ import annotations

import mmap
import os
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hv._atomic import SharedWords
from hv.abi import PAGE_SIZE
from hv.synic import sealed_memfd

__all__ = [
    "IN",
    "OP",
    "OUT",
    "PORT",
    "REQ",
    "SIZE",
    "SPIN_NS",
    "InterceptClient",
    "InterceptRoute",
    "InterceptServer",
    "Slot",
]

IN, OUT = 1, 2
REQ, DONE, OP, PORT, SIZE, VALUE, RESULT, STATUS, IRQS = range(0, 36, 4)
SLOT_BYTES = 64
SPIN_NS = 50_000  # spin before blocking, as a channel's reader does
STATUS_DONE, STATUS_NO_DEVICE = 0, 1
_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}
MAX_PORT_SPANS = 16  # (first, count) spans one worker may claim


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _ring(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # saturated: the waiter wakes anyway


def _clear(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Slot:
    """One link's slot over a memfd page (``fd`` is adopted: closed by ``close``)."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            # sealed: the child holds this fd and must not truncate it under the
            # supervisor's mapping (a SIGBUS there would take the supervisor down)
            fd = sealed_memfd(PAGE_SIZE, "viridian-intercept")
        elif os.fstat(fd).st_size < PAGE_SIZE:
            os.close(fd)
            raise ValueError("an intercept page must be 4096 bytes")
        self.fd = fd
        self.map = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED)
        self.w = SharedWords(self.map)

    def spin(self, word: int, want: int, spin_ns: int = SPIN_NS) -> bool:
        """Whether ``word`` holds ``want`` within ``spin_ns`` of polling (no
        system call)."""
        load = self.w.load
        if load(word) == want:
            return True
        end = time.perf_counter_ns() + spin_ns
        while time.perf_counter_ns() < end:
            if load(word) == want:
                return True
        return False

    def wait(self, word: int, want: int, efd: int, timeout: float, spin_ns: int = SPIN_NS) -> bool:
        """Until ``word`` holds ``want``: spin ``spin_ns``, then block on ``efd``."""
        if self.spin(word, want, spin_ns):
            return True
        load = self.w.load
        deadline = time.monotonic() + timeout
        p = select.poll()
        p.register(efd, select.POLLIN)
        while True:
            if load(word) == want:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            p.poll(max(1, int(left * 1000)))
            _clear(efd)

    def close(self) -> None:
        self.w.close()
        try:
            self.map.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class InterceptClient:
    """The child's side: every ``inb``/``outw``/... is one trapped access that
    stops this thread until the device answered (``TimeoutError`` after
    ``timeout`` s: nobody answered)."""

    def __init__(self, page_fd: int, exit_fd: int, resume_fd: int, timeout: float = 5.0) -> None:
        self.slot = Slot(page_fd)
        self.exit_fd, self.resume_fd = exit_fd, resume_fd
        self.timeout = timeout
        self.traps = 0
        self._seq = self.slot.w.load(REQ)

    def io(self, op: int, port: int, size: int, value: int = 0) -> int:
        w = self.slot.w
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        w.store(OP, op)
        w.store(PORT, port)
        w.store(SIZE, size)
        w.store(VALUE, value & _MASK[size])
        w.store(REQ, seq)  # last: the supervisor reads the fields after seeing it
        _ring(self.exit_fd)
        if not self.slot.wait(DONE, seq, self.resume_fd, self.timeout):
            raise TimeoutError(f"port {port:#x} access not answered within {self.timeout} s")
        self.traps += 1
        return w.load(RESULT) & _MASK[size]

    @property
    def irqs(self) -> int:
        """Interrupts the device raised so far (the driver compares counts)."""
        return self.slot.w.load(IRQS)

    def inb(self, port: int) -> int:
        return self.io(IN, port, 1)

    def inw(self, port: int) -> int:
        return self.io(IN, port, 2)

    def inl(self, port: int) -> int:
        return self.io(IN, port, 4)

    def outb(self, port: int, value: int) -> None:
        self.io(OUT, port, 1, value)

    def outw(self, port: int, value: int) -> None:
        self.io(OUT, port, 2, value)

    def outl(self, port: int, value: int) -> None:
        self.io(OUT, port, 4, value)

    def close(self) -> None:
        self.slot.close()
        _close_fds(self.exit_fd, self.resume_fd)


class InterceptServer:
    """The device worker's side: ``serve_one`` answers the access waiting in
    the slot with ``handler(op, port, size, value) -> (result, irq_raised)``."""

    def __init__(self, page_fd: int, request_fd: int, done_fd: int) -> None:
        self.slot = Slot(page_fd)
        self.request_fd, self.done_fd = request_fd, done_fd
        self._last = self.slot.w.load(REQ)
        self.irqs = self.slot.w.load(IRQS)
        self.served = 0

    def fileno(self) -> int:
        return self.request_fd

    def pending(self) -> bool:
        return self.slot.w.load(REQ) != self._last

    def spin(self) -> bool:
        """Whether an access comes within the spin (no system call: for a
        loop that does its own blocking)."""
        return self.slot.spin(REQ, (self._last + 1) & 0xFFFFFFFF)

    def wait(self, timeout: float) -> bool:
        """Until an access is pending (spin, then block); False on timeout."""
        _clear(self.request_fd)
        want = (self._last + 1) & 0xFFFFFFFF
        return self.slot.wait(REQ, want, self.request_fd, timeout)

    def serve_one(self, handler: Callable[[int, int, int, int], tuple[int, bool]]) -> bool:
        w = self.slot.w
        seq = w.load(REQ)
        if seq == self._last:
            return False
        op, port, size, value = w.load(OP), w.load(PORT), w.load(SIZE), w.load(VALUE)
        result, irq = handler(op, port, size, value)
        w.store(RESULT, result & 0xFFFFFFFF)
        w.store(STATUS, STATUS_DONE)
        if irq:
            self.irqs = (self.irqs + 1) & 0xFFFFFFFF
            w.store(IRQS, self.irqs)
        self._last = seq
        self.served += 1
        w.store(DONE, seq)  # last: the supervisor reads the answer after seeing it
        _ring(self.done_fd)
        return True

    def close(self) -> None:
        self.slot.close()
        _close_fds(self.request_fd, self.done_fd)


@dataclass
class InterceptRoute:
    """The supervisor's part for one child: the child's link, the worker's
    link, and which ports belong to the child's emulated device (the root
    names them when its worker attaches: ``claim``; hv knows no device).

    The supervisor watches ``child_exit_fd`` (call ``on_exit``) and
    ``worker_done_fd`` (call ``on_done``) in its loop.  Handles for the
    child: ``child_handles()``; for the worker (sent to the root, which
    starts the worker): ``worker_handles()``.  Both are kept here for the
    child's life, so a restarted root gets them again."""

    ports: list[tuple[int, int]] = field(default_factory=list)  # (first port, count)
    child: Slot = field(default_factory=Slot)
    worker: Slot = field(default_factory=Slot)
    child_exit_fd: int = field(default_factory=_eventfd)
    child_resume_fd: int = field(default_factory=_eventfd)
    worker_request_fd: int = field(default_factory=_eventfd)
    worker_done_fd: int = field(default_factory=_eventfd)
    worker_attached: bool = False
    traps: int = 0  # accesses the child made
    forwarded: int = 0  # ... that went to the worker
    unclaimed: int = 0  # ... to ports no device of this child has
    _child_seq: int = 0
    _worker_seq: int = 0
    _pending: int | None = None  # the child's seq being served by the worker
    _size: int = 1

    def __post_init__(self) -> None:
        self._claimed = frozenset(p for first, n in self.ports for p in range(first, first + n))
        self._child_seq = self.child.w.load(REQ)
        self._worker_seq = self.worker.w.load(REQ)

    def claim(self, ports: object) -> bool:
        """Route these ports (a list of [first, count], from the root) to the
        worker.  False, and nothing changed, for a malformed list."""
        if not isinstance(ports, (list, tuple)) or len(ports) > MAX_PORT_SPANS:
            return False
        spans = []
        for span in ports:
            if not isinstance(span, (list, tuple)) or len(span) != 2 \
                    or not all(type(x) is int for x in span):
                return False
            first, n = span
            if first < 0 or n < 1 or first + n > 0x10000:
                return False
            spans.append((first, n))
        self.ports = spans
        self._claimed = frozenset(p for first, n in spans for p in range(first, first + n))
        return True

    def child_handles(self) -> list[int]:
        return [self.child.fd, self.child_exit_fd, self.child_resume_fd]

    def worker_handles(self) -> list[int]:
        return [self.worker.fd, self.worker_request_fd, self.worker_done_fd]


    def on_exit(self) -> None:
        """The child trapped: answer at once or forward to the worker."""
        _clear(self.child_exit_fd)
        w = self.child.w
        seq = w.load(REQ)
        if seq == self._child_seq or self._pending is not None:
            return  # spurious, or one already in flight (the child waits for it)
        op, port, size, value = w.load(OP), w.load(PORT), w.load(SIZE), w.load(VALUE)
        self._child_seq = seq
        self.traps += 1
        if op not in (IN, OUT) or size not in _MASK or port not in self._claimed \
                or not self.worker_attached:
            self.unclaimed += 1
            self._answer(seq, _MASK.get(size, 0xFFFFFFFF) if op == IN else 0, STATUS_NO_DEVICE)
            return
        ww = self.worker.w
        self._worker_seq = (self._worker_seq + 1) & 0xFFFFFFFF
        ww.store(OP, op)
        ww.store(PORT, port)
        ww.store(SIZE, size)
        ww.store(VALUE, value & _MASK[size])
        ww.store(REQ, self._worker_seq)
        self._pending, self._size = seq, size
        self.forwarded += 1
        _ring(self.worker_request_fd)

    def on_done(self) -> None:
        """The worker answered: copy the answer to the child and resume it."""
        _clear(self.worker_done_fd)
        if self._pending is None or self.worker.w.load(DONE) != self._worker_seq:
            return
        ww = self.worker.w
        result, irqs = ww.load(RESULT), ww.load(IRQS)
        self.child.w.store(IRQS, irqs)
        seq, self._pending = self._pending, None
        self._answer(seq, result & _MASK[self._size], STATUS_DONE)

    def worker_gone(self) -> None:
        """The root (and its worker) went away: answer what is pending as no device."""
        self.worker_attached = False
        if self._pending is not None:
            seq, self._pending = self._pending, None
            self._answer(seq, _MASK[self._size], STATUS_NO_DEVICE)

    def _answer(self, seq: int, result: int, status: int) -> None:
        w = self.child.w
        w.store(RESULT, result)
        w.store(STATUS, status)
        w.store(DONE, seq)
        _ring(self.child_resume_fd)

    def fds(self) -> Iterable[int]:
        return (self.child_exit_fd, self.worker_done_fd)

    def close(self) -> None:
        self.child.close()
        self.worker.close()
        _close_fds(self.child_exit_fd, self.child_resume_fd, self.worker_request_fd,
                   self.worker_done_fd)
