"""The SCSI disk target: each command's data checked field by field against the
SPC-4 / SBC-3 layouts, I/O through a sparse file, and every refusal."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partitions.devices.storage.scsi.scsi import (
    FileBackend,
    MemoryBackend,
    ScsiDisk,
    ScsiResult,
    fixed_sense,
)

GIB = 1 << 30
GOOD, CHECK = 0x00, 0x02


def cdb10(op: int, lba: int = 0, n: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)  # op, flags, LBA @2, n @7, control


def cdb16(op: int, lba: int = 0, n: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)  # op, flags, LBA @2, n @10


def run(disk: ScsiDisk, cdb: bytes, n: int = 0, data_in: bool = True,
        buf: bytearray | None = None) -> tuple[ScsiResult, bytes]:
    """Execute with an n-byte buffer; returns the result and the bytes moved."""
    buf = bytearray(n) if buf is None else buf
    r = disk.execute(cdb, len(cdb), data_in, memoryview(buf), n)
    return r, bytes(buf[: r.data_transferred])


def sense_of(r: ScsiResult) -> tuple[int, int, int]:
    """(key, ASC, ASCQ) from fixed-format sense, after checking its frame."""
    assert r.scsi_status == CHECK and r.data_transferred == 0
    s = r.sense
    assert len(s) == 18 and s[0] == 0x70 and s[7] == 10  # current, fixed; additional length
    return s[2] & 0x0F, s[12], s[13]


ILLEGAL, INVALID_OPCODE, LBA_RANGE, INVALID_FIELD = 0x5, (0x20, 0), (0x21, 0), (0x24, 0)


def refused(r: ScsiResult, code: tuple[int, int]) -> bool:
    return sense_of(r) == (ILLEGAL, *code)


@pytest.fixture
def disk() -> ScsiDisk:
    return ScsiDisk(MemoryBackend(64 * 512), serial="SN-0042")


@pytest.fixture
def image(tmp_path) -> Iterator[int]:
    """A 1 GiB sparse file: no blocks allocated until written."""
    fd = os.open(tmp_path / "disk.img", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, GIB)
    try:
        yield fd
    finally:
        os.close(fd)


# --- fixed-format sense (SPC-4 4.5.3) ---

def test_fixed_sense_layout():
    s = fixed_sense(0x5, 0x24, 0x01)
    assert s == bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x01, 0, 0, 0, 0])


# --- INQUIRY (SPC-4 6.6) ---

def test_inquiry_standard_data(disk):
    r, d = run(disk, bytes([0x12, 0, 0, 0, 96, 0]), 96)
    assert (r.scsi_status, r.data_transferred, r.sense) == (GOOD, 36, b"")
    assert d[0] == 0x00  # peripheral qualifier 000b, device type 00h (direct access)
    assert d[1] & 0x80 == 0  # RMB: not removable
    assert d[2] == 0x05  # VERSION: SPC-3
    assert d[3] & 0x0F == 2  # RESPONSE DATA FORMAT
    assert d[4] == len(d) - 5  # ADDITIONAL LENGTH (n - 4)
    assert d[7] & 0x02  # CMDQUE
    assert d[8:16] == b"Viridian"  # T10 VENDOR IDENTIFICATION
    assert d[16:32] == b"Virtual Disk    "  # PRODUCT IDENTIFICATION, space-padded
    assert d[32:36] == b"1.0 "  # PRODUCT REVISION LEVEL


def test_inquiry_allocation_length_is_two_bytes_and_truncates(disk):
    assert run(disk, bytes([0x12, 0, 0, 0x01, 0x00, 0]), 256)[0].data_transferred == 36
    r, d = run(disk, bytes([0x12, 0, 0, 0, 5, 0]), 96)
    assert (r.scsi_status, d) == (GOOD, bytes([0, 0, 5, 2, 31]))
    assert run(disk, bytes([0x12, 0, 0, 0, 0, 0]), 96)[0] == ScsiResult(GOOD, 0)
    # the initiator's buffer bounds it too
    assert run(disk, bytes([0x12, 0, 0, 0, 96, 0]), 10)[0].data_transferred == 10


def test_vpd_supported_pages(disk):
    r, d = run(disk, bytes([0x12, 0x01, 0x00, 0, 255, 0]), 255)
    assert r.scsi_status == GOOD
    # device type, PAGE CODE 00h, PAGE LENGTH (2 bytes), the list in ascending order
    assert d == bytes([0x00, 0x00, 0x00, 0x03, 0x00, 0x80, 0x83])


def test_vpd_unit_serial_number(disk):
    r, d = run(disk, bytes([0x12, 0x01, 0x80, 0, 255, 0]), 255)
    assert r.scsi_status == GOOD
    assert d[:2] == bytes([0x00, 0x80])
    assert struct.unpack_from(">H", d, 2)[0] == len(d) - 4 == 7
    assert d[4:] == b"SN-0042"


def test_vpd_device_identification(disk):
    r, d = run(disk, bytes([0x12, 0x01, 0x83, 0, 255, 0]), 255)
    assert r.scsi_status == GOOD
    assert d[:2] == bytes([0x00, 0x83])
    assert struct.unpack_from(">H", d, 2)[0] == len(d) - 4
    desc = d[4:]
    assert desc[0] & 0x0F == 2  # CODE SET: ASCII
    assert desc[0] >> 4 == 0  # PROTOCOL IDENTIFIER (ignored: PIV 0)
    assert desc[1] & 0x80 == 0  # PIV
    assert (desc[1] >> 4) & 0x3 == 0  # ASSOCIATION: the logical unit
    assert desc[1] & 0x0F == 1  # DESIGNATOR TYPE: T10 vendor ID based
    assert desc[3] == len(desc) - 4
    assert desc[4:12] == b"Viridian" and desc[12:] == b"SN-0042"  # vendor ID first


@pytest.mark.parametrize("cdb", [
    bytes([0x12, 0x01, 0xB0, 0, 255, 0]),  # a VPD page we do not have
    bytes([0x12, 0x00, 0x80, 0, 255, 0]),  # a page code without EVPD
    bytes([0x12, 0x02, 0x00, 0, 255, 0]),  # CMDDT
])
def test_inquiry_refusals(disk, cdb):
    assert refused(run(disk, cdb, 255)[0], INVALID_FIELD)


# --- TEST UNIT READY, REQUEST SENSE ---

def test_test_unit_ready(disk):
    assert run(disk, bytes(6))[0] == ScsiResult(GOOD, 0, b"")


def test_request_sense_reports_no_sense(disk):
    run(disk, bytes([0xFF]) + bytes(5))  # a refused command first: its sense went with it
    r, d = run(disk, bytes([0x03, 0, 0, 0, 252, 0]), 252)
    assert r.scsi_status == GOOD
    assert d == fixed_sense(0, 0, 0) and d[0] == 0x70 and d[2] & 0x0F == 0
    assert run(disk, bytes([0x03, 0, 0, 0, 8, 0]), 252)[0].data_transferred == 8
    assert refused(run(disk, bytes([0x03, 0x01, 0, 0, 252, 0]), 252)[0], INVALID_FIELD)  # DESC


# --- READ CAPACITY (SBC-3 5.15, 5.16) ---

def test_read_capacity10_of_a_1_gib_disk(image):
    d = ScsiDisk(FileBackend(image))
    r, data = run(d, cdb10(0x25), 8)
    assert r.scsi_status == GOOD
    # RETURNED LOGICAL BLOCK ADDRESS: the last LBA, 2^30 / 512 - 1; BLOCK LENGTH IN BYTES
    assert data == bytes.fromhex("001fffff" "00000200")
    d4k = ScsiDisk(FileBackend(image), block_size=4096)
    assert run(d4k, cdb10(0x25), 8)[1] == bytes.fromhex("0003ffff" "00001000")


def test_read_capacity16_of_a_1_gib_disk(image):
    d = ScsiDisk(FileBackend(image))
    cdb = struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0)  # SERVICE ACTION 10h, ALLOC @10
    r, data = run(d, cdb, 32)
    assert (r.scsi_status, len(data)) == (GOOD, 32)
    assert struct.unpack_from(">Q", data, 0)[0] == 0x1FFFFF  # RETURNED LBA (8 bytes)
    assert struct.unpack_from(">I", data, 8)[0] == 512  # LOGICAL BLOCK LENGTH IN BYTES
    assert data[12] & 0x01 == 0  # PROT_EN
    assert data[13] & 0x0F == 0  # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT
    assert data[14] & 0xC0 == 0  # LBPME, LBPRZ
    assert data[12:] == bytes(20)
    # ALLOCATION LENGTH truncates
    short = struct.pack(">BBQIBB", 0x9E, 0x10, 0, 12, 0, 0)
    assert run(d, short, 32)[1] == data[:12]


def test_read_capacity_refusals(disk):
    assert refused(run(disk, struct.pack(">BBQIBB", 0x9E, 0x11, 0, 32, 0, 0), 32)[0],
                   INVALID_FIELD)  # another service action
    # an LBA without PMI (SBC: obsolete, and must be zero then)
    assert refused(run(disk, cdb10(0x25, lba=1), 8)[0], INVALID_FIELD)
    assert refused(run(disk, struct.pack(">BBQIBB", 0x9E, 0x10, 1, 32, 0, 0), 32)[0],
                   INVALID_FIELD)
    pmi = bytearray(cdb10(0x25, lba=1))
    pmi[8] = 0x01
    assert run(disk, bytes(pmi), 8)[0].scsi_status == GOOD


class HugeBackend:
    """3 TiB of nothing: enough to overflow READ CAPACITY(10)."""

    size_bytes = 3 << 40

    def readinto(self, offset, views):
        raise AssertionError

    write = readinto

    def flush(self):
        pass


def test_read_capacity10_says_ask_rc16_when_the_lba_does_not_fit():
    d = ScsiDisk(HugeBackend())
    assert run(d, cdb10(0x25), 8)[1] == bytes.fromhex("ffffffff" "00000200")
    rc16 = run(d, struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), 32)[1]
    assert struct.unpack_from(">Q", rc16)[0] == (3 << 40) // 512 - 1


# --- READ / WRITE (SBC-3 5.8, 5.10, 5.29, 5.31) through a sparse file ---

def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def test_write10_read16_round_trip_through_the_file(image):
    d = ScsiDisk(FileBackend(image))
    data = pattern(8 * 512)
    r, _ = run(d, cdb10(0x2A, lba=1000, n=8), 4096, data_in=False, buf=bytearray(data))
    assert r == ScsiResult(GOOD, 4096)
    assert os.pread(image, 4096, 1000 * 512) == data  # it is in the file, where it belongs
    r, back = run(d, cdb16(0x88, lba=1000, n=8), 4096)
    assert (r, back) == (ScsiResult(GOOD, 4096), data)
    # never-written blocks of the sparse file read as zeros
    assert run(d, cdb10(0x28, lba=5000, n=2), 1024)[1] == bytes(1024)


def test_write16_read10_at_the_last_block(image):
    d = ScsiDisk(FileBackend(image))
    last = GIB // 512 - 1
    run(d, cdb16(0x8A, lba=last, n=1), 512, data_in=False, buf=bytearray(pattern(512, 9)))
    assert run(d, cdb10(0x28, lba=last, n=1), 512)[1] == pattern(512, 9)
    assert os.pread(image, 512, GIB - 512) == pattern(512, 9)


def test_reads_and_writes_past_the_end_move_nothing(image):
    d = ScsiDisk(FileBackend(image))
    last, blocks = GIB // 512 - 1, os.fstat(image).st_blocks
    for cdb in (cdb10(0x28, lba=last, n=2), cdb16(0x88, lba=last + 1, n=1),
                cdb16(0x88, lba=(1 << 64) - 1, n=1), cdb10(0x28, lba=last + 1, n=0),
                cdb16(0x88, lba=0, n=(1 << 32) - 1)):
        buf = bytearray(b"\xaa" * 1024)
        assert refused(run(d, cdb, 1024, buf=buf)[0], LBA_RANGE)
        assert buf == b"\xaa" * 1024
    for cdb in (cdb10(0x2A, lba=last, n=2), cdb16(0x8A, lba=1 << 40, n=1)):
        assert refused(run(d, cdb, 1024, data_in=False, buf=bytearray(b"\xbb" * 1024))[0],
                       LBA_RANGE)
    assert os.pread(image, 512, GIB - 512) == bytes(512)
    assert os.fstat(image).st_blocks == blocks  # still sparse: nothing was written


def test_zero_blocks_is_not_an_error(disk):
    assert run(disk, cdb10(0x28, lba=3, n=0), 0)[0] == ScsiResult(GOOD, 0)
    assert run(disk, cdb16(0x8A, lba=63, n=0), 0, data_in=False)[0] == ScsiResult(GOOD, 0)


def test_a_buffer_shorter_than_the_transfer_is_refused(disk):
    buf = bytearray(b"\xcc" * 8192)
    disk.backend.data[:] = pattern(len(disk.backend.data))
    # 8 blocks wanted, 4095 bytes offered: refused before anything moves
    r = disk.execute(cdb10(0x28, lba=0, n=8), 10, True, memoryview(buf), 4095)
    assert refused(r, INVALID_FIELD) and buf == b"\xcc" * 8192
    before = bytes(disk.backend.data)
    r = disk.execute(cdb10(0x2A, lba=0, n=8), 10, False, memoryview(buf), 4095)
    assert refused(r, INVALID_FIELD) and disk.backend.data == before
    # the transport's bugs are not the guest's: a buffer shorter than it says, a short CDB
    with pytest.raises(ValueError):
        disk.execute(cdb10(0x28, n=1), 10, True, memoryview(bytearray(100)), 512)
    with pytest.raises(ValueError):
        disk.execute(cdb10(0x28, n=1), 10, True, None, 512)
    with pytest.raises(ValueError):
        disk.execute(bytes(6), 10, True, None, 0)


def test_transfer_stays_inside_buffer_and_transfer_length(disk):
    disk.backend.data[:] = pattern(len(disk.backend.data))
    buf = bytearray(b"\xdd" * 2048)
    r = disk.execute(cdb10(0x28, lba=2, n=2), 10, True, memoryview(buf), 1536)
    assert r == ScsiResult(GOOD, 1024)  # more offered than needed: the count says how much
    assert buf[:1024] == disk.backend.data[1024:2048] and buf[1024:] == b"\xdd" * 1024


def test_direction_must_match(disk):
    assert refused(run(disk, cdb10(0x28, n=1), 512, data_in=False)[0], INVALID_FIELD)
    assert refused(run(disk, cdb10(0x2A, n=1), 512, data_in=True)[0], INVALID_FIELD)
    assert refused(run(disk, bytes([0x12, 0, 0, 0, 36, 0]), 36, data_in=False)[0],
                   INVALID_FIELD)


def test_protection_fields_are_refused(disk):
    assert refused(run(disk, cdb10(0x28, n=1, flags=0x20), 512)[0], INVALID_FIELD)
    assert refused(run(disk, cdb16(0x8A, n=1, flags=0x40), 512, data_in=False)[0],
                   INVALID_FIELD)


def test_fua_write_is_flushed(disk):
    run(disk, cdb10(0x2A, lba=1, n=1), 512, data_in=False)
    assert disk.backend.flushes == 0
    run(disk, cdb10(0x2A, lba=1, n=1, flags=0x08), 512, data_in=False)
    assert disk.backend.flushes == 1


def test_scatter_list_and_zero_copy():
    """A scatter list of guest pages is filled in order, and the backend gets
    views of the caller's own memory (no bounce buffer)."""
    seen = []

    class Spy(MemoryBackend):
        def readinto(self, offset, views):
            seen.extend(views)
            super().readinto(offset, views)

    d = ScsiDisk(Spy(64 * 512))
    d.backend.data[:] = pattern(len(d.backend.data))
    with mmap.mmap(-1, 3 * 4096) as guest:
        page = memoryview(guest)
        views = [page[4096 + 100 : 4096 + 200], page[0:1000], page[8192 : 8192 + 3000]]
        r = d.execute(cdb10(0x28, lba=4, n=8), 10, True, views, 4096)
        assert r == ScsiResult(GOOD, 4096)
        want = d.backend.data[4 * 512 : 12 * 512]
        assert guest[4196:4196 + 100] + guest[0:1000] + guest[8192 : 8192 + 2996] == want
        assert guest[8192 + 2996 : 8192 + 3000] == bytes(4)  # past the transfer: untouched
        assert all(v.obj is guest for v in seen)  # the guest's memory itself
        del views, seen[:], page  # release the exports before the mmap closes


