"""The device worker's side of an I/O-port intercept (see hv.intercept).

Layer: hv (a partition's side: the root's device worker process).
"""

from __future__ import annotations

from collections.abc import Callable

from . import (
    DONE,
    IRQS,
    OP,
    PORT,
    REQ,
    RESULT,
    SIZE,
    STATUS,
    STATUS_DONE,
    VALUE,
    Slot,
    clear,
    close_fds,
    ring,
)

__all__ = ["InterceptServer"]


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
        clear(self.request_fd)
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
        ring(self.done_fd)
        return True

    def close(self) -> None:
        self.slot.close()
        close_fds(self.request_fd, self.done_fd)
