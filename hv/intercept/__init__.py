"""I/O-port intercepts: a child's trapped port access, routed by the supervisor
to the device worker in the root that emulates it.

Layer: hv.  The package is the link both ends share (the slot layout, its
waits, the eventfd helpers, here) and one module per process: ``client``
(the child's side), ``server`` (the device worker's, in the root), ``route``
(the supervisor's).  This is the *emulated-device* path of Hyper-V's design, built
for real: an unenlightened guest touches an I/O port; its virtual processor
stops ("intercept"); the hypervisor hands the access to the VM worker process
in the root, which emulates the device and answers; the hypervisor resumes
the virtual processor.  Four crossings per access:

    child ──exit──▶ supervisor ──request──▶ worker (root)
    child ◀─resume── supervisor ◀──done──── worker

Each link is one 64-byte slot in a shared memfd page plus two eventfds, with
the same spin-then-block waits channels use (so the comparison with VMBus
measures the architecture, not a slow transport): the requester writes the
access, then its sequence number; the responder answers, then its own
sequence number; each side rings the other's eventfd after its last store and
waits by spinning on the sequence word for ``SPIN_NS`` before blocking on its
eventfd.  Eventfds count, so a ring that races with a wait is never lost.

Slot layout (little-endian u32 words; one writer per word)::

    off field      written by
      0 req_seq    requester, last (after the fields below)
      4 done_seq   responder, last (after result/status/irq)
      8 op         requester: 1 IN, 2 OUT
     12 port       requester: 0..0xFFFF
     16 size       requester: 1, 2 or 4 bytes
     20 value      requester: the OUT value
     24 result     responder: the IN value
     28 status     responder: 0 done, 1 no device there (IN reads all ones)
     32 irqs       responder: interrupts the device raised so far (a counter)

Ordering: x86-64 TSO keeps stores in order and loads in order, so a reader
that sees the new sequence word sees the fields written before it; nothing
here needs store->load ordering across processes (the eventfd handshake
covers sleeping).  ``hv._atomic.SharedWords`` makes every access one aligned
4-byte load or store.

Trust: the supervisor reads a child's slot once, validates op, size and port,
and forwards only ports of the device that child has; anything else is
answered at once as "no device" (a floating bus).  A worker's answer is
copied back as three numbers; nothing else of the worker's page is read.
"""

from __future__ import annotations

import mmap
import os
import select
import time

from hv._atomic import SharedWords
from hv.abi import PAGE_SIZE
from hv.synic import sealed_memfd

__all__ = [
    "DONE",
    "IN",
    "IRQS",
    "MASK",
    "MAX_PORT_SPANS",
    "OP",
    "OUT",
    "PORT",
    "REQ",
    "RESULT",
    "SIZE",
    "SLOT_BYTES",
    "SPIN_NS",
    "STATUS",
    "STATUS_DONE",
    "STATUS_NO_DEVICE",
    "VALUE",
    "Slot",
    "clear",
    "close_fds",
    "new_eventfd",
    "ring",
]

IN, OUT = 1, 2
REQ, DONE, OP, PORT, SIZE, VALUE, RESULT, STATUS, IRQS = range(0, 36, 4)
SLOT_BYTES = 64
SPIN_NS = 50_000  # spin before blocking, as a channel's reader does
STATUS_DONE, STATUS_NO_DEVICE = 0, 1
MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}
MAX_PORT_SPANS = 16  # (first, count) spans one worker may claim


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def ring(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # saturated: the waiter wakes anyway


def clear(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Slot:
    """One link's slot over a memfd page (``fd`` is adopted: closed by ``close``)."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            # sealed: the child holds this fd and must not truncate it under the
            # supervisor's mapping (a SIGBUS there would take the supervisor down)
            fd = sealed_memfd(PAGE_SIZE, "viridian-intercept")
        elif os.fstat(fd).st_size < PAGE_SIZE:
            os.close(fd)
            raise ValueError("an intercept page must be 4096 bytes")
        self.fd = fd
        self.map = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED)
        self.w = SharedWords(self.map)

    def spin(self, word: int, want: int, spin_ns: int = SPIN_NS) -> bool:
        """Whether ``word`` holds ``want`` within ``spin_ns`` of polling (no
        system call)."""
        load = self.w.load
        if load(word) == want:
            return True
        end = time.perf_counter_ns() + spin_ns
        while time.perf_counter_ns() < end:
            if load(word) == want:
                return True
        return False

    def wait(self, word: int, want: int, efd: int, timeout: float, spin_ns: int = SPIN_NS) -> bool:
        """Until ``word`` holds ``want``: spin ``spin_ns``, then block on ``efd``."""
        if self.spin(word, want, spin_ns):
            return True
        load = self.w.load
        deadline = time.monotonic() + timeout
        p = select.poll()
        p.register(efd, select.POLLIN)
        while True:
            if load(word) == want:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            p.poll(max(1, int(left * 1000)))
            clear(efd)

    def close(self) -> None:
        self.w.close()
        try:
            self.map.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