# --- REPORT LUNS (SPC-4 6.33) ---

def test_report_luns(disk):
    cdb = struct.pack(">BBBBBBIBB", 0xA0, 0, 0x00, 0, 0, 0, 64, 0, 0)  # ALLOCATION LENGTH @6
    r, d = run(disk, cdb, 64)
    assert r.scsi_status == GOOD
    # LUN LIST LENGTH (n - 7) = 8, reserved, LUN 0 in single-level format
    assert d == bytes.fromhex("00000008" "00000000" "0000000000000000")
    well_known = struct.pack(">BBBBBBIBB", 0xA0, 0, 0x01, 0, 0, 0, 64, 0, 0)
    assert run(disk, well_known, 64)[1] == bytes(8)
    short = struct.pack(">BBBBBBIBB", 0xA0, 0, 0x02, 0, 0, 0, 4, 0, 0)
    assert run(disk, short, 64)[1] == bytes.fromhex("00000008")
    bad = struct.pack(">BBBBBBIBB", 0xA0, 0, 0x03, 0, 0, 0, 64, 0, 0)
    assert refused(run(disk, bad, 64)[0], INVALID_FIELD)


# --- MODE SENSE (SPC-4 6.11, 6.12, 7.5; the caching page SBC-3 6.4.5) ---

