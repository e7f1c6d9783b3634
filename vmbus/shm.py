"""Shared memory for rings as kernel-owned handles: memfds, not names.

Layer: vmbus.  ``SharedMemory.create`` makes an anonymous memfd of a given
size and maps it; the fd is what another process receives (``pass_fds``,
SCM_RIGHTS) and maps with ``SharedMemory.from_fd``.  Nothing appears in
/dev/shm and nothing outlives the last process holding the fd or a mapping,
kill -9 included.
"""

from __future__ import annotations

import mmap
import os

__all__ = ["SharedMemory"]


class SharedMemory:
    """A memfd and its shared mapping; owns both and closes both."""

    __slots__ = ("fd", "map", "nbytes")

    def __init__(self, fd: int, nbytes: int) -> None:
        self.fd = fd
        self.nbytes = nbytes
        self.map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def create(cls, nbytes: int, name: str = "viridian-ring") -> SharedMemory:
        """A new zero-filled memfd of ``nbytes`` (the name only labels it in
        /proc/PID/fd; it is not a global name)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            return cls(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, nbytes: int | None = None) -> SharedMemory:
        """Map a memfd received from another process (adopts the fd)."""
        if nbytes is None:
            nbytes = os.fstat(fd).st_size
        return cls(fd, nbytes)

    def close(self) -> None:
        """Unmap and close.  Close every ring attached to it first."""
        if self.map is not None:
            self.map.close()
            self.map = None  # type: ignore[assignment]
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
