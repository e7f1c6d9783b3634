"""EventFd: the kernel-owned counter the hypervisor uses as an interrupt line.

Layer: hv.  An eventfd is a counter in the kernel; any process holding the fd
can add to it (``signal``) and a process can wait on it with a timeout
(``wait``).  It travels between processes only as an fd (SCM_RIGHTS over a
Unix socket, or ``pass_fds``), never by a name, and nothing of it survives the
last process that holds it, kill -9 included.  A signal that races with a wait
is never lost: the counter stays non-zero and the next ``wait`` returns at once.

The supervisor uses one per partition as the SynIC interrupt (supervisor ->
partition: "a message or an event flag is waiting") and one as the
end-of-message register (partition -> supervisor: "I freed a slot that had
MessagePending set"); see ``hv.synic``.  ``vmbus.doorbell.Doorbell`` builds on
this class one layer up (the ring's doorbells).
"""

from __future__ import annotations

import os
import select

__all__ = ["EventFd"]


class EventFd:
    """A non-blocking eventfd, owned (closed) by this object.

    Args:
        fd: an existing eventfd to adopt (e.g. received from another
            process); None creates a new one (close-on-exec).
    """

    __slots__ = ("_fd", "_poll")

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            os.set_blocking(fd, False)
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def fileno(self) -> int:
        """The fd (for selectors and for passing to another process)."""
        if self._fd < 0:
            raise ValueError("EventFd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def signal(self) -> None:
        """Add one to the counter: wakes whoever waits (one write syscall)."""
        try:
            os.eventfd_write(self._fd, 1)
        except BlockingIOError:
            pass  # counter saturated: the waiter wakes anyway

    def clear(self) -> int:
        """Read and reset the counter without blocking; returns it (0: none)."""
        try:
            return os.eventfd_read(self._fd)
        except BlockingIOError:
            return 0

    def wait(self, timeout: float) -> bool:
        """Block until signalled or ``timeout`` seconds pass; True if signalled.

        Consumes the signal(s).  A signal sent before the call counts.
        """
        if self.clear():
            return True
        ms = max(0, int(timeout * 1000.0 + 0.999))
        if not self._poll.poll(ms):
            return False
        return self.clear() > 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventFd(fd={self._fd})"