def check_caching_page(p: bytes, wce: bool) -> None:
    assert p[0] & 0x3F == 0x08 and p[0] & 0x40 == 0  # PAGE CODE, SPF 0
    assert p[1] == 0x12 == len(p) - 2  # PAGE LENGTH
    assert bool(p[2] & 0x04) == wce  # WCE
    assert p[2] & 0x01 == 0  # RCD: the read cache is on


@pytest.mark.parametrize("page", [0x08, 0x3F])
def test_mode_sense6(disk, page):
    r, d = run(disk, bytes([0x1A, 0x08, page, 0, 255, 0]), 255)
    assert r.scsi_status == GOOD
    assert d[0] == len(d) - 1 == 23  # MODE DATA LENGTH (n - 1)
    assert d[1] == 0  # MEDIUM TYPE
    assert d[2] & 0x80 == 0  # WP: writable
    assert d[2] & 0x10  # DPOFUA: FUA honoured
    assert d[3] == 0  # BLOCK DESCRIPTOR LENGTH: none
    check_caching_page(d[4:], wce=True)


def test_mode_sense10(disk):
    cdb = struct.pack(">BBBBBBBHB", 0x5A, 0, 0x08, 0, 0, 0, 0, 255, 0)  # ALLOCATION LENGTH @7
    r, d = run(disk, cdb, 255)
    assert r.scsi_status == GOOD
    assert struct.unpack_from(">H", d)[0] == len(d) - 2 == 26  # MODE DATA LENGTH (n - 2)
    assert (d[2], d[3] & 0x90, d[4] & 0x01) == (0, 0x10, 0)  # medium, WP/DPOFUA, LONGLBA
    assert struct.unpack_from(">H", d, 6)[0] == 0  # BLOCK DESCRIPTOR LENGTH
    check_caching_page(d[8:], wce=True)


