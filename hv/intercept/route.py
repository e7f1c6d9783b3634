"""The supervisor's side of an I/O-port intercept (see hv.intercept).

Layer: hv (the supervisor's side).  Trust: it reads a child's slot once,
validates op, size and port, and forwards only ports the child's device
worker claimed; a worker's answer is copied back as three numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from . import (
    DONE,
    IN,
    IRQS,
    MASK,
    MAX_PORT_SPANS,
    OP,
    OUT,
    PORT,
    REQ,
    RESULT,
    SIZE,
    STATUS,
    STATUS_DONE,
    STATUS_NO_DEVICE,
    VALUE,
    Slot,
    clear,
    close_fds,
    new_eventfd,
    ring,
)

__all__ = ["InterceptRoute"]


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
    child_exit_fd: int = field(default_factory=new_eventfd)
    child_resume_fd: int = field(default_factory=new_eventfd)
    worker_request_fd: int = field(default_factory=new_eventfd)
    worker_done_fd: int = field(default_factory=new_eventfd)
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
        clear(self.child_exit_fd)
        w = self.child.w
        seq = w.load(REQ)
        if seq == self._child_seq or self._pending is not None:
            return  # spurious, or one already in flight (the child waits for it)
        op, port, size, value = w.load(OP), w.load(PORT), w.load(SIZE), w.load(VALUE)
        self._child_seq = seq
        self.traps += 1
        if op not in (IN, OUT) or size not in MASK or port not in self._claimed \
                or not self.worker_attached:
            self.unclaimed += 1
            self._answer(seq, MASK.get(size, 0xFFFFFFFF) if op == IN else 0, STATUS_NO_DEVICE)
            return
        ww = self.worker.w
        self._worker_seq = (self._worker_seq + 1) & 0xFFFFFFFF
        ww.store(OP, op)
        ww.store(PORT, port)
        ww.store(SIZE, size)
        ww.store(VALUE, value & MASK[size])
        ww.store(REQ, self._worker_seq)
        self._pending, self._size = seq, size
        self.forwarded += 1
        ring(self.worker_request_fd)

    def on_done(self) -> None:
        """The worker answered: copy the answer to the child and resume it."""
        clear(self.worker_done_fd)
        if self._pending is None or self.worker.w.load(DONE) != self._worker_seq:
            return
        ww = self.worker.w
        result, irqs = ww.load(RESULT), ww.load(IRQS)
        self.child.w.store(IRQS, irqs)
        seq, self._pending = self._pending, None
        self._answer(seq, result & MASK[self._size], STATUS_DONE)

    def worker_gone(self) -> None:
        """The root (and its worker) went away: answer what is pending as no device."""
        self.worker_attached = False
        if self._pending is not None:
            seq, self._pending = self._pending, None
            self._answer(seq, MASK[self._size], STATUS_NO_DEVICE)

    def _answer(self, seq: int, result: int, status: int) -> None:
        w = self.child.w
        w.store(RESULT, result)
        w.store(STATUS, status)
        w.store(DONE, seq)
        ring(self.child_resume_fd)

    def fds(self) -> Iterable[int]:
        return (self.child_exit_fd, self.worker_done_fd)

    def close(self) -> None:
        self.child.close()
        self.worker.close()
        close_fds(self.child_exit_fd, self.child_resume_fd, self.worker_request_fd,
                   self.worker_done_fd)
