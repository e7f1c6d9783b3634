"""Cross-process atomic operations on 32-bit words of a shared mapping.

Layer: hv (private).  Pure Python cannot do an atomic read-modify-write or a
full memory barrier on shared memory, and ``struct.pack_into`` is not even a
single store (see shared/perf/ipc-baselines.md, pitfall 1).  The SynIC pages
need both: the supervisor sets event-flag bits while the partition clears
others in the same word, and the MessagePending / slot-free handshake is a
Dekker pattern (store one word, then load another) that needs a full barrier
on both sides.  This module gives exactly four operations, each on one
naturally aligned 32-bit word:

``load(off)``           one aligned 4-byte load (ctypes, never byte-wise)
``store(off, v)``       one aligned 4-byte store (ctypes, never byte-wise)
``set_bits(off, m)``    atomically ``word |= m``, with a full barrier
``clear_bits(off, m)``  atomically ``word &= ~m``, with a full barrier

Two backends with the same semantics (neither returns the old value, so the
protocols built on top never depend on it):

* ``libatomic`` (default): ``__atomic_fetch_or_4`` / ``__atomic_fetch_and_4``
  with ``__ATOMIC_SEQ_CST`` from the compiler runtime (libatomic.so.1, shipped
  with gcc, which building Viridian needs anyway), called through ctypes.
  On x86-64 these are ``lock or`` / ``lock and``: atomic and a full barrier.
* ``futex``: the kernel does the atomic op for us: ``FUTEX_WAKE_OP`` applies
  ``*uaddr2 = *uaddr2 OP oparg`` atomically (with full barriers) and wakes
  nobody when both wake counts are 0.  One syscall per bit, so slower, but it
  needs nothing beyond Linux.  Used when libatomic cannot be loaded, or when
  ``VIRIDIAN_ATOMICS=futex``.

Plain loads and stores rely on the hardware's ordering of aligned 4-byte
accesses (x86-64 TSO: stores are not reordered with stores, loads not with
loads).  Every place that needs store->load ordering uses ``set_bits`` or
``clear_bits`` instead, which are full barriers on both backends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Any

__all__ = ["BACKEND", "SharedWords", "available_backends"]

_SEQ_CST = 5  # __ATOMIC_SEQ_CST

# --- libatomic -----------------------------------------------------------------


def _load_libatomic() -> Any | None:
    # The soname first: find_library runs ldconfig (a process) in every partition.
    for name in ("libatomic.so.1", None):
        if name is None:
            name = ctypes.util.find_library("atomic")
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            fetch_or = lib.__atomic_fetch_or_4
            fetch_and = lib.__atomic_fetch_and_4
        except (OSError, AttributeError):
            continue
        for fn in (fetch_or, fetch_and):
            fn.restype = ctypes.c_uint32
            fn.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int)
        return lib
    return None


_LIBATOMIC = _load_libatomic()
# Module-level names: inside a class body ``lib.__atomic_x`` would be name-mangled.
_FETCH_OR = getattr(_LIBATOMIC, "__atomic_fetch_or_4", None)
_FETCH_AND = getattr(_LIBATOMIC, "__atomic_fetch_and_4", None)

# --- futex(FUTEX_WAKE_OP) ----------------------------------------------------------

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "ppc64le": 221, "s390x": 238}.get(
    platform.machine()
)
_FUTEX_WAKE_OP = 5
_FUTEX_OP_SET, _FUTEX_OP_OR, _FUTEX_OP_ANDN = 0, 2, 3
_FUTEX_OP_OPARG_SHIFT = 8  # oparg is a bit number: the kernel uses 1 << oparg
_FUTEX_OP_CMP_EQ = 0
_LIBC = ctypes.CDLL(None, use_errno=True)
_syscall = _LIBC.syscall
_syscall.restype = ctypes.c_long


def _futex_op(addr: int, op: int, oparg: int) -> None:
    encoded = ((op & 0xF) << 28) | (_FUTEX_OP_CMP_EQ << 24) | ((oparg & 0xFFF) << 12)
    # futex(uaddr, FUTEX_WAKE_OP, nr_wake=0, nr_wake2=0 (the timeout slot), uaddr2, op)
    rc = _syscall(
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(addr),
        ctypes.c_int(_FUTEX_WAKE_OP),
        ctypes.c_int(0),
        ctypes.c_void_p(0),
        ctypes.c_void_p(addr),
        ctypes.c_uint32(encoded),
    )
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"futex(FUTEX_WAKE_OP): {os.strerror(err)}")


def available_backends() -> list[str]:
    """The backends that work on this machine, best first."""
    out = []
    if _LIBATOMIC is not None:
        out.append("libatomic")
    if _SYS_FUTEX is not None:
        out.append("futex")
    return out


def _choose() -> str:
    wanted = os.environ.get("VIRIDIAN_ATOMICS", "").strip()
    have = available_backends()
    if wanted:
        if wanted not in have:
            raise RuntimeError(
                f"VIRIDIAN_ATOMICS={wanted!r} is not available here (available: {have or 'none'})"
            )
        return wanted
    if not have:
        raise RuntimeError(
            "no cross-process atomics: libatomic.so.1 is missing and this CPU has no known "
            "futex syscall number; install libatomic1 (it comes with gcc)"
        )
    return have[0]


BACKEND = _choose()


class SharedWords:
    """Atomic access to the aligned 32-bit words of a writable shared buffer.

    Holds a ctypes export of ``buffer`` while open: call ``close()`` before
    closing the mmap.  Offsets must be multiples of 4 inside the buffer
    (checked: a bad offset is a programming error, never data from a peer).
    """

    __slots__ = ("_addr", "_anchor", "_backend", "_nbytes", "_words")

    def __init__(self, buffer: Any, backend: str | None = None) -> None:
        backend = backend or BACKEND
        if backend not in available_backends():
            raise RuntimeError(f"atomics backend {backend!r} is not available here")
        self._backend = backend
        self._nbytes = len(buffer)
        self._anchor: Any = (ctypes.c_char * self._nbytes).from_buffer(buffer)
        self._addr = ctypes.addressof(self._anchor)
        self._words: dict[int, ctypes.c_uint32] = {}

    @property
    def backend(self) -> str:
        return self._backend

    def _word(self, off: int) -> ctypes.c_uint32:
        w = self._words.get(off)
        if w is None:
            if off < 0 or off % 4 or off + 4 > self._nbytes or self._anchor is None:
                raise ValueError(f"bad word offset {off}")
            w = ctypes.c_uint32.from_address(self._addr + off)
            self._words[off] = w
        return w

    def load(self, off: int) -> int:
        """One aligned 4-byte load."""
        return self._word(off).value

    def store(self, off: int, value: int) -> None:
        """One aligned 4-byte store (no barrier beyond the hardware's order)."""
        self._word(off).value = value

    def set_bits(self, off: int, mask: int) -> None:
        """Atomically ``word |= mask``; a full barrier."""
        self._word(off)  # bounds check
        mask &= 0xFFFFFFFF
        if self._backend == "libatomic":
            _FETCH_OR(self._addr + off, mask, _SEQ_CST)
            return
        if mask == 0:
            _futex_op(self._addr + off, _FUTEX_OP_OR, 0)  # still a full barrier
            return
        while mask:
            bit = (mask & -mask).bit_length() - 1
            _futex_op(
                self._addr + off, _FUTEX_OP_OR | _FUTEX_OP_OPARG_SHIFT, bit
            )
            mask &= mask - 1

    def clear_bits(self, off: int, mask: int) -> None:
        """Atomically ``word &= ~mask``; a full barrier."""
        self._word(off)
        mask &= 0xFFFFFFFF
        if self._backend == "libatomic":
            _FETCH_AND(self._addr + off, (~mask) & 0xFFFFFFFF, _SEQ_CST)
            return
        if mask == 0xFFFFFFFF:
            _futex_op(self._addr + off, _FUTEX_OP_SET, 0)
            return
        if mask == 0:
            _futex_op(self._addr + off, _FUTEX_OP_ANDN, 0)
            return
        while mask:
            bit = (mask & -mask).bit_length() - 1
            _futex_op(
                self._addr + off, _FUTEX_OP_ANDN | _FUTEX_OP_OPARG_SHIFT, bit
            )
            mask &= mask - 1

    def close(self) -> None:
        """Drop the export so the underlying mmap can be closed."""
        self._words.clear()
        self._anchor = None
        self._addr = 0
