"""VMBus ring buffers: the Python face of the C ring in ``csrc/``.

Layer: vmbus, directly over the C core (``vmbus._ring_cffi``).  A ring is any
writable buffer (an mmap of a memfd, a bytearray, ...) laid out as Hyper-V
lays it out: a 4096-byte control page, then the data area.  One process
attaches an ``OutgoingRing`` (it writes packets) and the peer an
``IncomingRing`` (it reads them).

The ring decides when the peer must be signalled and says so; it never
signals by itself.  Pass ``on_signal`` (a callable, typically the peer's
``Doorbell.ring``) and the ring calls it exactly when Hyper-V's rules say the
peer needs an interrupt; without it, owed signals are counted and
``take_signals()`` hands them out.

Reads are served from a small private read-ahead: one C call copies a batch of
packets out of the ring (and frees their space at once), then ``try_read``
hands them out one by one.  So a consumer pays one C crossing per batch, not
per packet, and no packet is ever parsed in shared memory.

Trust: the peer may rewrite any byte of the mapping at any time.  The C core
reads each index once, validates it and copies packets out before anything is
parsed; the extended headers of types 7 and 9 are validated here on the copy.
A violation raises ``RingCorruptError`` and the ring stays unusable.
"""

from __future__ import annotations

import struct
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

from ._ring_cffi import ffi, lib
from .doorbell import Doorbell
from .errors import RingCorruptError
from .packet import (
    DESCRIPTOR,
    PACKET_TYPES,
    GpaRange,
    Packet,
    PacketType,
    TransferPageRange,
    build_gpa_direct_header,
    build_xfer_pages_header,
    check_extended_header,
)

__all__ = [
    "ABI_VERSION",
    "CONTROL_BYTES",
    "DEFAULT_SPIN_NS",
    "IncomingRing",
    "OutgoingRing",
    "PacketBatch",
    "PacketView",
    "ReadInfo",
    "ReadInfoBatch",
    "RingCorruptError",
    "init_ring",
    "packet_bytes",
]

ABI_VERSION = 17
if lib.VMBR_ABI_VERSION != ABI_VERSION:  # pragma: no cover - a stale build
    raise ImportError(
        f"vmbus._ring_cffi was built for ring ABI {lib.VMBR_ABI_VERSION} but vmbus/ring.py "
        f"expects {ABI_VERSION}: rebuild the extension with `pip install -e .`"
    )

CONTROL_BYTES = lib.VMBR_CONTROL_BYTES
PAGE_BYTES = lib.VMBR_PAGE_BYTES
MAX_PACKET_BYTES = lib.VMBR_MAX_PACKET_BYTES
#: How long a waiter polls the ring before it blocks on its doorbell.  A
#: blocking hand-off to another vCPU costs ~22 µs here (shared/perf), so
#: spinning for about that long first keeps a busy channel at busy-poll speed
#: while an idle one still sleeps.
DEFAULT_SPIN_NS = 20_000
#: From this payload size on, ``write_many`` copies payloads into the ring
#: from where they are instead of joining them first.
GATHER_MIN_BYTES = 4096
_PINFO = struct.Struct("<HHIQ")  # struct vmbr_pinfo

_REASONS = {
    lib.VMBR_BAD_WRITE_INDEX: "bad_write_index",
    lib.VMBR_BAD_READ_INDEX: "bad_read_index",
    lib.VMBR_BAD_PARTIAL: "partial_packet",
    lib.VMBR_BAD_LENGTHS: "bad_lengths",
    lib.VMBR_BAD_TYPE: "bad_packet_type",
    lib.VMBR_BAD_FLAGS: "bad_flags",
    lib.VMBR_BAD_TOO_BIG: "packet_too_big",
    # (the reasons vmbus.packet's parsers give: the C batch path and the
    # Python paths name the same damage the same way)
    lib.VMBR_BAD_GPA_HEADER: "gpa_direct_header",
    lib.VMBR_BAD_XFER_HEADER: "xfer_pages_header",
}
_CLOSED = lib.VMBR_CLOSED

# Hot-path bindings: a module global is cheaper to reach than lib.<name>.
_write = lib.vmbr_write
_write4 = lib.vmbr_write4
_write_ext = lib.vmbr_write_ext
# The C calls' results, by the names csrc/vmbus_ring.h gives them (its
# "result vocabulary"; tests/unit/test_ring_results.py proves that no two
# fields of one encoding collide).
_TF_COMPLETION = lib.VMBR_TF_COMPLETION_REQUESTED  # type_flags: type | this
_WRITE_SIGNAL = lib.VMBR_WRITE_SIGNAL  # written; the reader must be signalled
_W4_STATUS = lib.VMBR_W4_STATUS_MASK  # vmbr_write4: count << _W4_COUNT_SHIFT | status
_W4_COUNT_SHIFT = lib.VMBR_W4_COUNT_SHIFT
_READ_SIGNAL = lib.VMBR_READ_SIGNAL  # whole-packet reads, commits: signal the writer
_DRAIN_SIGNAL = lib.VMBR_DRAIN_SIGNAL
_DRAIN_EXT_NEXT = lib.VMBR_DRAIN_EXT_NEXT  # drain_into, nothing taken: a type 7/9 is next
# The one-argument reads' packed answer: END | AUX << _IO_AUX_SHIFT | flags.
_IO_END = lib.VMBR_IO_END_MASK
_IO_AUX_SHIFT = lib.VMBR_IO_AUX_SHIFT
_IO_AUX = lib.VMBR_IO_AUX_MASK
# Every flag lies above every field: 0 < rc < _IO_SIGNAL is one plain answer
# with nothing else to do (the latency paths' one comparison).
_IO_SIGNAL = lib.VMBR_IO_SIGNAL  # signal the writer
_IO_EXT_NEXT = lib.VMBR_IO_EXT_NEXT  # alone: a type 7/9 packet is next, not taken
_IO_BROKEN = lib.VMBR_IO_BROKEN  # drain_io: the ring broke after this batch
_spin_read_payload_io = lib.vmbr_spin_read_payload_io
_exchange_io = lib.vmbr_exchange_io
_XCHG_ANSWER = lib.VMBR_XCHG_ANSWER_LIMIT  # below: the answer's length, nothing else to do
_XCHG_UNSENT = lib.VMBR_XCHG_UNSENT  # vmbr_exchange_io: nothing written, nothing read
_XCHG_SIGNAL = lib.VMBR_XCHG_SIGNAL  # written, the reader must be signalled; nothing read
_XCHG_READ = lib.VMBR_XCHG_READ  # written; | the read's own _IO_* answer
_NOTHING = b""
_drain_io = lib.vmbr_drain_io
_spin_readable = lib.vmbr_spin_readable
_spin_read_io = lib.vmbr_spin_read_io
_read_into = lib.vmbr_read_into
_drain_into = lib.vmbr_drain_into
_unmask = lib.vmbr_unmask_interrupts
_unpack = ffi.unpack
_new = object.__new__
_tuple_new = tuple.__new__  # a NamedTuple without its Python-level __new__
_monotonic = time.monotonic


