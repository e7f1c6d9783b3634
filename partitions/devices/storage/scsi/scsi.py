"""A SCSI direct-access disk (LUN 0) over a backing store: CDB in, status + sense out.

Layer: partitions/devices/storage (pure Python; I/O only through the backend).  The
target of the synthetic SCSI controller (spec §8.1): a storvsp hands it the
CDB of an EXECUTE_SRB and the guest's data buffer, and sends back the status,
the byte count and the sense data.  Layouts follow SPC-4 (INQUIRY, VPD pages,
REPORT LUNS, MODE SENSE, REQUEST SENSE, fixed-format sense) and SBC-3
(READ CAPACITY, READ, WRITE, SYNCHRONIZE CACHE); all multi-byte fields are
big-endian.

What it implements is what a Linux guest's sd driver sends to a plain disk:
TEST UNIT READY, REQUEST SENSE, INQUIRY (standard data; VPD 0x00, 0x80,
0x83), MODE SENSE(6/10) (the caching page; no block descriptors, which SPC
allows), READ CAPACITY(10/16), READ/WRITE(10/16), SYNCHRONIZE CACHE(10/16)
and REPORT LUNS.  Anything else is CHECK CONDITION, ILLEGAL REQUEST, INVALID
COMMAND OPERATION CODE.  Sense always travels with the status (autosense,
which storvsc always asks for), so no sense is kept between commands and
REQUEST SENSE reports NO SENSE.

Zero copy: the data buffer is a memoryview, or a list of them (a scatter
list: the pages of a GPA range need not be contiguous in the host's mapping
of guest memory), and the backend moves blocks straight between it and the
disk (``FileBackend``: ``os.preadv`` / ``os.pwritev``).

Trust: the CDB is guest-written; it is copied once, and every field it
carries (LBA, lengths, page codes, service actions, protection bits) is
checked before use.  A guest never makes ``execute`` raise; nothing is read
or written outside ``buffer[:transfer_length]`` or past the end of the disk.
What the transport guarantees instead, and ``execute`` raises ValueError
for: the buffer covers ``transfer_length`` bytes and the CDB has
``cdb_length`` bytes.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..disk import DiskImageError, preadv_into, pwritev_from

__all__ = [
    "CHECK_CONDITION",
    "GOOD",
    "Backend",
    "FileBackend",
    "MemoryBackend",
    "ScsiDisk",
    "ScsiResult",
    "SenseKey",
    "fixed_sense",
]

GOOD = 0x00
CHECK_CONDITION = 0x02


class SenseKey:
    NO_SENSE = 0x0
    MEDIUM_ERROR = 0x3
    ILLEGAL_REQUEST = 0x5


# (ASC, ASCQ) pairs, SPC-4 Annex D
WRITE_ERROR = (0x0C, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
INVALID_OPCODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)

FIXED_SENSE_BYTES = 18


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    """Fixed-format sense data, 18 bytes: response code 0x70 (current, VALID 0:
    no INFORMATION), sense key @2, additional length 10 @7, ASC @12, ASCQ @13."""
    b = bytearray(FIXED_SENSE_BYTES)
    b[0], b[2], b[7], b[12], b[13] = 0x70, key & 0x0F, FIXED_SENSE_BYTES - 8, asc, ascq
    return bytes(b)


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """SCSI status (GOOD 0, CHECK CONDITION 2), bytes moved, sense (CHECK CONDITION only)."""

    scsi_status: int
    data_transferred: int = 0
    sense: bytes = b""


_GOOD_RESULTS: dict[int, ScsiResult] = {}


def _good(n: int) -> ScsiResult:
    """GOOD with ``n`` bytes moved (frozen: one instance per transfer size)."""
    r = _GOOD_RESULTS.get(n)
    if r is None:
        if len(_GOOD_RESULTS) >= 1024:
            _GOOD_RESULTS.clear()
        r = _GOOD_RESULTS[n] = ScsiResult(GOOD, n)
    return r


class _CheckCondition(Exception):
    """Raised by a command handler; carries the CHECK CONDITION result."""

    def __init__(self, key: int, code: tuple[int, int]) -> None:
        self.result = ScsiResult(CHECK_CONDITION, 0, fixed_sense(key, *code))


def _illegal(code: tuple[int, int]) -> _CheckCondition:
    return _CheckCondition(SenseKey.ILLEGAL_REQUEST, code)


# --- scatter lists of byte views ---

Buffer = memoryview | bytearray | bytes | Sequence[memoryview]


def _byte_view(b: memoryview | bytearray | bytes) -> memoryview:
    if type(b) is memoryview and b.ndim == 1 and b.format == "B":
        return b  # already a view of bytes (the usual case: pages of guest memory)
    v = memoryview(b)
    return v if v.ndim == 1 and v.format == "B" else v.cast("B")


def _head(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of ``views``, as views (no copy)."""
    out = []
    for v in views:
        if n <= 0:
            break
        k = len(v)
        if k > n:
            v = v[:n]
            k = n
        out.append(v)
        n -= k
    if n > 0:
        raise ValueError(f"the buffers are {n} bytes short")
    return out