def test_mode_sense_page_control(disk):
    changeable = run(disk, bytes([0x1A, 0, 0x40 | 0x08, 0, 255, 0]), 255)[1]
    check_caching_page(changeable[4:], wce=False)  # a mask: nothing can be changed
    assert changeable[6:] == bytes(18)
    default = run(disk, bytes([0x1A, 0, 0x80 | 0x08, 0, 255, 0]), 255)[1]
    check_caching_page(default[4:], wce=True)
    assert sense_of(run(disk, bytes([0x1A, 0, 0xC0 | 0x08, 0, 255, 0]), 255)[0]) == (
        ILLEGAL, 0x39, 0x00)  # saved values: SAVING PARAMETERS NOT SUPPORTED
    assert run(disk, bytes([0x1A, 0, 0x08, 0, 4, 0]), 255)[0].data_transferred == 4


@pytest.mark.parametrize("cdb", [
    bytes([0x1A, 0, 0x1C, 0, 255, 0]),  # informational exceptions: not ours
    bytes([0x1A, 0, 0x08, 0x01, 255, 0]),  # a subpage
])
def test_mode_sense_refusals(disk, cdb):
    assert refused(run(disk, cdb, 255)[0], INVALID_FIELD)


# --- SYNCHRONIZE CACHE (SBC-3 5.22, 5.23) ---