def packet_bytes(payload_bytes: int, ext_bytes: int = 0) -> int:
    """Ring bytes one packet uses: descriptor, ext header, padded payload, trailer."""
    return ((16 + ext_bytes + payload_bytes + 7) & ~7) + 8


def _ring_length(buffer: Any) -> int:
    with memoryview(buffer) as mv:
        n = mv.nbytes
        if mv.readonly:
            raise ValueError("a ring needs a writable buffer")
    if n % PAGE_BYTES or n < lib.VMBR_MIN_RING_BYTES:
        raise ValueError(
            f"a ring buffer must be a multiple of 4096 bytes and at least 8192, not {n}"
        )
    if n - CONTROL_BYTES > 0x80000000:
        raise ValueError(f"a ring's data area is limited to 2 GiB, not {n - CONTROL_BYTES}")
    return n


def init_ring(buffer: Any) -> None:
    """Make ``buffer`` a fresh, empty ring: zero the control page and set the
    pending-send-size feature bit.  Call it once, before either end attaches;
    attaching never initialises."""
    _ring_length(buffer)
    view = ffi.from_buffer(buffer, require_writable=True)
    try:
        lib.vmbr_init_control(ffi.cast("uint8_t *", view))
    finally:
        ffi.release(view)


class _RingEnd:
    """What both ends share: attach, close, errors, debug_info."""

    _outgoing = False

    def __init__(self, buffer: Any, *, on_signal: Callable[[], None] | None = None) -> None:
        n = _ring_length(buffer)
        self._view = ffi.from_buffer(buffer, require_writable=True)
        self._r = ffi.new("struct vmbr_ring *")
        rc = lib.vmbr_attach(self._r, ffi.cast("uint8_t *", self._view), n, self._outgoing)
        if rc:
            ffi.release(self._view)
            raise self._error(rc)
        self.ring_bytes = n
        self.data_bytes = n - CONTROL_BYTES
        self.owed_signals = 0
        self.on_signal = on_signal
        self._signal: Callable[[], None] = on_signal if on_signal is not None else self._owe

    # -- signals -------------------------------------------------------------
    def _owe(self) -> None:
        self.owed_signals += 1

    def take_signals(self) -> int:
        """Return and reset the number of signals owed to the peer (when no
        ``on_signal`` was given)."""
        n, self.owed_signals = self.owed_signals, 0
        return n

    # -- errors --------------------------------------------------------------
    def _error(self, rc: int) -> Exception:
        if rc == lib.VMBR_E_CORRUPT:
            r = self._r
            if r.corrupt == _CLOSED:
                return ValueError("I/O on a closed ring")
            return RingCorruptError(_REASONS.get(r.corrupt, f"reason {r.corrupt}"), r.bad_value)
        if rc == lib.VMBR_E_INVAL:
            return ValueError(
                "invalid packet: try_write and write_many send DATA_INBAND or COMP with "
                "only the completion-requested flag; types 7 and 9 carry ranges "
                "(try_write_xfer_pages, try_write_gpa_direct)"
            )
        if rc == lib.VMBR_E_TOO_BIG:
            return ValueError(
                f"packet can never fit in this ring ({self.data_bytes} data bytes, "
                f"at most {self.max_payload_bytes} payload bytes per packet)"
            )
        return ValueError(f"ring call failed (code {rc})")

    @property
    def corrupt(self) -> str | None:
        """None, or why the peer's writes made this ring unusable."""
        c = self._r.corrupt
        return _REASONS.get(c, str(c)) if c and c != _CLOSED else None

    @property
    def closed(self) -> bool:
        return self._r.corrupt == _CLOSED

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload one inband packet can carry in this ring."""
        largest_packet = min(self.data_bytes - 16, MAX_PACKET_BYTES) & ~7
        return largest_packet - 16

    def debug_info(self) -> dict[str, Any]:
        """Indices, readable and writable bytes, mask, pending size, counters.

        Shared fields are shown as read (one snapshot); ``bytes_readable`` and
        ``bytes_writable`` are None when an index is out of range.
        """
        s = ffi.new("struct vmbr_snapshot *")
        lib.vmbr_snapshot(self._r, s)
        r, dsize = self._r, self.data_bytes
        w, rd = s.write_index, s.read_index
        ok = w < dsize and rd < dsize and not (w | rd) & 7
        readable = (w - rd if w >= rd else dsize - rd + w) if ok else None
        return {
            "end": "outgoing" if self._outgoing else "incoming",
            "ring_bytes": self.ring_bytes,
            "data_bytes": dsize,
            "write_index": w,
            "read_index": rd,
            "interrupt_mask": s.interrupt_mask,
            "pending_send_sz": s.pending_send_sz,
            "feature_bits": s.feature_bits,
            "bytes_readable": readable,
            "bytes_writable": dsize - readable if readable is not None else None,
            "private_index": r.index,
            "packets": r.packets,
            "bytes": r.bytes,
            "signals": r.signals,
            "signals_suppressed": r.signals_suppressed,
            "full": r.full,
            "corrupt": self.corrupt,
            # membarrier(2) GLOBAL_EXPEDITED in use (the reader's promise /
            # the writer's registration; docs/ring.md), else fences only
            "heavy_barrier": bool(r.heavy & 1),
        }

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        """Detach: release the view of the buffer (the buffer itself is the
        caller's; an mmap can be closed after this)."""
        if self._view is not None:
            lib.vmbr_close(self._r)  # every later call fails cleanly, touching no memory
            ffi.release(self._view)
            self._view = None

    def __del__(self) -> None:
        # A ring dropped unclosed (say, with the frames of a kept exception)
        # must give back its export of the buffer before the GC clears the
        # buffer object: CPython clears an exported memoryview anyway, and
        # cffi's later release of it then crashes the process.  Finalizers
        # run before any clearing (PEP 442).
        if getattr(self, "_view", None) is not None:
            self.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OutgoingRing(_RingEnd):
    """The writing end of a ring.

    Args:
        buffer: the ring's memory (control page first), already initialised.
        on_signal: called when the reader must be signalled.
    """

    _outgoing = True

    def __init__(self, buffer: Any, *, on_signal: Callable[[], None] | None = None) -> None:
        super().__init__(buffer, on_signal=on_signal)
        self._written = ffi.new("uint32_t *")  # write_many's count, made once

    def try_write(
        self,
        payload: bytes,
        *,
        packet_type: PacketType = PacketType.DATA_INBAND,
        trans_id: int = 0,
        completion_requested: bool = False,
    ) -> bool:
        """Write one packet; False (nothing written) when it does not fit now.

        For GPA-direct (9) and transfer-page (7) packets, which carry ranges,
        use ``try_write_gpa_direct`` and ``try_write_xfer_pages``.

        Raises:
            RingCorruptError: the reader corrupted the ring.
            ValueError: the packet can never fit in this ring, or a type that
                needs ranges was given here.
        """
        # Hot path: every keyword and branch here costs ~5-10 ns per packet.
        tf = packet_type | _TF_COMPLETION if completion_requested else packet_type
        try:
            rc = _write(self._r, tf, trans_id, payload, len(payload))
        except TypeError:  # not bytes: a bytearray, memoryview, mmap ...
            buf = ffi.from_buffer(payload)
            try:
                rc = _write(self._r, tf, trans_id, buf, len(buf))
            finally:
                ffi.release(buf)
        if rc > 0:
            if rc == _WRITE_SIGNAL:
                self._signal()
            return True
        if rc == 0:  # (VMBR_WRITE_FULL)
            return False
        raise self._error(rc)

    def try_write_gpa_direct(
        self,
        payload: bytes,
        ranges: Sequence[GpaRange] | bytes,
        *,
        trans_id: int = 0,
        completion_requested: bool = False,
    ) -> bool:
        """Write a GPA-direct packet (type 9): ``payload`` inline, plus ranges
        of guest pages the reader accesses in place.

        ``ranges`` may also be the header ``build_gpa_direct_header`` made of
        them (bytes): a sender that names the same buffers again and again
        builds each header once (storvsc's slots)."""
        ext = ranges if ranges.__class__ is bytes else build_gpa_direct_header(list(ranges))
        return self._write_ext(
            payload, PacketType.DATA_USING_GPA_DIRECT, trans_id, completion_requested, ext
        )

    def try_write_xfer_pages(
        self,
        payload: bytes,
        pageset_id: int,
        ranges: Sequence[TransferPageRange],
        *,
        trans_id: int = 0,
        completion_requested: bool = False,
    ) -> bool:
        """Write a transfer-page packet (type 7): ranges inside a pre-shared
        page set, plus ``payload`` inline."""
        ext = build_xfer_pages_header(pageset_id, list(ranges))
        return self._write_ext(
            payload, PacketType.DATA_USING_XFER_PAGES, trans_id, completion_requested, ext
        )

    def _write_ext(
        self, payload: Any, ptype: int, trans_id: int, completion_requested: bool, ext: bytes
    ) -> bool:
        tf = ptype | _TF_COMPLETION if completion_requested else ptype
        if payload.__class__ is bytes:
            rc = _write_ext(self._r, tf, trans_id, ext, len(ext), payload, len(payload))
        else:
            buf = ffi.from_buffer(payload)
            try:
                rc = _write_ext(self._r, tf, trans_id, ext, len(ext), buf, len(buf))
            finally:
                ffi.release(buf)
        if rc > 0:
            if rc == _WRITE_SIGNAL:
                self._signal()
            return True
        if rc == 0:  # (VMBR_WRITE_FULL)
            return False
        raise self._error(rc)

    def write_many(
        self,
        payloads: Sequence[bytes],
        *,
        packet_type: PacketType = PacketType.DATA_INBAND,
        trans_id: int = 0,
        completion_requested: bool = False,
    ) -> int:
        """Write as many of ``payloads`` as fit, in order, with one C call and
        one index publication; return how many were written."""
        n = len(payloads)
        if not n:
            return 0
        tf = packet_type | _TF_COMPLETION if completion_requested else packet_type
        if len(payloads[0]) >= GATHER_MIN_BYTES:
            # Large payloads are copied into the ring from where they are
            # (a joined blob would cost one more copy of every byte).
            if n <= 4:  # one C call: cffi refuses a non-bytes before writing
                try:
                    return self._write_upto4(payloads, n, tf, trans_id)
                except TypeError:
                    pass  # a bytearray, memoryview ...: the pointer-array path below
            elif all(p.__class__ is bytes for p in payloads):
                return self._write_many4(payloads, tf, trans_id)
            written = self._written
            bufs = [ffi.from_buffer(p) for p in payloads]
            try:
                lens = array("I", map(len, bufs))
                rc = lib.vmbr_write_gather(
                    self._r,
                    tf,
                    trans_id,
                    ffi.new("char *[]", bufs),
                    ffi.from_buffer("uint32_t[]", lens),
                    len(lens),
                    written,
                )
            finally:
                for b in bufs:
                    ffi.release(b)
        else:
            written = self._written
            blob = b"".join(payloads)
            lens = array("I", map(len, payloads))
            rc = lib.vmbr_write_batch(
                self._r,
                tf,
                trans_id,
                blob,
                ffi.from_buffer("uint32_t[]", lens),
                len(lens),
                written,
            )
        if rc < 0:
            raise self._error(rc)
        if rc == _WRITE_SIGNAL:
            self._signal()
        return int(written[0])

    def _write_many4(self, payloads: Sequence[bytes], tf: int, trans_id: int) -> int:
        """``write_many`` of bytes objects, four per C call (passed as plain
        arguments: no buffer export per payload), one publication per call."""
        n, done = len(payloads), 0
        if max(map(len, payloads)) > self.max_payload_bytes:
            # all or nothing, as the other paths (one call checks its four itself)
            raise self._error(lib.VMBR_E_TOO_BIG)
        while done < n:
            k = n - done if n - done < 4 else 4
            w = self._write_upto4(payloads[done : done + 4], k, tf, trans_id)
            done += w
            if w < k:
                break
        return done

    def _write_upto4(self, chunk: Sequence[bytes], k: int, tf: int, trans_id: int) -> int:
        """Up to four bytes payloads with one vmbr_write4 call (as plain
        arguments: no buffer export each) and one publication; how many."""
        if k == 3:  # (unpacked by count: a padded tuple costs ~0.1 us more)
            a, b, c = chunk
            d = _NOTHING
        elif k == 4:
            a, b, c, d = chunk
        else:
            a, b, c, d = (*chunk, _NOTHING, _NOTHING, _NOTHING)[:4]
        rc = _write4(self._r, tf, trans_id, k, a, len(a), b, len(b), c, len(c), d, len(d))
        if rc < 0:
            raise self._error(rc)
        if rc & _W4_STATUS == _WRITE_SIGNAL:
            self._signal()
        return rc >> _W4_COUNT_SHIFT

    def bytes_writable(self) -> int:
        """Free bytes right now (a write of n bytes needs strictly more)."""
        rc = lib.vmbr_bytes_writable(self._r)
        if rc < 0:
            raise self._error(rc)
        return int(rc)

    def request_space(self, need_bytes: int) -> bool:
        """Non-blocking form of ``wait_writable`` for event loops: publish
        pending_send_sz so the reader signals once ``need_bytes`` ring bytes
        are free.  Returns True if they already are (no signal will come; the
        next write clears the request)."""
        rc = lib.vmbr_set_pending(self._r, need_bytes)
        if rc < 0:
            raise self._error(rc)
        return rc > need_bytes

    def wait_writable(
        self,
        need_bytes: int,
        doorbell: Doorbell,
        timeout: float,
        *,
        spin_ns: int = DEFAULT_SPIN_NS,
    ) -> bool:
        """Wait until a packet of ``need_bytes`` ring bytes (see ``packet_bytes``)
        fits: spin for up to ``spin_ns``, then publish pending_send_sz and block
        on ``doorbell``, which the reader rings when that much is free.
        Returns False on timeout."""
        r = self._r
        if spin_ns:
            rc = lib.vmbr_spin_writable(r, need_bytes, spin_ns)
            if rc < 0:
                raise self._error(rc)
            if rc > need_bytes:
                return True
        deadline = _monotonic() + timeout
        while True:
            if self.request_space(need_bytes):
                return True  # the next write clears pending_send_sz
            remaining = deadline - _monotonic()
            if remaining <= 0:
                lib.vmbr_set_pending(r, 0)
                return False
            doorbell.wait(remaining)

    def write(
        self,
        payload: bytes,
        doorbell: Doorbell,
        timeout: float,
        *,
        spin_ns: int = DEFAULT_SPIN_NS,
        **kwargs: Any,
    ) -> bool:
        """Blocking ``try_write``: wait for space for up to ``timeout`` seconds."""
        if self.try_write(payload, **kwargs):
            return True
        need = packet_bytes(memoryview(payload).nbytes)
        deadline = _monotonic() + timeout
        while True:
            if not self.wait_writable(
                need, doorbell, max(0.0, deadline - _monotonic()), spin_ns=spin_ns
            ):
                return False
            if self.try_write(payload, **kwargs):
                return True


class ReadInfo(NamedTuple):
    """What ``IncomingRing.read_into`` read: the payload went to the caller's buffer."""

    packet_type: PacketType
    flags: int
    trans_id: int
    payload_bytes: int
    ranges: tuple[GpaRange, ...] | tuple[TransferPageRange, ...] | None


_T = TypeVar("_T")


class _Batch(Sequence[_T]):
    """A batch whose items are made on access by ``_item(i)``."""

    __slots__ = ()

    def _item(self, i: int) -> _T:
        raise NotImplementedError

    def __getitem__(self, i: Any) -> Any:
        n = len(self)
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(n))]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("packet index out of range")
        return self._item(i)

    def __iter__(self) -> Iterator[_T]:
        for i in range(len(self)):
            yield self._item(i)