def _nbytes(views: Sequence[memoryview]) -> int:
    return sum(map(len, views))


class Backend(Protocol):
    """Where the blocks live.  Offsets and lengths are in bytes and within
    ``size_bytes``; the views are 1-D byte views the callee fills or reads."""

    @property
    def size_bytes(self) -> int: ...

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` in order from ``offset``; OSError on failure."""

    def write(self, offset: int, views: Sequence[memoryview]) -> None:
        """Write ``views`` in order at ``offset``; OSError on failure."""

    def flush(self) -> None:
        """Make every completed write durable; OSError on failure."""


def _check_span(offset: int, n: int, size: int) -> None:
    if offset < 0 or offset + n > size:
        raise ValueError(f"{n} bytes at {offset} run outside a {size}-byte disk")


class FileBackend:
    """Blocks in a file or block device, by fd (the caller owns and closes it).

    Reads and writes go straight between the fd and the caller's views
    (``os.preadv`` / ``os.pwritev``, at most IOV_MAX views per call, short
    transfers resumed); ``flush`` is ``fdatasync``.
    """

    def __init__(self, fd: int, size_bytes: int | None = None) -> None:
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        end = os.lseek(fd, 0, os.SEEK_END)  # a block device's size too, unlike fstat
        os.lseek(fd, pos, os.SEEK_SET)  # the fd's position is the caller's
        if size_bytes is None:
            size_bytes = end
        if not 0 <= size_bytes <= end:
            raise ValueError(f"size_bytes {size_bytes} is not within the file's {end} bytes")
        self.fd = fd
        self._size = size_bytes

    @property
    def size_bytes(self) -> int:
        return self._size

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        left = _nbytes(views)
        if offset < 0 or offset + left > self._size:
            _check_span(offset, left, self._size)  # raises
        try:
            preadv_into(self.fd, offset, views)
        except DiskImageError as e:  # the file shrank under us: never hand out stale bytes
            raise OSError(errno.EIO, str(e)) from None

    def write(self, offset: int, views: Sequence[memoryview]) -> None:
        left = _nbytes(views)
        if offset < 0 or offset + left > self._size:
            _check_span(offset, left, self._size)  # raises
        pwritev_from(self.fd, offset, views)

    def flush(self) -> None:
        os.fdatasync(self.fd)


class MemoryBackend:
    """Blocks in a bytearray (tests); ``flushes`` counts flush calls."""

    def __init__(self, size_bytes: int) -> None:
        self.data = bytearray(size_bytes)
        self.flushes = 0

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        _check_span(offset, _nbytes(views), len(self.data))
        for v in views:
            v[:] = self.data[offset : offset + len(v)]
            offset += len(v)

    def write(self, offset: int, views: Sequence[memoryview]) -> None:
        _check_span(offset, _nbytes(views), len(self.data))
        for v in views:
            self.data[offset : offset + len(v)] = v
            offset += len(v)

    def flush(self) -> None:
        self.flushes += 1


def _ascii(name: str, s: str, width: int) -> bytes:
    b = s.encode("ascii")
    if len(b) > width or not all(0x20 <= c < 0x7F for c in b):
        raise ValueError(f"{name} {s!r} is not printable ASCII of at most {width} bytes")
    return b.ljust(width, b" ")  # SPC: left-aligned, space-padded


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_RW10 = struct.Struct(">IxH")  # READ/WRITE(10) from byte 2: LBA (4), group, TRANSFER LENGTH (2)
_RW16 = struct.Struct(">QI")  # READ/WRITE(16) from byte 2: LBA (8), TRANSFER LENGTH (4)

# The caching mode page (SBC-3 0x08, 20 bytes): WCE (byte 2 bit 2) set: writes
# land in the host's page cache and are durable only after SYNCHRONIZE CACHE
# (or a FUA write), so the guest must send those, and Linux does when WCE=1.
_CACHING_PAGE = bytes([0x08, 0x12, 0x04]) + bytes(17)
_CACHING_CHANGEABLE = bytes([0x08, 0x12]) + bytes(18)  # nothing can be changed
_DPOFUA = 0x10  # mode header device-specific parameter: DPO and FUA honoured


class ScsiDisk:
    """LUN 0 of a SCSI target: a direct-access block device over ``backend``.

    Args:
        backend: where the blocks live; a trailing partial block is unused.
        block_size: the logical block size, a power of two >= 512.
        vendor, product, revision: INQUIRY identification (8, 16, 4 ASCII chars).
        serial: the unit serial number (VPD 0x80, and 0x83's identifier).
    """

    def __init__(self, backend: Backend, block_size: int = 512, *, vendor: str = "Viridian",
                 product: str = "Virtual Disk", revision: str = "1.0",
                 serial: str = "00000000") -> None:
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two >= 512")
        self.backend = backend
        self.block_size = block_size
        self.block_count = backend.size_bytes // block_size
        if self.block_count == 0:
            raise ValueError(f"{backend.size_bytes} bytes hold no {block_size}-byte block")
        self._vendor = _ascii("vendor", vendor, 8)
        self._product = _ascii("product", product, 16)
        self._revision = _ascii("revision", revision, 4)
        self._serial = _ascii("serial", serial, 252).rstrip()
        if not self._serial:
            raise ValueError("the serial number is empty")

    # --- entry point ---

    def execute(self, cdb: bytes, cdb_length: int, data_in: bool, buffer: Buffer | None,
                transfer_length: int) -> ScsiResult:
        """Run one command.

        Args:
            cdb: the command descriptor block (at least ``cdb_length`` bytes).
            cdb_length: bytes of ``cdb`` that are the command (the SRB's field).
            data_in: the buffer is for data to the initiator (the SRB's
                data_in READ); False for data from it (WRITE).
            buffer: the initiator's data buffer: a writable memoryview, or a
                list of them taken in order; None when there is no data.
            transfer_length: bytes of ``buffer`` the initiator offers (the
                SRB's data_transfer_length).

        Returns:
            GOOD with the bytes moved, or CHECK CONDITION with 18 bytes of
            fixed-format sense and nothing moved.  Parameter data (INQUIRY,
            MODE SENSE, ...) is cut to the allocation length and to
            ``transfer_length``; a READ or WRITE that needs more than
            ``transfer_length`` is refused (INVALID FIELD IN CDB).

        Raises:
            ValueError: ``buffer`` holds fewer than ``transfer_length`` bytes,
                or ``cdb`` fewer than ``cdb_length`` (the transport's bugs).
        """
        if transfer_length < 0 or len(cdb) < cdb_length:
            raise ValueError(f"cdb_length {cdb_length} of a {len(cdb)}-byte CDB, "
                             f"transfer_length {transfer_length}")
        if buffer is None:
            buffer = []
        elif isinstance(buffer, memoryview | bytearray | bytes):
            buffer = [buffer]
        views = _head([_byte_view(b) for b in buffer], transfer_length)
        cdb = bytes(cdb[:cdb_length])  # one private copy: the CDB may live in shared memory
        command = _COMMANDS.get(cdb[0]) if cdb else None
        try:
            if command is None:
                raise _illegal(INVALID_OPCODE)
            size, handler = command
            if not size <= cdb_length <= 16:
                raise _illegal(INVALID_FIELD_IN_CDB)
            return handler(self, cdb, data_in, views)
        except _CheckCondition as c:
            return c.result

    # --- helpers ---

    def _data_in(self, data: bytes, allocation: int, data_in: bool,
                 views: list[memoryview]) -> ScsiResult:
        """Parameter data to the initiator: the device stops at the allocation
        length (SPC: not an error) and at the initiator's buffer."""
        n = min(len(data), allocation, _nbytes(views))
        if n and not data_in:
            raise _illegal(INVALID_FIELD_IN_CDB)
        for v in _head(views, n):
            v[:] = data[: len(v)]
            data = data[len(v) :]
        return ScsiResult(GOOD, n)

    def _check_range(self, lba: int, blocks: int) -> None:
        # SBC: the LBA itself must exist even when no block is transferred
        if lba >= self.block_count or lba + blocks > self.block_count:
            raise _illegal(LBA_OUT_OF_RANGE)

    def _transfer(self, cdb: bytes, lba: int, blocks: int, write: bool, data_in: bool,
                  views: list[memoryview]) -> ScsiResult:
        if cdb[1] & 0xE0:  # RDPROTECT / WRPROTECT: no protection information here
            raise _illegal(INVALID_FIELD_IN_CDB)
        if lba >= self.block_count or lba + blocks > self.block_count:  # (_check_range)
            raise _illegal(LBA_OUT_OF_RANGE)
        n = blocks * self.block_size
        if n == 0:
            return ScsiResult(GOOD)
        have = _nbytes(views)
        if n > have or data_in == write:
            raise _illegal(INVALID_FIELD_IN_CDB)
        span, offset = views if n == have else _head(views, n), lba * self.block_size
        try:
            if write:
                self.backend.write(offset, span)
                if cdb[1] & 0x08:  # FUA: durable before status, as MODE SENSE promised
                    self.backend.flush()
            else:
                self.backend.readinto(offset, span)
        except OSError:
            raise _CheckCondition(SenseKey.MEDIUM_ERROR,
                                  WRITE_ERROR if write else UNRECOVERED_READ_ERROR) from None
        return _good(n)

    # --- commands (SPC-4 / SBC-3 byte offsets in the comments) ---

    def _test_unit_ready(self, cdb: bytes, data_in: bool, views: list[memoryview]) -> ScsiResult:
        return ScsiResult(GOOD)

    def _request_sense(self, cdb: bytes, data_in: bool, views: list[memoryview]) -> ScsiResult:
        if cdb[1] & 0x01:  # DESC: descriptor-format sense is not supported
            raise _illegal(INVALID_FIELD_IN_CDB)
        return self._data_in(fixed_sense(SenseKey.NO_SENSE, 0, 0), cdb[4], data_in, views)

    def _inquiry(self, cdb: bytes, data_in: bool, views: list[memoryview]) -> ScsiResult:
        evpd, page, allocation = cdb[1] & 0x01, cdb[2], _U16.unpack_from(cdb, 3)[0]
        if cdb[1] & 0x02 or (not evpd and page):  # CMDDT (obsolete), or a page without EVPD
            raise _illegal(INVALID_FIELD_IN_CDB)
        if not evpd:
            data = (bytes([
                0x00,  # peripheral qualifier 0 (connected), device type 0 (direct access)
                0x00,  # RMB 0: not removable
                0x05,  # VERSION: SPC-3 (so Linux reads VPD pages and uses READ CAPACITY(16))
                0x02,  # RESPONSE DATA FORMAT 2
                36 - 5,  # ADDITIONAL LENGTH (n - 4)
                0x00, 0x00,
                0x02,  # CMDQUE: commands may be queued
            ]) + self._vendor + self._product + self._revision)
        elif page == 0x00:  # Supported VPD pages
            data = bytes([0x00, 0x00, 0x00, 3, 0x00, 0x80, 0x83])
        elif page == 0x80:  # Unit serial number
            data = bytes([0x00, 0x80]) + _U16.pack(len(self._serial)) + self._serial
        elif page == 0x83:  # Device identification: one T10 vendor ID based designator
            ident = self._vendor + self._serial
            # code set 2 (ASCII); PIV 0, association 0 (the LU), designator type 1
            desc = bytes([0x02, 0x01, 0x00, len(ident)]) + ident
            data = bytes([0x00, 0x83]) + _U16.pack(len(desc)) + desc
        else:
            raise _illegal(INVALID_FIELD_IN_CDB)
        return self._data_in(data, allocation, data_in, views)

    def _mode_pages(self, cdb: bytes) -> bytes:
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        if pc == 3:  # saved values
            raise _illegal(SAVING_PARAMETERS_NOT_SUPPORTED)
        if page not in (0x08, 0x3F) or subpage not in (0x00, 0xFF):
            raise _illegal(INVALID_FIELD_IN_CDB)
        # current (0) and default (2) are the same; changeable (1) is a zero mask
        return _CACHING_CHANGEABLE if pc == 1 else _CACHING_PAGE

    def _mode_sense6(self, cdb: bytes, data_in: bool, views: list[memoryview]) -> ScsiResult:
        pages = self._mode_pages(cdb)
        # MODE DATA LENGTH (n - 1), MEDIUM TYPE, DEVICE-SPECIFIC, BLOCK DESCRIPTOR LENGTH 0
        header = bytes([3 + len(pages), 0x00, _DPOFUA, 0])
        return self._data_in(header + pages, cdb[4], data_in, views)

    def _mode_sense10(self, cdb: bytes, data_in: bool, views: list[memoryview]) -> ScsiResult:
        pages = self._mode_pages(cdb)
        # MODE DATA LENGTH (n - 2), MEDIUM TYPE, DEVICE-SPECIFIC, LONGLBA 0, reserved,
        # BLOCK DESCRIPTOR LENGTH 0
        header = _U16.pack(6 + len(pages)) + bytes([0x00, _DPOFUA, 0, 0]) + _U16.pack(0)
        return self._data_in(header + pages, _U16.unpack_from(cdb, 7)[0], data_in, views)

    def _read_capacity10(self, cdb: bytes, data_in: bool, views: list[memoryview]) -> ScsiResult:
        # LBA @2 and PMI (byte 8 bit 0) are obsolete; LBA must be 0 unless PMI is set
        if not cdb[8] & 0x01 and _U32.unpack_from(cdb, 2)[0]:
            raise _illegal(INVALID_FIELD_IN_CDB)
        # RETURNED LOGICAL BLOCK ADDRESS (the last one; FFFFFFFFh: ask RC16), BLOCK LENGTH
        last = min(self.block_count - 1, 0xFFFFFFFF)
        return self._data_in(_U32.pack(last) + _U32.pack(self.block_size), 8, data_in, views)

    def _service_action_in16(self, cdb: bytes, data_in: bool,
                             views: list[memoryview]) -> ScsiResult:
        if cdb[1] & 0x1F != 0x10:  # READ CAPACITY(16) is the only service action
            raise _illegal(INVALID_FIELD_IN_CDB)
        if not cdb[14] & 0x01 and _U64.unpack_from(cdb, 2)[0]:
            raise _illegal(INVALID_FIELD_IN_CDB)
        # RETURNED LBA @0 (8), LOGICAL BLOCK LENGTH @8 (4); @12 protection (none),
        # @13 logical blocks per physical block exponent 0, @14 LBPME/LBPRZ 0 and
        # lowest aligned LBA 0; reserved to 31
        data = _U64.pack(self.block_count - 1) + _U32.pack(self.block_size) + bytes(20)
        return self._data_in(data, _U32.unpack_from(cdb, 10)[0], data_in, views)

    def _read10(self, cdb: bytes, data_in: bool, views: list[memoryview]) -> ScsiResult:
        # LBA @2 (4), TRANSFER LENGTH @7 (2)
        lba, blocks = _RW10.unpack_from(cdb, 2)
        return self._transfer(cdb, lba, blocks, False, data_in, views)

    def _write10(self, cdb: bytes, data_in: bool, views: list[memoryview]) -> ScsiResult:
        lba, blocks = _RW10.unpack_from(cdb, 2)
        return self._transfer(cdb, lba, blocks, True, data_in, views)

    def _read16(self, cdb: bytes, data_in: bool, views: list[memoryview]) -> ScsiResult:
        # LBA @2 (8), TRANSFER LENGTH @10 (4)
        lba, blocks = _RW16.unpack_from(cdb, 2)
        return self._transfer(cdb, lba, blocks, False, data_in, views)

    def _write16(self, cdb: bytes, data_in: bool, views: list[memoryview]) -> ScsiResult:
        lba, blocks = _RW16.unpack_from(cdb, 2)
        return self._transfer(cdb, lba, blocks, True, data_in, views)

    def _synchronize(self, lba: int, blocks: int) -> ScsiResult:
        # NUMBER OF BLOCKS 0: to the end of the disk.  IMMED may be ignored: the
        # status simply comes after the flush instead of before.
        self._check_range(lba, blocks)
        try:
            self.backend.flush()
        except OSError:
            raise _CheckCondition(SenseKey.MEDIUM_ERROR, WRITE_ERROR) from None
        return ScsiResult(GOOD)

    def _synchronize_cache10(self, cdb: bytes, data_in: bool,
                             views: list[memoryview]) -> ScsiResult:
        # LBA @2 (4), NUMBER OF BLOCKS @7 (2)
        return self._synchronize(_U32.unpack_from(cdb, 2)[0], _U16.unpack_from(cdb, 7)[0])

    def _synchronize_cache16(self, cdb: bytes, data_in: bool,
                             views: list[memoryview]) -> ScsiResult:
        # LBA @2 (8), NUMBER OF BLOCKS @10 (4)
        return self._synchronize(_U64.unpack_from(cdb, 2)[0], _U32.unpack_from(cdb, 10)[0])

    def _report_luns(self, cdb: bytes, data_in: bool, views: list[memoryview]) -> ScsiResult:
        # SELECT REPORT @2: 0 all, 2 all accessible -> LUN 0; 1 well-known LUs -> none.
        # SPC-4 truncates at any allocation length (SPC-3 refused one below 16).
        select = cdb[2]
        if select not in (0x00, 0x01, 0x02):
            raise _illegal(INVALID_FIELD_IN_CDB)
        luns = b"" if select == 0x01 else bytes(8)  # LUN 0, single-level format: all zero
        data = _U32.pack(len(luns)) + bytes(4) + luns  # LUN LIST LENGTH (n - 7), reserved
        return self._data_in(data, _U32.unpack_from(cdb, 6)[0], data_in, views)


_Handler = Callable[[ScsiDisk, bytes, bool, list[memoryview]], ScsiResult]

# opcode -> (CDB bytes, handler)
_COMMANDS: dict[int, tuple[int, _Handler]] = {
    0x00: (6, ScsiDisk._test_unit_ready),
    0x03: (6, ScsiDisk._request_sense),
    0x12: (6, ScsiDisk._inquiry),
    0x1A: (6, ScsiDisk._mode_sense6),
    0x25: (10, ScsiDisk._read_capacity10),
    0x28: (10, ScsiDisk._read10),
    0x2A: (10, ScsiDisk._write10),
    0x35: (10, ScsiDisk._synchronize_cache10),
    0x5A: (10, ScsiDisk._mode_sense10),
    0x88: (16, ScsiDisk._read16),
    0x8A: (16, ScsiDisk._write16),
    0x91: (16, ScsiDisk._synchronize_cache16),
    0x9E: (16, ScsiDisk._service_action_in16),
    0xA0: (12, ScsiDisk._report_luns),
}