def test_synchronize_cache(disk):
    assert run(disk, cdb10(0x35))[0] == ScsiResult(GOOD)  # LBA 0, 0 blocks: all of it
    assert run(disk, cdb16(0x91, lba=10, n=54))[0] == ScsiResult(GOOD)
    assert disk.backend.flushes == 2
    assert refused(run(disk, cdb10(0x35, lba=60, n=5))[0], LBA_RANGE)
    assert refused(run(disk, cdb16(0x91, lba=64))[0], LBA_RANGE)
    assert disk.backend.flushes == 2


def test_synchronize_cache_on_a_file(image):
    assert run(ScsiDisk(FileBackend(image)), cdb16(0x91))[0] == ScsiResult(GOOD)


# --- refusals ---

@pytest.mark.parametrize("cdb", [
    bytes([0x08, 0, 0, 0, 1, 0]),  # READ(6)
    bytes([0x41]) + bytes(9),  # WRITE SAME(10)
    bytes([0x4D]) + bytes(9),  # LOG SENSE
    bytes([0xA3]) + bytes(11),  # MAINTENANCE IN
    bytes([0xFF]) + bytes(15),
])
def test_unknown_opcodes(disk, cdb):
    r = run(disk, cdb, 512)[0]
    assert r.sense == bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0])
    assert refused(r, INVALID_OPCODE)


