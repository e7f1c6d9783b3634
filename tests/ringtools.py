"""Helpers shared by the ring tests (importable because conftest.py's folder is
on sys.path): raw control-page access, hand-forged packets, and a ring buffer
fenced by PROT_NONE guard pages so that any access outside it faults at once.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from vmbus.ring import IncomingRing, OutgoingRing

CONTROL = 4096
OFF_WRITE_INDEX = 0x0
OFF_READ_INDEX = 0x4
OFF_INTERRUPT_MASK = 0x8
OFF_PENDING_SEND_SZ = 0xC
OFF_FEATURE_BITS = 0x40


def u32(buf: object, off: int) -> int:
    return int(struct.unpack_from("<I", buf, off)[0])  # type: ignore[arg-type]


def put_u32(buf: object, off: int, value: int) -> None:
    struct.pack_into("<I", buf, off, value)  # type: ignore[arg-type]


def data(buf: object, off: int, n: int) -> bytes:
    """n bytes of the data area from offset off (no wrap)."""
    with memoryview(buf) as mv:  # type: ignore[arg-type]
        return bytes(mv[CONTROL + off : CONTROL + off + n])


def desc(ptype: int, offset8: int, len8: int, flags: int = 0, trans_id: int = 0) -> bytes:
    """A 16-byte descriptor, field order as in the spec's §2.1 table."""
    return struct.pack("<HHHHQ", ptype, offset8, len8, flags, trans_id)


def trailer(start: int) -> bytes:
    return struct.pack("<Q", start << 32)


def forge(buf: object, body: bytes, start: int = 0, *, publish: bool = True) -> int:
    """Copy hand-made packet bytes into the data area at ``start`` (wrapping),
    and publish write_index just after them; returns that index."""
    with memoryview(buf) as mv:  # type: ignore[arg-type]
        dsize = mv.nbytes - CONTROL
        for i, b in enumerate(body):
            mv[CONTROL + (start + i) % dsize] = b
    end = (start + len(body)) % dsize
    if publish:
        put_u32(buf, OFF_WRITE_INDEX, end)
    return end


def advance(out: OutgoingRing, inc: IncomingRing, to: int) -> None:
    """Move both (in-sync, empty) ends to data offset ``to`` with filler packets."""
    dsize = out.data_bytes
    while (pos := out.debug_info()["write_index"]) != to:
        step = (to - pos) % dsize
        step = min(step, dsize - 8) if step >= 24 else step + dsize // 2
        assert out.try_write(bytes(step - 24))
        assert inc.try_read() is not None
        assert inc.try_read() is None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@contextmanager
def guarded_buffer(nbytes: int) -> Iterator[memoryview]:
    """A writable, zeroed ``nbytes`` buffer with an inaccessible page on each
    side: the C core touching a byte outside it is a SIGSEGV, not silence."""
    page = mmap.PAGESIZE
    span = (nbytes + page - 1) // page * page
    mm = mmap.mmap(-1, span + 2 * page)
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor
    for addr in (base, base + page + span):
        if _libc.mprotect(addr, page, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
    outer = memoryview(mm)
    # Place the ring so it ends exactly at the upper guard page.
    view = outer[page + span - nbytes : page + span]
    try:
        yield view
    finally:
        view.release()
        outer.release()
        mm.close()
