"""Doorbells: the kernel-backed "interrupt" a ring end rings to wake its peer.

Layer: vmbus, over ``hv.eventfd.EventFd`` (the hypervisor's interrupt-line
primitive).  A ``Doorbell`` is an eventfd: a kernel-owned counter that any
process holding the fd can increment (``ring``) and its owner can wait on with
a timeout (``wait``).  It is passed between processes as an fd (over a Unix
socket or ``pass_fds``), never by a guessable name, and it counts, so a ring
that races with a wait is never lost: ``wait`` returns at once.

In VMBus terms, each channel end owns one doorbell (its interrupt) and holds
the peer's; the ring decides *whether* to ring (``vmbus.ring``), this module
only rings.
"""

from __future__ import annotations

from hv.eventfd import EventFd

__all__ = ["Doorbell"]


class Doorbell(EventFd):
    """An eventfd doorbell that counts its use.

    Args:
        fd: an existing eventfd to adopt (received from another process);
            None creates a new one.  The Doorbell owns the fd and closes it.
    """

    __slots__ = ("rings", "waits")

    def __init__(self, fd: int | None = None) -> None:
        super().__init__(fd)
        self.rings = 0  # times this process rang it
        self.waits = 0  # times this process blocked in wait()

    def ring(self) -> None:
        """Wake whoever waits on this doorbell (one eventfd write)."""
        self.signal()
        self.rings += 1

    def clear(self) -> bool:  # type: ignore[override]
        """Consume a pending ring without blocking; True if there was one."""
        return super().clear() > 0

    def wait(self, timeout: float) -> bool:
        """Block until rung or ``timeout`` seconds pass; True if it was rung.

        A ring that happened before the call (since the last wait) counts.
        """
        if self.clear():
            return True
        self.waits += 1
        return super().wait(timeout)

    def __repr__(self) -> str:
        return f"Doorbell(fd={self._fd})"