def test_cdb_lengths(disk):
    assert refused(disk.execute(b"", 0, True, None, 0), INVALID_OPCODE)
    assert refused(disk.execute(cdb10(0x28, n=1)[:6], 6, True, bytearray(512), 512),
                   INVALID_FIELD)  # a 10-byte command in 6 bytes
    assert disk.execute(cdb10(0x28, n=1) + bytes(6), 16, True, bytearray(512), 512) == (
        ScsiResult(GOOD, 512))  # a longer CDB is fine (storvsc sends up to 16)


class Failing(MemoryBackend):
    def readinto(self, offset, views):
        raise OSError(5, "EIO")

    write = readinto

    def flush(self):
        raise OSError(5, "EIO")


def test_backend_errors_are_medium_errors():
    d = ScsiDisk(Failing(64 * 512))
    assert sense_of(run(d, cdb10(0x28, n=1), 512)[0]) == (0x3, 0x11, 0x00)
    assert sense_of(run(d, cdb10(0x2A, n=1), 512, data_in=False)[0]) == (0x3, 0x0C, 0x00)
    assert sense_of(run(d, cdb10(0x35))[0]) == (0x3, 0x0C, 0x00)


def test_construction_checks(image):
    for bad in ({"block_size": 1000}, {"block_size": 256}, {"vendor": "TooLongVendor"},
                {"product": "é"}, {"serial": ""}):
        with pytest.raises(ValueError):
            ScsiDisk(MemoryBackend(4096), **bad)
    with pytest.raises(ValueError):
        ScsiDisk(MemoryBackend(511))
    with pytest.raises(ValueError):
        FileBackend(image, GIB + 1)
    os.lseek(image, 123, os.SEEK_SET)
    assert FileBackend(image).size_bytes == GIB
    assert os.lseek(image, 0, os.SEEK_CUR) == 123  # the caller's position is left alone


# --- whatever the guest sends ---

@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=16), st.booleans(), st.integers(0, 1024),
       st.integers(0, 64))
def test_any_cdb_stays_inside_its_buffer(cdb, data_in, transfer_length, pad_len):
    d = ScsiDisk(MemoryBackend(8 * 512))
    before = bytes(d.backend.data)
    guard = bytearray(b"\x5a" * (pad_len + transfer_length + pad_len))
    view = memoryview(guard)[pad_len : pad_len + transfer_length]
    r = d.execute(cdb, len(cdb), data_in, view, transfer_length)
    del view
    assert r.scsi_status in (GOOD, CHECK)
    assert 0 <= r.data_transferred <= transfer_length
    assert (len(r.sense) == 18) == (r.scsi_status == CHECK)
    if r.scsi_status == CHECK:
        assert r.data_transferred == 0
        assert guard == b"\x5a" * len(guard)
    assert guard[:pad_len] == guard[len(guard) - pad_len :] == b"\x5a" * pad_len
    if data_in:
        assert d.backend.data == before  # data-in never changes the disk
