"""Doorbells: the kernel-backed "interrupt" a ring end rings to wake its peer.

Layer: vmbus.  A ``Doorbell`` is an eventfd: a kernel-owned counter that any
process holding the fd can increment (``ring``) and its owner can wait on with
a timeout (``wait``).  It is passed between processes as an fd (over a Unix
socket or ``pass_fds``), never by a guessable name, and it counts, so a ring
that races with a wait is never lost: ``wait`` returns at once.

In VMBus terms, each channel end owns one doorbell (its interrupt) and holds
the peer's; the ring decides *whether* to ring (``vmbus.ring``), this module
only rings.
"""

from __future__ import annotations

import os
import select

__all__ = ["Doorbell"]


class Doorbell:
    """An eventfd doorbell.

    Args:
        fd: an existing eventfd to adopt (received from another process);
            None creates a new one.  The Doorbell owns the fd and closes it.
    """

    __slots__ = ("_fd", "_poll", "rings", "waits")

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            os.set_blocking(fd, False)
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self.rings = 0  # times this process rang it
        self.waits = 0  # times this process blocked in wait()

    def fileno(self) -> int:
        return self._fd

    def ring(self) -> None:
        """Wake whoever waits on this doorbell (one eventfd write)."""
        try:
            os.eventfd_write(self._fd, 1)
        except BlockingIOError:
            pass  # the counter is saturated: the waiter will wake anyway
        self.rings += 1

    def clear(self) -> bool:
        """Consume a pending ring without blocking; True if there was one."""
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            return False
        return True

    def wait(self, timeout: float) -> bool:
        """Block until rung or ``timeout`` seconds pass; True if it was rung.

        A ring that happened before the call (since the last wait) counts.
        """
        if self.clear():
            return True
        self.waits += 1
        ms = max(0, int(timeout * 1000.0 + 0.999))
        if not self._poll.poll(ms):
            return False
        return self.clear()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Doorbell(fd={self._fd})"
