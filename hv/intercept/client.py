"""The child's side of an I/O-port intercept (see hv.intercept).

Layer: hv (a partition's side: the child's virtual processor).
"""

from __future__ import annotations

from . import DONE, IN, IRQS, MASK, OP, OUT, PORT, REQ, RESULT, SIZE, VALUE, Slot, close_fds, ring

__all__ = ["InterceptClient"]


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
        w.store(VALUE, value & MASK[size])
        w.store(REQ, seq)  # last: the supervisor reads the fields after seeing it
        ring(self.exit_fd)
        if not self.slot.wait(DONE, seq, self.resume_fd, self.timeout):
            raise TimeoutError(f"port {port:#x} access not answered within {self.timeout} s")
        self.traps += 1
        return w.load(RESULT) & MASK[size]

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
        close_fds(self.exit_fd, self.resume_fd)
