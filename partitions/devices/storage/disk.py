"""Raw disk images on the host, and positioned vectored I/O into caller buffers.

Layer: partitions/devices/storage (host side, no guest state).  A disk image is a plain
sparse file whose size is a multiple of 512 bytes; ``open_image`` creates it on
first use (``ftruncate``: no blocks are allocated until written) and refuses one
whose size differs from what the caller configured, so a disk never silently
shrinks or grows under a guest.

``preadv_into`` / ``pwritev_from`` move bytes straight between the file and the
caller's buffers (for the device models: views of guest memory) with
``os.preadv`` / ``os.pwritev``: no intermediate copy, and short transfers are
resumed, so a caller sees all bytes or an exception.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SECTOR_SIZE",
    "DiskImage",
    "DiskImageError",
    "open_image",
    "pread_into",
    "preadv_into",
    "pwrite_from",
    "pwritev_from",
]

SECTOR_SIZE = 512
#: Linux accepts at most IOV_MAX (1024) buffers per preadv/pwritev call.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


class DiskImageError(ValueError):
    """An image that cannot be used as configured (size, type), or a transfer
    that ran past the end of the file."""


@dataclass(slots=True)
class DiskImage:
    """An open image: ``fd`` (read-write, close-on-exec) of ``size_bytes`` bytes."""

    path: Path
    fd: int
    size_bytes: int

    @property
    def sectors(self) -> int:
        return self.size_bytes // SECTOR_SIZE

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_image(path: str | os.PathLike[str], size_bytes: int, create: bool = True) -> DiskImage:
    """Open the image at ``path``, creating a sparse one of ``size_bytes`` if missing.

    Args:
        path: a regular file.
        size_bytes: the disk's size; a positive multiple of 512.
        create: create the file when it does not exist (otherwise that is an error).

    Raises:
        DiskImageError: a bad size, an existing file of another size, or not a
            regular file.
        FileNotFoundError: missing and ``create`` is false.
    """
    if size_bytes <= 0 or size_bytes % SECTOR_SIZE:
        raise DiskImageError(f"disk size {size_bytes} is not a positive multiple of 512")
    p = Path(path)
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        if not create:
            raise
        try:
            fd = os.open(p, flags | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size_bytes)  # sparse: a hole, no blocks yet
            return DiskImage(p, fd, size_bytes)
        except FileExistsError:  # created between our two opens: use it as found
            fd = os.open(p, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DiskImageError(f"{p} is not a regular file")
        if st.st_size != size_bytes:
            raise DiskImageError(
                f"{p} is {st.st_size} bytes, the disk is configured as {size_bytes}: "
                "refusing to resize an existing image")
    except BaseException:
        os.close(fd)
        raise
    return DiskImage(p, fd, size_bytes)


def _bytes_views(views: Sequence[memoryview]) -> list[memoryview]:
    out = []
    for v in views:
        b = v if v.format == "B" and v.ndim == 1 else memoryview(v).cast("B")
        if b.nbytes:
            out.append(b)
    return out


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes (what a short transfer moved)."""
    i = 0
    while i < len(views) and n >= views[i].nbytes:
        n -= views[i].nbytes
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def preadv_into(fd: int, offset: int, views: Sequence[memoryview]) -> int:
    """Fill ``views`` in order from ``fd`` at ``offset``; returns the byte count.

    Raises:
        DiskImageError: end of file before the views were full.
        OSError: from the kernel.
    """
    todo = _bytes_views(views)
    total = sum(v.nbytes for v in todo)
    while todo:
        n = os.preadv(fd, todo[:_IOV_MAX], offset)
        if n == 0:
            raise DiskImageError(f"end of file at offset {offset}")
        offset += n
        todo = _advance(todo, n)
    return total


def pwritev_from(fd: int, offset: int, views: Sequence[memoryview]) -> int:
    """Write ``views`` in order to ``fd`` at ``offset``; returns the byte count."""
    todo = _bytes_views(views)
    total = sum(v.nbytes for v in todo)
    while todo:
        n = os.pwritev(fd, todo[:_IOV_MAX], offset)
        if n == 0:  # pwritev never returns 0 for a non-empty buffer on a file; do not spin
            raise OSError(f"pwritev wrote nothing at offset {offset}")
        offset += n
        todo = _advance(todo, n)
    return total


def pread_into(fd: int, offset: int, view: memoryview) -> int:
    """``preadv_into`` with one buffer."""
    return preadv_into(fd, offset, (view,))


def pwrite_from(fd: int, offset: int, view: memoryview) -> int:
    """``pwritev_from`` with one buffer."""
    return pwritev_from(fd, offset, (view,))