class ReadInfoBatch(_Batch[ReadInfo]):
    """What ``IncomingRing.drain_into`` read: one ``ReadInfo`` per packet, in
    order, packet i's payload at ``payload_offsets()[i]`` in the caller's
    buffer.  The ``ReadInfo`` objects are made on access: a bulk drain of many
    large payloads then costs one small object per call, not one per packet.
    Compares equal to a list of the same ``ReadInfo`` values.
    """

    __slots__ = ("_one", "_raw")

    def __init__(self, raw: bytes = b"", one: ReadInfo | None = None) -> None:
        self._raw = raw  # struct vmbr_pinfo x n (type, flags, payload bytes, trans_id)
        self._one = one  # or a single ReadInfo (one from the validating path)

    def __len__(self) -> int:
        return 1 if self._one is not None else len(self._raw) >> 4

    def _item(self, i: int) -> ReadInfo:
        if self._one is not None:
            return self._one
        t, f, nbytes, tid = _PINFO.unpack_from(self._raw, i << 4)
        return _tuple_new(ReadInfo, (PACKET_TYPES[t], f, tid, nbytes, None))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (ReadInfoBatch, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ReadInfoBatch({list(self)!r})"

    def payload_sizes(self) -> list[int]:
        """Each packet's payload bytes, in order."""
        if self._one is not None:
            return [self._one.payload_bytes]
        return [x[2] for x in _PINFO.iter_unpack(self._raw)]

    def payload_offsets(self) -> list[int]:
        """Where each packet's payload starts in the caller's buffer."""
        out, pos = [], 0
        for nbytes in self.payload_sizes():
            out.append(pos)
            pos += nbytes
        return out

    @property
    def payload_bytes(self) -> int:
        """The payload bytes of all packets together (the buffer bytes used)."""
        return sum(self.payload_sizes())


_NO_INFOS = ReadInfoBatch()


class PacketBatch(_Batch[Packet]):
    """Packets drained with one C call: a private copy of them, back to back.

    ``starts`` holds, per packet i, its start (2i), its payload's start
    (2i + 1), and after the last packet the batch's end (vmbr_drain's layout).
    """

    __slots__ = ("_raw", "_st")

    def __init__(self, raw: bytes, starts: list[int]) -> None:
        self._raw = raw
        self._st = starts

    def __len__(self) -> int:
        return len(self._st) >> 1

    def _item(self, i: int) -> Packet:
        st, raw = self._st, self._raw
        j = i + i
        p = _new(Packet)
        p.data = raw
        p.start = st[j]
        p.payload = raw[st[j + 1] : st[j + 2]]
        return p

    def layout(self) -> tuple[bytes, list[int]]:
        """(raw, starts): the batch's private bytes and, per packet i,
        ``starts[2i]`` its descriptor's offset in ``raw``, ``starts[2i + 1]``
        its payload's, and ``starts[-1]`` the batch's end (a packet's payload
        ends where the next packet starts).  For a device's hot path that
        unpacks descriptor, extended header and payload in place, without a
        Packet per packet; the extended headers were validated when the batch
        was read (as for ``Packet.ranges``).  Do not modify ``starts``."""
        return self._raw, self._st

    @property
    def total_bytes(self) -> int:
        """Bytes of all packets in the batch (descriptors and padding included)."""
        return self._st[-1] - self._st[0]

    def payloads(self) -> list[bytes]:
        st, raw = self._st, self._raw
        return [raw[st[j + 1] : st[j + 2]] for j in range(0, len(st) - 1, 2)]


_EMPTY_BATCH = PacketBatch(b"", [0])


class PacketView:
    """A packet still in the ring, seen in place (zero copy).

    ``segments`` are one or two memoryviews of the payload (two when it wraps
    around the end of the ring).  They stay valid until ``release()`` (or the
    end of a ``with`` block), which consumes the packet.  Any other read from
    the ring in between delivers that packet itself and makes the view stale:
    its ``release()`` then consumes nothing and raises ValueError.

    Trust: the descriptor was copied and validated, but the payload bytes are
    the peer's live memory and may change while you look: copy before you
    parse.  Use this for bulk data only.
    """

    __slots__ = ("_ring", "_where", "flags", "packet_type", "segments", "trans_id")

    def __init__(
        self,
        ring: IncomingRing,
        packet_type: int,
        flags: int,
        trans_id: int,
        segments: tuple[memoryview, ...],
        where: tuple[Any, ...],
    ) -> None:
        self._ring = ring
        self._where = where
        self.packet_type = PacketType(packet_type)
        self.flags = flags
        self.trans_id = trans_id
        self.segments = segments

    @property
    def payload_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def copy_into(self, buffer: Any) -> int:
        with memoryview(buffer) as dst:
            pos = 0
            for s in self.segments:
                dst[pos : pos + s.nbytes] = s
                pos += s.nbytes
        return pos

    def release(self) -> None:
        if self._ring is not None:
            for s in self.segments:
                s.release()
            ring, self._ring = self._ring, None
            if not ring._consume_view(self._where):
                raise ValueError(
                    "stale PacketView: another read delivered this packet since peek()"
                )

    def __enter__(self) -> PacketView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class IncomingRing(_RingEnd):
    """The reading end of a ring.

    Args:
        buffer: the ring's memory (control page first), already initialised.
        on_signal: called when the writer must be signalled (it was waiting
            for space and now has enough).
        readahead_bytes: a batch stops after the packet that reaches this many
            bytes (the copy buffer itself always holds the largest packet).
        readahead_packets: most packets copied out per C call.
    """

    def __init__(
        self,
        buffer: Any,
        *,
        on_signal: Callable[[], None] | None = None,
        readahead_bytes: int = 64 * 1024,
        readahead_packets: int = 256,
    ) -> None:
        if readahead_packets > lib.VMBR_IO_MAX_PACKETS:
            raise ValueError(f"readahead_packets must be at most {lib.VMBR_IO_MAX_PACKETS}")
        if readahead_bytes > lib.VMBR_IO_END_MASK:
            raise ValueError(f"readahead_bytes must be at most {lib.VMBR_IO_END_MASK}")
        super().__init__(buffer, on_signal=on_signal)
        self._outsize = max(readahead_bytes, self.max_payload_bytes + 16)
        self._out = ffi.new("char[]", self._outsize)
        self._maxpk = max(1, readahead_packets)
        self._starts = ffi.new("uint32_t[]", 2 * self._maxpk + 1)
        r = self._r
        r.io_out = self._out
        r.io_starts = self._starts
        r.io_cap = self._outsize
        r.io_batch = max(1, readahead_bytes)
        r.io_max = self._maxpk
        r.io_spin_ns = self._spin_ns = DEFAULT_SPIN_NS
        self._hdr = ffi.new("char[]", 4096)
        self._hdr_mv = ffi.buffer(self._hdr)
        self._pinfos = ffi.new("struct vmbr_pinfo[]", self._maxpk)
        self._pinfo_bytes = ffi.cast("char *", self._pinfos)  # (ffi.unpack: one bytes)
        self._count = ffi.new("uint32_t *")
        self._pay_len = ffi.new("uint32_t *")
        self._vview = ffi.new("struct vmbr_view *")
        self._mv = memoryview(ffi.buffer(self._view))  # for zero-copy views
        # The current batch: raw bytes and, per packet i, st[2i] = its start,
        # st[2i+1] = its payload's start, st[2i+2] = its end (vmbr_drain).
        # The raw bytes are made from _out only when a Packet or a view needs
        # them (None until then): payload reads slice _out directly, one copy
        # fewer, which at 16 KiB is most of a read's cost.
        self._obuf = ffi.buffer(self._out)
        self._braw: bytes | None = b""
        self._bend = 0
        self._bst: list[int] = [0]
        self._i = 0
        self._n = 0
        self._pending_error: Exception | None = None
        self._reply: OutgoingRing | None = None  # exchange() writes here

    # -- the read-ahead --------------------------------------------------------
    def _take(self, rc: int) -> int:
        """Make the batch a vmbr_drain_io result (rc > 0) describes current."""
        n = rc >> _IO_AUX_SHIFT & _IO_AUX
        end = rc & _IO_END
        st = [0, self._starts[1], end] if n == 1 else _unpack(self._starts, 2 * n + 1)
        if rc >= _IO_SIGNAL:  # (flags lie above the fields)
            if rc & _IO_SIGNAL:
                self._signal()
            if rc & _IO_BROKEN:
                # The packets before the damage (a bad extended header
                # included: vmbr_drain validates those) were copied out and
                # are delivered first; the ring is dead, so read_index is not
                # published for them.
                self._pending_error = self._error(lib.VMBR_E_CORRUPT)
        self._braw, self._bend, self._bst, self._i, self._n = None, end, st, 0, n
        return n

    def _batch_raw(self) -> bytes:
        """The current batch's bytes (made once per batch, on first need)."""
        raw = self._braw
        if raw is None:
            raw = self._braw = _unpack(self._out, self._bend)
        return raw

    def _refill(self) -> int:
        if self._pending_error is not None:
            raise self._pending_error
        rc = _drain_io(self._r)
        if rc <= 0:
            if rc == 0:
                return 0
            raise self._error(rc)
        return self._take(rc)

    def try_read(self) -> Packet | None:
        """The next packet, or None when the ring is empty.

        Raises:
            RingCorruptError: the writer corrupted the ring (after any good
                packets that preceded the damage have been returned).
        """
        i = self._i
        if i >= self._n:
            if not self._refill():
                return None
            i = 0
        self._i = i + 1
        st = self._bst
        raw = self._braw
        if raw is None:
            raw = self._batch_raw()
        j = i + i
        p = _new(Packet)
        p.data = raw
        p.start = st[j]
        p.payload = raw[st[j + 1] : st[j + 2]]
        return p

    def drain(self, max_packets: int = 256) -> PacketBatch:
        """Up to ``max_packets`` packets with one C call (fewer when the ring
        holds fewer, or the batch reaches ``readahead_bytes``)."""
        if self._i >= self._n:
            r = self._r
            mx = min(max_packets, self._maxpk)
            if mx != self._maxpk:
                r.io_max = mx
                try:
                    n = self._refill()
                finally:
                    r.io_max = self._maxpk
            else:
                n = self._refill()
            if not n:
                return _EMPTY_BATCH
        i, j = self._i, min(self._n, self._i + max_packets)
        self._i = j
        if i == 0 and j == self._n:
            return PacketBatch(self._batch_raw(), self._bst)
        return PacketBatch(self._batch_raw(), self._bst[2 * i : 2 * j + 1])

    def read_into(self, buffer: Any) -> ReadInfo | None:
        """Copy the next packet's payload straight into ``buffer`` (one copy out
        of the ring, no intermediate object); None when the ring is empty.

        Raises:
            ValueError: ``buffer`` is too small for the next packet (nothing
                is consumed).
        """
        if self._i < self._n:  # keep order: serve read-ahead first
            j = 2 * self._i
            p = Packet(self._batch_raw(), self._bst[j])
            data = p.payload
            with memoryview(buffer) as mv:
                if len(data) > mv.nbytes:
                    raise ValueError(f"buffer too small for a {len(data)}-byte payload")
                mv[: len(data)] = data
            self._i += 1
            return ReadInfo(p.packet_type, p.flags, p.trans_id, len(data), p.ranges)
        if self._pending_error is not None:
            raise self._pending_error
        if buffer.__class__ is not bytearray:  # (require_writable costs 150 ns)
            with memoryview(buffer) as mv:
                if mv.readonly:
                    raise TypeError("read_into needs a writable buffer")
        dst = ffi.from_buffer(buffer)
        try:
            rc = _read_into(self._r, self._hdr, 4096, dst, len(dst), self._pay_len)
        finally:
            ffi.release(dst)
        if rc <= 0:
            if rc == 0:
                return None
            if rc == lib.VMBR_E_INVAL:
                need = lib.vmbr_peek(self._r, self._vview)
                if need > 0 and self._vview.offset_bytes > 4096:  # a huge ext header
                    self._refill()
                    return self.read_into(buffer)
                raise ValueError("buffer too small for the next packet's payload")
            raise self._error(rc)
        if rc & _READ_SIGNAL:
            self._signal()
        ptype, off8, _len8, flags, trans_id = DESCRIPTOR.unpack_from(self._hdr_mv)
        ranges = None
        if off8 != 2 or ptype == 7 or ptype == 9:
            ranges = self._read_into_ext(off8)
        return _tuple_new(ReadInfo,
                          (PACKET_TYPES[ptype], flags, trans_id, self._pay_len[0], ranges))

    def drain_into(self, buffer: Any, max_packets: int = 256) -> ReadInfoBatch:
        """The bulk form of ``read_into``: the payloads of up to ``max_packets``
        packets copied back to back into ``buffer`` (packet i's payload at the
        sum of the earlier ``payload_bytes``: ``payload_offsets()``), with one
        C call and one index publication.  Stops before a payload that would
        not fit.  Empty when the ring is empty.

        Raises:
            ValueError: ``buffer`` cannot hold even the next payload.
        """
        if self._i < self._n or self._pending_error is not None:
            info = self.read_into(buffer)  # keep order: the read-ahead first
            return ReadInfoBatch(one=info) if info is not None else _NO_INFOS
        if buffer.__class__ is not bytearray:
            with memoryview(buffer) as mv:
                if mv.readonly:
                    raise TypeError("drain_into needs a writable buffer")
        dst = ffi.from_buffer(buffer)
        count = self._count
        mx = self._maxpk
        try:
            rc = _drain_into(
                self._r, dst, len(dst), self._pinfos, max_packets if max_packets < mx else mx,
                count,
            )
        finally:
            ffi.release(dst)
        n = count[0]
        if n == 0:
            if rc == 0:
                return _NO_INFOS
            if rc == _DRAIN_EXT_NEXT:  # a type 7/9: its ranges need the validating path
                info = self.read_into(buffer)
                return ReadInfoBatch(one=info) if info is not None else _NO_INFOS
            if rc == lib.VMBR_E_INVAL:
                raise ValueError("buffer too small for the next packet's payload")
            raise self._error(rc)
        if rc == _DRAIN_SIGNAL:
            self._signal()
        b = _new(ReadInfoBatch)  # (no __init__: this is per call)
        b._raw = _unpack(self._pinfo_bytes, n << 4)
        b._one = None
        return b

    def _read_into_ext(self, off8: int) -> Any:
        ext = _unpack(self._hdr, max(16, off8 * 8))  # 7/9 with no header: corrupt
        try:
            check_extended_header(ext)
        except RingCorruptError as e:
            # sticky, under the reason vmbr_drain gives the same damage
            self._r.corrupt = (lib.VMBR_BAD_GPA_HEADER if e.reason == "gpa_direct_header"
                               else lib.VMBR_BAD_XFER_HEADER)
            self._r.bad_value = e.value & 0xFFFFFFFF
            raise
        return Packet(ext).ranges

    def peek(self) -> PacketView | None:
        """The next packet in place (see ``PacketView``); None when empty."""
        if self._i < self._n:
            raw = self._batch_raw()
            p = Packet(raw, self._bst[2 * self._i])
            seg = memoryview(p.payload)
            where = ("ahead", raw, self._i)
            return PacketView(self, p.packet_type, p.flags, p.trans_id, (seg,), where)
        if self._pending_error is not None:
            raise self._pending_error
        v = self._vview
        rc = lib.vmbr_peek(self._r, v)
        if rc == 0:
            return None
        if rc < 0:
            raise self._error(rc)
        if v.type in (PacketType.DATA_USING_GPA_DIRECT, PacketType.DATA_USING_XFER_PAGES):
            # Extended headers must be validated on a copy: take the copy path.
            r = self._r
            r.io_max = 1
            try:
                self._refill()
            finally:
                r.io_max = self._maxpk
            return self.peek()
        base = CONTROL_BYTES + v.first_off
        segs = [self._mv[base : base + v.first_len]]
        if v.second_len:
            segs.append(self._mv[CONTROL_BYTES : CONTROL_BYTES + v.second_len])
        where = ("ring", int(self._r.index))
        return PacketView(self, v.type, v.flags, v.trans_id, tuple(segs), where)

    def _consume_view(self, where: tuple[Any, ...]) -> bool:
        """Consume the packet a view shows; False if the view is stale."""
        if where[0] == "ahead":
            if self._braw is not where[1] or self._i != where[2]:
                return False
            self._i += 1
            return True
        if self._i < self._n or not self._r.peeked or self._r.index != where[1]:
            return False
        rc = lib.vmbr_consume(self._r, 1)
        if rc < 0:
            raise self._error(rc)
        if rc & _READ_SIGNAL:
            self._signal()
        return True

    # -- state and waiting -----------------------------------------------------
    @property
    def buffered_packets(self) -> int:
        """Packets already copied out into the read-ahead, not yet returned."""
        return self._n - self._i

    def bytes_readable(self) -> int:
        """Bytes of packets in the ring itself (read-ahead not counted)."""
        rc = lib.vmbr_bytes_readable(self._r)
        if rc < 0:
            raise self._error(rc)
        return int(rc)

    def mask_interrupts(self) -> None:
        """Tell the writer not to signal: we are draining (batched mode)."""
        lib.vmbr_mask_interrupts(self._r)

    def unmask_interrupts(self) -> int:
        """Ask for signals again and re-check; returns bytes readable.  Only a
        0 makes it safe to sleep on the doorbell."""
        rc = _unmask(self._r)
        if rc < 0:
            raise self._error(rc)
        return int(rc)

    def wait_readable(
        self, doorbell: Doorbell, timeout: float, *, spin_ns: int = DEFAULT_SPIN_NS
    ) -> bool:
        """Wait until a packet is readable: poll for up to ``spin_ns`` with
        interrupts masked, then unmask, re-check and block on ``doorbell``.
        Nothing is consumed, so any read form may follow.  Returns False on
        timeout."""
        if self._i < self._n:
            return True
        r = self._r
        if spin_ns:
            lib.vmbr_mask_interrupts(r)  # we are polling: the writer need not signal
            rc = _spin_readable(r, spin_ns)
            if rc:
                if rc < 0:
                    raise self._error(rc)
                return True
        deadline = _monotonic() + timeout
        while True:
            rc = _unmask(r)
            if rc:
                if rc < 0:
                    raise self._error(rc)
                return True
            remaining = deadline - _monotonic()
            if remaining <= 0:
                return False
            doorbell.wait(remaining)

    def read(
        self, doorbell: Doorbell, timeout: float, *, spin_ns: int = DEFAULT_SPIN_NS
    ) -> Packet | None:
        """Blocking ``try_read``: None only on timeout.  With a spin, the
        first wait is one C call that polls and copies out."""
        # (spin_ns == self._spin_ns implies a spin: _spin_ns is never 0)
        if self._i >= self._n and spin_ns == self._spin_ns:
            # The latency path: one C call polls and copies one packet out.
            # Every line here is ~20-40 ns of a ~1 us round trip: anything
            # but one plain packet (a signal owed, type 7/9, an error) goes
            # to _read_rest.
            rc = _spin_read_io(self._r)
            if 0 < rc < _IO_SIGNAL:  # END = the packet, AUX = its payload's offset
                raw = self._obuf[: rc & _IO_END]  # (~20 ns less than ffi.unpack)
                p = _new(Packet)
                p.data = raw
                p.start = 0
                p.payload = raw[rc >> _IO_AUX_SHIFT :]  # (no flag: AUX is all that is left)
                return p
            return self._read_rest(doorbell, timeout, spin_ns, rc)
        return self._read_rest(doorbell, timeout, spin_ns, None)

    def try_read_payload(self) -> bytes | None:
        """``try_read().payload`` without making the Packet: the next packet's
        payload bytes, or None when the ring is empty.  For byte streams that
        need no descriptor fields (no trans_id, no type); packets of types 7
        and 9 are delivered as their payload too (their ranges are dropped).

        Raises:
            RingCorruptError: as ``try_read``.
        """
        if self._i >= self._n and not self._refill():
            return None
        i = self._i  # (0 after a refill)
        self._i = i + 1
        st = self._bst
        return self._obuf[st[i + i + 1] : st[i + i + 2]]

    def read_payload(
        self, doorbell: Doorbell, timeout: float, *, spin_ns: int = DEFAULT_SPIN_NS
    ) -> bytes | None:
        """``read(doorbell, timeout).payload`` without making the Packet: the
        next packet's payload, waiting (spin, then block) up to ``timeout`` s;
        None only on timeout.  The latency path copies only the payload out
        of the ring (one C call) and makes one bytes object: ~0.2 us less per
        packet than ``read``, which builds a Packet over a copy of the whole
        packet.  Same trust as ``read``: the descriptor is validated first.
        """
        # (spin_ns == self._spin_ns implies a spin: _spin_ns is never 0)
        if self._i >= self._n and spin_ns == self._spin_ns:
            rc = _spin_read_payload_io(self._r)
            if 0 < rc < _IO_SIGNAL:  # END = the payload's length
                return self._obuf[: rc & _IO_END]
            return self._payload_rest(doorbell, timeout, spin_ns, rc)
        return self._payload_rest(doorbell, timeout, spin_ns, None)

    def _payload_rest(
        self, doorbell: Doorbell, timeout: float, spin_ns: int, rc: int | None
    ) -> bytes | None:
        """``read_payload`` past its latency path; ``rc`` as ``_read_rest``'s."""
        if rc is not None and rc > 0 and not rc & _IO_EXT_NEXT:  # taken; signal owed
            self._signal()
            return self._obuf[: rc & _IO_END]
        # an error, nothing within the spin (0), or a type 7/9 packet (not
        # taken): _read_rest reads it as it reads vmbr_spin_read_io's answer
        p = self._read_rest(doorbell, timeout, spin_ns, rc)
        return None if p is None else p.payload

    # -- request and answer ------------------------------------------------------
    def bind_reply_ring(self, out: OutgoingRing | None) -> None:
        """Make ``out`` the ring ``exchange`` writes its requests on (None:
        unbind).  Typically the other ring of the same channel."""
        if out is not None and not isinstance(out, OutgoingRing):
            raise TypeError(f"expected an OutgoingRing, not {type(out).__name__}")
        self._reply = out
        self._r.io_reply_to = ffi.NULL if out is None else out._r

    def exchange(
        self, payload: bytes, doorbell: Doorbell, timeout: float, *,
        spin_ns: int = DEFAULT_SPIN_NS,
    ) -> bytes | None:
        """Send ``payload`` (an inband packet, trans_id 0) on the bound reply
        ring and wait for the answer's payload: ``try_write`` then
        ``read_payload``, in one C call when the request needs no signal (the
        peer is polling) and nothing is read ahead: ~0.1 us less a side than
        the two calls.  The payload round trip of a request/answer protocol
        with one request in flight, or of an echo.

        Returns the answer's payload, or None when ``timeout`` seconds passed
        without room for the request (nothing was sent) or without an answer.

        Raises:
            ValueError: no reply ring is bound (``bind_reply_ring``).
            RingCorruptError: either ring is corrupt.
        """
        if self._i >= self._n and spin_ns == self._spin_ns:
            try:
                rc = _exchange_io(self._r, payload, len(payload))
            except TypeError:  # not bytes: the slow path takes any buffer
                rc = _XCHG_UNSENT
            if rc < _XCHG_ANSWER:
                return self._obuf[:rc]
            return self._exchange_rest(payload, doorbell, timeout, spin_ns, rc)
        return self._exchange_rest(payload, doorbell, timeout, spin_ns, _XCHG_UNSENT)

    def _exchange_rest(
        self, payload: bytes, doorbell: Doorbell, timeout: float, spin_ns: int, rc: int
    ) -> bytes | None:
        """``exchange`` past its latency path; ``rc``: what vmbr_exchange_io
        returned (or _XCHG_UNSENT: it was not called)."""
        out = self._reply
        if rc == _XCHG_UNSENT:  # the full path: wait for room, then for the answer
            if self._r.corrupt and self._i >= self._n:
                # no answer can come from a broken (or closed) ring: send nothing
                raise self._pending_error or self._error(lib.VMBR_E_CORRUPT)
            if out is None:
                raise ValueError("exchange() needs a reply ring: call bind_reply_ring first")
            deadline = _monotonic() + timeout
            if not out.write(payload, doorbell, timeout, spin_ns=spin_ns):
                return None
            return self.read_payload(doorbell, max(0.0, deadline - _monotonic()),
                                     spin_ns=spin_ns)
        if rc == _XCHG_SIGNAL:  # the peer sleeps: wake it, then wait
            out._signal()  # (bound: C wrote on it)
            return self.read_payload(doorbell, timeout, spin_ns=spin_ns)
        rc ^= _XCHG_READ  # written; what the read answered
        if rc & _IO_BROKEN:  # the read found the ring broken (r.corrupt says how)
            rc = lib.VMBR_E_CORRUPT
        return self._payload_rest(doorbell, timeout, spin_ns, rc)

    def _read_rest(
        self, doorbell: Doorbell, timeout: float, spin_ns: int, rc: int | None
    ) -> Packet | None:
        """``read`` past its latency path; ``rc``: what vmbr_spin_read_io
        returned there (None: it was not called)."""
        if self._i < self._n:
            return self.try_read()
        if rc is None and spin_ns and self._pending_error is None:
            if spin_ns != self._spin_ns:
                self._r.io_spin_ns = self._spin_ns = spin_ns
            rc = _spin_read_io(self._r)
        if rc is not None:
            if rc > 0 and not rc & _IO_EXT_NEXT:
                if rc & _IO_SIGNAL:
                    self._signal()
                end = rc & _IO_END
                raw = _unpack(self._out, end)
                p = _new(Packet)
                p.data = raw
                p.start = 0
                p.payload = raw[rc >> _IO_AUX_SHIFT & _IO_AUX : end]
                return p
            if rc < 0:
                if self._pending_error is not None:
                    raise self._pending_error
                raise self._error(rc)
            if rc and self._refill():  # a type 7/9 packet: the validating path
                return self.try_read()
        p = self.try_read()
        if p is not None:
            return p
        deadline = _monotonic() + timeout
        spin = 0 if rc == 0 else spin_ns  # (a poll of spin_ns just found nothing: block)
        while self.wait_readable(doorbell, max(0.0, deadline - _monotonic()), spin_ns=spin):
            p = self.try_read()
            if p is not None:
                return p
            spin = spin_ns
        return None

    def __iter__(self) -> Iterator[Packet]:
        """Packets until the ring is empty (non-blocking)."""
        while (p := self.try_read()) is not None:
            yield p

    def debug_info(self) -> dict[str, Any]:
        info = super().debug_info()
        info["buffered_packets"] = self.buffered_packets
        return info

    def close(self) -> None:
        if getattr(self, "_mv", None) is not None:
            self._mv.release()
            self._mv = None
        if getattr(self, "_reply", None) is not None:
            self.bind_reply_ring(None)
        super().close()
