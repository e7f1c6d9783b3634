"""The emulated IDE disk: the guest driver wired straight to the controller.

No traps here: ``DirectPortIO`` calls ``io_read``/``io_write`` directly, over a
sparse image in tmp_path and a fake guest memory whose ``view`` refuses
anything outside the granted window.  The port-access counts asserted below are
the traps per operation the benchmark will report.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv.partition_memory import GpaError
from partitions.devices.storage.disk import (
    DiskImage,
    DiskImageError,
    _advance,
    open_image,
    pread_into,
    preadv_into,
    pwrite_from,
    pwritev_from,
)
from partitions.devices.storage.ide import ata as A
from partitions.devices.storage.ide.ata import (
    BmCmd,
    BmStatus,
    Command,
    Error,
    IdeController,
    Status,
)
from partitions.devices.storage.ide.driver import DirectPortIO, DmaBuffer, IdeDriver, IdeError

KiB, MiB = 1 << 10, 1 << 20
DISK_BYTES = 4 * MiB
SECTORS = DISK_BYTES // 512
RAM_BYTES = 512 * KiB
GRANT = (64 * KiB, 448 * KiB)  # what the child granted: [lo, hi)
PRD_GPA = 64 * KiB  # the driver's DMA buffer (PRD table), first page of the grant
DATA_GPA = 128 * KiB  # DMA data buffers, up to 128 KiB (256 sectors)
STATUS, ALT, BM = 0x1F7, 0x3F6, 0xC000


class FakeGuestMemory:
    """A bytearray standing in for guest RAM; only GRANT is reachable via ``view``."""

    def __init__(self, lo: int = GRANT[0], hi: int = GRANT[1]) -> None:
        self.ram = bytearray(b"\xaa" * RAM_BYTES)  # canary pattern everywhere
        self.lo, self.hi = lo, hi

    def view(self, gpa: int, length: int) -> memoryview:
        if length <= 0 or gpa < self.lo or gpa + length > self.hi:
            raise GpaError(f"GPA {gpa:#x}+{length} is not granted")
        return memoryview(self.ram)[gpa : gpa + length]

    def outside(self) -> bytes:
        return bytes(self.ram[: self.lo]) + bytes(self.ram[self.hi :])


@dataclass
class Rig:
    img: DiskImage
    mem: FakeGuestMemory
    ctl: IdeController
    drv: IdeDriver
    irqs: list[int]

    def image_bytes(self, offset: int, n: int) -> bytes:
        return os.pread(self.img.fd, n, offset)


def make_rig(path: Path, *, interrupts: bool = False) -> Rig:
    img = open_image(path, DISK_BYTES)
    mem = FakeGuestMemory()
    irqs: list[int] = []
    ctl = IdeController(img, mem, irq=lambda: irqs.append(1))
    dma = DmaBuffer(PRD_GPA, memoryview(mem.ram)[PRD_GPA : PRD_GPA + 4 * KiB])
    drv = IdeDriver(DirectPortIO(ctl), dma, interrupts=interrupts)
    if interrupts:
        ctl.irq = lambda: (irqs.append(1), drv.interrupt())
    return Rig(img, mem, ctl, drv, irqs)


@pytest.fixture
def rig(tmp_path):
    r = make_rig(tmp_path / "disk.img")
    yield r
    r.img.close()


def pio_accesses(sectors: int) -> int:
    # status, 5 task-file registers, command; per sector a status poll and 256
    # data words; one final status read
    return 8 + 257 * sectors


DMA_ACCESSES = 14  # status; PRD address, clear status, direction; 6 task file; start;
# bus master status; stop; device status


# --- disk.py ------------------------------------------------------------------------------


def test_open_image_creates_a_sparse_file_and_refuses_another_size(tmp_path):
    p = tmp_path / "d.img"
    with open_image(p, 64 * MiB) as img:
        st_ = os.fstat(img.fd)
        assert (st_.st_size, img.size_bytes, img.sectors) == (64 * MiB, 64 * MiB, 128 * KiB)
        assert st_.st_blocks * 512 < 1 * MiB  # a hole, not 64 MiB of zeros
    with open_image(p, 64 * MiB, create=False) as img:  # reopened as is
        assert img.size_bytes == 64 * MiB
    with pytest.raises(DiskImageError, match="refusing to resize"):
        open_image(p, 32 * MiB)
    for bad in (0, -512, 1000):
        with pytest.raises(DiskImageError, match="multiple of 512"):
            open_image(tmp_path / "e.img", bad)
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "missing.img", 512, create=False)
    assert not (tmp_path / "missing.img").exists()


def test_vectored_io_fills_every_view_and_resumes_short_transfers(tmp_path):
    with open_image(tmp_path / "d.img", 8 * KiB) as img:
        data = bytes(range(256)) * 12
        parts = [memoryview(bytearray(data[:100])), memoryview(bytearray(data[100:3072]))]
        assert pwritev_from(img.fd, 512, parts) == 3072
        a, b = bytearray(1000), bytearray(2072)
        assert preadv_into(img.fd, 512, [memoryview(a), memoryview(b)]) == 3072
        assert bytes(a + b) == data
        one = bytearray(512)
        pwrite_from(img.fd, 0, memoryview(b"\x01" * 512))
        pread_into(img.fd, 0, memoryview(one))
        assert one == b"\x01" * 512
        with pytest.raises(DiskImageError, match="end of file"):
            pread_into(img.fd, 8 * KiB - 100, memoryview(bytearray(200)))
    views = [memoryview(bytearray(4)), memoryview(bytearray(6))]
    assert [v.nbytes for v in _advance(views, 5)] == [5]
    assert [v.nbytes for v in _advance(views, 4)] == [6]
    assert _advance(views, 10) == []


# --- IDENTIFY -----------------------------------------------------------------------------


def test_identify_fields(rig):
    ident = rig.drv.identify()
    assert rig.drv.last_op_accesses == 261
    assert ident.model == "VIRIDIAN IDE DISK"
    assert ident.sectors_lba28 == ident.sectors_lba48 == SECTORS
    assert ident.supports_lba and ident.supports_dma
    assert not ident.supports_lba48  # the 48-bit commands are not emulated
    assert ident.checksum_ok and ident.words[255] & 0xFF == 0xA5
    w = ident.words
    assert w[0] & 0x8000 == 0  # an ATA device
    assert w[63] & 0x07 == 0x07  # multiword DMA 0-2
    assert w[83] & 0xC000 == 0x4000 and w[83] & 1 << 12  # FLUSH CACHE
    # ATA strings keep the first character in the high byte of each word
    assert w[27] == ord("V") << 8 | ord("I")
    assert rig.ctl.status == A.IDLE and rig.ctl.stats.read_ops == 0


def test_identify_capacity_words_saturate_lba28_but_not_lba48():
    big = (1 << 28) + 12345
    words = struct.unpack("<256H", A.identify_data(big))
    assert words[60] | words[61] << 16 == (1 << 28) - 1
    assert sum(words[100 + i] << 16 * i for i in range(4)) == big
    assert sum(A.identify_data(big)) % 256 == 0


# --- round trips --------------------------------------------------------------------------

SIZES = [512, 4 * KiB, 64 * KiB]


@pytest.mark.parametrize("nbytes", SIZES)
def test_pio_round_trip_and_access_counts(rig, nbytes):
    n = nbytes // 512
    data = random.Random(nbytes).randbytes(nbytes)
    rig.drv.write_pio(100, data)
    assert rig.drv.last_op_accesses == pio_accesses(n)
    assert rig.image_bytes(100 * 512, nbytes) == data
    out = bytearray(nbytes)
    rig.drv.read_pio(100, n, out)
    assert rig.drv.last_op_accesses == pio_accesses(n)
    assert out == data
    s = rig.ctl.stats
    assert (s.write_ops, s.read_ops, s.write_bytes, s.read_bytes) == (1, 1, nbytes, nbytes)
    assert s.port_accesses == rig.drv.port_accesses  # every driver access reached the device
    assert s.unhandled == 0 and s.errors == 0 and s.dma_ops == 0
    assert rig.irqs == []  # nIEN set: a polling driver takes no interrupts


@pytest.mark.parametrize("nbytes", SIZES)
def test_dma_round_trip_and_access_counts(rig, nbytes):
    n = nbytes // 512
    data = random.Random(nbytes).randbytes(nbytes)
    rig.mem.ram[DATA_GPA : DATA_GPA + nbytes] = data
    rig.drv.write_dma(200, n, DATA_GPA)
    assert rig.drv.last_op_accesses == DMA_ACCESSES
    assert rig.image_bytes(200 * 512, nbytes) == data
    rig.mem.ram[DATA_GPA : DATA_GPA + nbytes] = bytes(nbytes)
    rig.drv.read_dma(200, n, DATA_GPA)
    assert rig.drv.last_op_accesses == DMA_ACCESSES
    assert rig.mem.ram[DATA_GPA : DATA_GPA + nbytes] == data
    s = rig.ctl.stats
    assert (s.write_ops, s.read_ops, s.dma_ops) == (1, 1, 2)
    assert (s.write_bytes, s.read_bytes) == (nbytes, nbytes)
    assert rig.ctl.bm_status & (BmStatus.ACTIVE | BmStatus.ERROR) == 0
    assert rig.mem.ram[DATA_GPA + nbytes] == 0xAA  # not one byte past the buffer


def test_a_64k_region_is_one_prd_entry_with_count_zero(rig):
    rig.drv.build_prd(DATA_GPA, 64 * KiB)
    assert A.PRD_ENTRY.unpack_from(rig.mem.ram, PRD_GPA) == (DATA_GPA, 0, A.PRD_EOT)
    # an unaligned buffer is split at the 64 KiB boundary
    rig.drv.build_prd(DATA_GPA + 0x100, 64 * KiB)
    assert A.PRD_ENTRY.unpack_from(rig.mem.ram, PRD_GPA) == (DATA_GPA + 0x100, 0xFF00, 0)
    assert A.PRD_ENTRY.unpack_from(rig.mem.ram, PRD_GPA + 8) == (3 * 64 * KiB, 0x100, A.PRD_EOT)


def test_pio_written_data_reads_back_by_dma_and_vice_versa(rig):
    a, b = random.Random(1).randbytes(8 * KiB), random.Random(2).randbytes(8 * KiB)
    rig.drv.write_pio(7, a)
    rig.drv.read_dma(7, 16, DATA_GPA)
    assert rig.mem.ram[DATA_GPA : DATA_GPA + 8 * KiB] == a
    rig.mem.ram[DATA_GPA : DATA_GPA + 8 * KiB] = b
    rig.drv.write_dma(1000, 16, DATA_GPA)
    out = bytearray(8 * KiB)
    rig.drv.read_pio(1000, 16, out)
    assert out == b


def test_sector_count_zero_means_256(rig):
    data = random.Random(3).randbytes(256 * 512)
    rig.drv.write_pio(SECTORS - 256, data)  # the last 256 sectors: exactly fits
    assert rig.ctl.count == 0  # what the driver wrote for 256
    out = bytearray(256 * 512)
    rig.drv.read_pio(SECTORS - 256, 256, out)
    assert out == data
    rig.drv.read_dma(SECTORS - 256, 256, DATA_GPA)
    assert rig.mem.ram[DATA_GPA : DATA_GPA + len(data)] == data
    assert rig.ctl.stats.read_bytes == 2 * len(data)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(("lba", "count"), [(SECTORS - 1, 2), (SECTORS, 1), ((1 << 28) - 1, 1)])
@pytest.mark.parametrize("how", ["read_pio", "write_pio", "read_dma", "write_dma"])
def test_lba_past_the_end_is_idnf(rig, lba, count, how):
    rig.mem.ram[DATA_GPA : DATA_GPA + count * 512] = b"\x55" * (count * 512)
    with pytest.raises(IdeError) as e:
        if how == "read_pio":
            rig.drv.read_pio(lba, count, bytearray(count * 512))
        elif how == "write_pio":
            rig.drv.write_pio(lba, b"\x55" * (count * 512))
        else:
            getattr(rig.drv, how)(lba, count, DATA_GPA)
    assert e.value.error == Error.IDNF and e.value.status & Status.ERR
    assert e.value.bm_status & BmStatus.ERROR == 0  # a device error, not a bus error
    assert rig.image_bytes(DISK_BYTES - 1024, 1024) == bytes(1024)
    s = rig.ctl.stats
    assert (s.read_bytes, s.write_bytes, s.errors) == (0, 0, 1)
    rig.drv.write_pio(0, b"\x01" * 512)  # the next command works
    assert rig.ctl.error == 0


def prd(*entries: tuple[int, int, bool]) -> bytes:
    return b"".join(A.PRD_ENTRY.pack(a, n & 0xFFFF, A.PRD_EOT if eot else 0)
                    for a, n, eot in entries)


BAD_TABLES = {
    "table outside memory": (0x1000, b""),  # below the grant
    "table runs off the grant": (GRANT[1] - 8, prd((DATA_GPA, 256, False))),
    "region outside memory": (PRD_GPA, prd((0x2000, 4096, True))),
    "region straddles the grant end": (PRD_GPA, prd((GRANT[1] - 2048, 4096, True))),
    "region past 4 GiB": (PRD_GPA, prd((0xFFFFF800, 4096, True))),
    "too few bytes": (PRD_GPA, prd((DATA_GPA, 2048, True))),
    "too many bytes": (PRD_GPA, prd((DATA_GPA, 8192, True))),
    "more bytes before the end": (PRD_GPA, prd((DATA_GPA, 4096, False), (DATA_GPA, 512, True))),
    "odd byte count": (PRD_GPA, prd((DATA_GPA, 4095, False), (DATA_GPA + 4096, 1, True))),
    "odd address": (PRD_GPA, prd((DATA_GPA + 1, 4096, True))),
    # 600 two-byte entries with the end bit on the last: longer than the 512 cap
    "too long": (PRD_GPA, prd(*[(DATA_GPA + 2 * i, 2, i == 599) for i in range(600)])),
    # no end bit: the walk runs on into the zeros after it (0 = 64 KiB each)
    "no end bit": (PRD_GPA, prd((DATA_GPA, 2048, False), (DATA_GPA + 2048, 2048, False))),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
@pytest.mark.parametrize("to_memory", [True, False], ids=["read", "write"])
def test_bad_prd_tables_are_refused_and_nothing_moves(rig, case, to_memory):
    table_gpa, table = BAD_TABLES[case]
    rig.mem.ram[PRD_GPA : PRD_GPA + 8 * KiB] = bytes(8 * KiB)  # zeros after the table
    rig.mem.ram[table_gpa : table_gpa + len(table)] = table
    count = 256 if case == "too long" else 8
    pattern = b"\x5a" * (count * 512)
    rig.mem.ram[DATA_GPA : DATA_GPA + len(pattern)] = pattern
    before_outside = rig.mem.outside()
    with pytest.raises(IdeError, match="bus master error") as e:
        rig.drv.run_dma(10, count, table_gpa, to_memory=to_memory)
    assert rig.drv.last_op_accesses == DMA_ACCESSES + 1  # plus the error register
    assert e.value.bm_status & BmStatus.ERROR and e.value.bm_status & BmStatus.INTERRUPT
    assert e.value.error == Error.ABRT and e.value.status & Status.ERR
    assert rig.ctl.last_dma_error
    if case == "too long":
        assert "512" in rig.ctl.last_dma_error
    # nothing transferred, either way
    assert rig.mem.ram[DATA_GPA : DATA_GPA + len(pattern)] == pattern
    assert rig.image_bytes(10 * 512, len(pattern)) == bytes(len(pattern))
    assert rig.mem.outside() == before_outside
    s = rig.ctl.stats
    assert (s.read_bytes, s.write_bytes, s.read_ops, s.write_ops) == (0, 0, 0, 0)
    rig.drv.read_dma(10, 1, DATA_GPA)  # and the channel recovers
    assert rig.ctl.bm_status & BmStatus.ERROR == 0


def test_bus_master_direction_must_match_the_command(rig):
    ctl = rig.ctl
    rig.drv.build_prd(DATA_GPA, 512)
    ctl.io_write(BM + 4, 4, PRD_GPA)
    ctl.io_write(BM, 1, 0)  # direction: from memory ...
    for port, v in ((0x1F6, 0xE0), (0x1F2, 1), (0x1F3, 0), (0x1F4, 0), (0x1F5, 0)):
        ctl.io_write(port, 1, v)
    ctl.io_write(STATUS, 1, Command.READ_DMA)  # ... but the command reads the disk
    assert ctl.status & Status.BSY  # waiting for the bus master
    ctl.io_write(BM, 1, BmCmd.START)
    assert ctl.bm_status & BmStatus.ERROR and ctl.error == Error.ABRT
    assert "direction" in ctl.last_dma_error


@pytest.mark.parametrize("cmd", [0x00, 0x24, 0x25, 0x91, 0xA1, 0xC4, 0xFF])
def test_unknown_commands_abort(rig, cmd):
    rig.ctl.io_write(STATUS, 1, cmd)
    assert rig.ctl.io_read(STATUS, 1) == A.IDLE | Status.ERR
    assert rig.ctl.io_read(0x1F1, 1) == Error.ABRT


def test_chs_addressing_is_refused(rig):
    rig.ctl.io_write(0x1F6, 1, 0xA0)  # LBA bit clear
    rig.ctl.io_write(STATUS, 1, Command.READ_SECTORS)
    assert rig.ctl.error == Error.ABRT and rig.ctl.status & Status.ERR


def test_set_features_and_flush(rig):
    rig.ctl.io_write(0x1F1, 1, 0x03)  # set transfer mode ...
    rig.ctl.io_write(0x1F2, 1, 0x22)  # ... multiword DMA 2
    rig.ctl.io_write(STATUS, 1, Command.SET_FEATURES)
    assert rig.ctl.io_read(STATUS, 1) == A.IDLE
    rig.drv.flush()
    assert rig.drv.last_op_accesses == 4 and rig.ctl.stats.flush_ops == 1


# --- interrupts, reset, odd accesses ------------------------------------------------------


def test_interrupts_when_nien_is_clear_and_the_same_access_counts(tmp_path):
    r = make_rig(tmp_path / "disk.img", interrupts=True)
    try:
        r.drv.write_pio(0, bytes(4 * KiB))
        assert r.drv.last_op_accesses == pio_accesses(8)
        assert len(r.irqs) == 8  # one per sector written
        r.irqs.clear()
        r.drv.read_pio(0, 8, bytearray(4 * KiB))
        assert len(r.irqs) == 8  # one before each sector offered
        r.irqs.clear()
        r.drv.read_dma(0, 8, DATA_GPA)
        assert r.drv.last_op_accesses == DMA_ACCESSES and len(r.irqs) == 1
        assert r.drv.irqs_seen == 17 == r.ctl.stats.irqs
    finally:
        r.img.close()


def test_status_read_acknowledges_the_interrupt_alternate_status_does_not(rig):
    rig.ctl.io_write(STATUS, 1, Command.SET_FEATURES)
    assert rig.ctl.intrq
    assert rig.ctl.io_read(ALT, 1) == A.IDLE and rig.ctl.intrq
    assert rig.ctl.io_read(STATUS, 1) == A.IDLE and not rig.ctl.intrq


def test_srst_resets_the_device_and_cancels_a_waiting_dma(rig):
    ctl = rig.ctl
    for port, v in ((0x1F6, 0xE0), (0x1F2, 1), (0x1F3, 5)):
        ctl.io_write(port, 1, v)
    ctl.io_write(STATUS, 1, Command.READ_DMA)
    assert ctl.io_read(STATUS, 1) & Status.BSY
    ctl.io_write(0x1F7, 1, Command.IDENTIFY_DEVICE)  # ignored while BSY
    assert ctl.io_read(0x1F3, 1) == ctl.io_read(STATUS, 1)  # BSY: every register reads status
    ctl.io_write(ALT, 1, A.DevCtl.SRST)
    assert ctl.io_read(STATUS, 1) == Status.BSY
    ctl.io_write(ALT, 1, 0)
    assert ctl.io_read(STATUS, 1) == A.IDLE
    # the ATA signature: count 1, LBA 1/0/0; diagnostic code 1 (no error)
    assert [ctl.io_read(p, 1) for p in range(0x1F1, 0x1F6)] == [1, 1, 1, 0, 0]
    ctl.io_write(BM, 1, BmCmd.START | BmCmd.TO_MEMORY)  # nothing is waiting any more
    assert ctl.stats.read_bytes == 0 and ctl.stats.dma_ops == 0
    ctl.io_write(BM, 1, 0)
    rig.drv.read_dma(5, 1, DATA_GPA)  # a full cycle works after the reset


def test_device_1_is_absent(rig):
    rig.ctl.io_write(0x1F6, 1, 0xF0)
    assert rig.ctl.io_read(STATUS, 1) == 0 and rig.ctl.io_read(ALT, 1) == 0
    rig.ctl.io_write(STATUS, 1, Command.IDENTIFY_DEVICE)
    rig.ctl.io_write(0x1F6, 1, 0xE0)
    assert rig.ctl.io_read(STATUS, 1) == A.IDLE  # the command went nowhere


def test_bus_master_status_bits(rig):
    ctl = rig.ctl
    assert ctl.io_read(BM + 2, 1) == BmStatus.DRIVE0_DMA
    ctl.bm_status |= BmStatus.ERROR | BmStatus.INTERRUPT
    ctl.io_write(BM, 1, BmCmd.START)
    ctl.io_write(BM + 2, 1, BmStatus.ERROR | BmStatus.ACTIVE)  # clears ERROR; ACTIVE is RO
    assert ctl.io_read(BM + 2, 1) == BmStatus.ACTIVE | BmStatus.INTERRUPT
    ctl.io_write(BM, 1, 0)
    assert ctl.io_read(BM + 2, 1) == BmStatus.INTERRUPT
    ctl.io_write(BM + 4, 4, 0x12345677)
    assert ctl.io_read(BM + 4, 4) == 0x12345674  # dword aligned
    assert ctl.io_read(BM + 5, 1) == 0x56


def test_unhandled_ports_and_widths_read_all_ones(rig):
    ctl = rig.ctl
    assert ctl.io_read(0x1F7, 2) == 0xFFFF
    assert ctl.io_read(0x1F0, 4) == 0xFFFFFFFF
    assert ctl.io_read(0x80, 1) == 0xFF
    assert ctl.io_read(0x1F0, 3) == 0
    ctl.io_write(0x1F7, 4, Command.IDENTIFY_DEVICE)  # wrong width: no command
    ctl.io_write(0x1F0, 7, 1)
    assert ctl.stats.unhandled == 6 and ctl.status == A.IDLE
    assert ctl.io_read(0x1F0, 2) == 0xFFFF  # data without DRQ


# --- hostile guest ------------------------------------------------------------------------

FUZZ_SECTORS = 512  # a 256 KiB image: LBAs up to 600 land both inside and past its end
NATURAL = {0x1F0: 2, **dict.fromkeys(range(0x1F1, 0x1F8), 1), ALT: 1, BM: 1, BM + 2: 1, BM + 4: 4}
VALUES = [0x20, 0x30, 0xC8, 0xCA, 0xEC, 0xE7, 0xEF, 0x00, 0x01, 0x08, 0x09, 0xE0, 0x40,
          0x04, 0x02, 0x06, 0xFF, PRD_GPA, PRD_GPA + 8, PRD_GPA + 16, GRANT[1] - 8, 0]
PRD_CHOICES = [PRD_GPA, PRD_GPA + 8, PRD_GPA + 16, GRANT[1] - 8, 0x1000, 0xFFFFFFF8]
word = st.integers(0, 0xFFFF)
# (kind, a, b, c): a raw access anywhere; an access of the register's own width;
# a whole command (device, count, LBA, command); a burst of data-port words; a
# bus-master start with a PRD table address and a direction; a whole DMA command,
# coherent unless the bits of c say otherwise (so that some succeed); a whole
# one-sector PIO command.
fuzz_op = st.one_of(
    st.tuples(st.sampled_from(["in", "out"]), st.integers(0, 0xFFFF),
              st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)),
    st.sampled_from(sorted(NATURAL)).flatmap(lambda p: st.tuples(
        st.sampled_from(["in", "out"]), st.just(p), st.just(NATURAL[p]),
        st.one_of(st.sampled_from(VALUES), st.integers(0, 255)))),
    st.tuples(st.just("cmd"), st.integers(0, 600), st.integers(0, 9),
              st.one_of(st.sampled_from([0x20, 0x30, 0xC8, 0xCA, 0xEC, 0xE7, 0xEF]),
                        st.integers(0, 255))),
    st.tuples(st.just("burst"), st.booleans(),
              st.one_of(st.sampled_from([256, 512]), st.integers(1, 600)), word),
    st.tuples(st.just("bm"), st.sampled_from(PRD_CHOICES), st.booleans(), st.just(0)),
    st.tuples(st.just("dma"), st.integers(0, 600), st.integers(1, 2), st.integers(0, 63)),
    st.tuples(st.just("pio"), st.integers(0, 600), st.booleans(), word),
)


def fuzz_command(ctl: IdeController, lba: int, count: int, cmd: int) -> None:
    for port, v in ((0x1F6, 0xE0 | lba >> 24), (0x1F2, count), (0x1F3, lba & 0xFF),
                    (0x1F4, lba >> 8 & 0xFF), (0x1F5, lba >> 16 & 0xFF), (STATUS, cmd)):
        ctl.io_write(port, 1, v)


def fuzz_apply(ctl: IdeController, op: tuple) -> None:
    kind, a, b, c = op
    if kind == "in":
        assert 0 <= ctl.io_read(a, b) < 1 << 8 * b
    elif kind == "out":
        ctl.io_write(a, b, c)
    elif kind == "cmd":
        fuzz_command(ctl, a, b, c)
    elif kind == "burst":
        for _ in range(b):
            if a:
                ctl.io_write(0x1F0, 2, c)
            else:
                assert 0 <= ctl.io_read(0x1F0, 2) <= 0xFFFF
    elif kind == "pio":  # one sector by PIO, read or written whole
        fuzz_command(ctl, a, 1, Command.WRITE_SECTORS if b else Command.READ_SECTORS)
        fuzz_apply(ctl, ("burst", b, 256, c))
    elif kind == "bm":
        ctl.io_write(BM + 4, 4, a)
        ctl.io_write(BM, 1, (BmCmd.TO_MEMORY if b else 0) | BmCmd.START)
    else:  # c: bit 0 read, bit 1 the table that fits the count, bit 5 the wrong direction
        to_memory = bool(c & 1)
        table = PRD_GPA + 8 * (b - 1) if c & 2 else PRD_CHOICES[(c >> 2) % len(PRD_CHOICES)]
        direction = BmCmd.TO_MEMORY if to_memory != bool(c & 0x20) else 0
        ctl.io_write(BM + 4, 4, table)
        ctl.io_write(BM, 1, direction)
        fuzz_command(ctl, a, b, Command.READ_DMA if to_memory else Command.WRITE_DMA)
        ctl.io_write(BM, 1, direction | BmCmd.START)
        ctl.io_write(BM, 1, direction)


@pytest.fixture(scope="module")
def fuzz_image():
    with tempfile.TemporaryDirectory() as d, \
            open_image(Path(d) / "fuzz.img", FUZZ_SECTORS * 512) as img:
        yield img


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(fuzz_op, max_size=40), st.binary(min_size=40, max_size=40))
def test_random_port_accesses_never_raise_or_escape(fuzz_image, ops, junk):
    mem = FakeGuestMemory()
    # PRD tables at the addresses the ops pick: one and two sectors, then junk
    mem.ram[PRD_GPA : PRD_GPA + 16] = prd((DATA_GPA, 512, True), (DATA_GPA, 1024, True))
    mem.ram[PRD_GPA + 16 : PRD_GPA + 48] = junk[:32]
    mem.ram[GRANT[1] - 8 : GRANT[1]] = junk[32:]
    before = mem.outside()
    ctl = IdeController(fuzz_image, mem)
    for op in ops:
        fuzz_apply(ctl, op)
    assert mem.outside() == before
    assert os.fstat(fuzz_image.fd).st_size == FUZZ_SECTORS * 512
    s = ctl.stats
    # no amplification: no op above moves more than 3 sectors between image and guest
    assert s.read_bytes + s.write_bytes <= 3 * 512 * len(ops)
    # whatever state the guest left, a reset and a stopped bus master bring it back
    ctl.io_write(ALT, 1, A.DevCtl.SRST)
    ctl.io_write(ALT, 1, A.DevCtl.NIEN)
    ctl.io_write(BM, 1, 0)
    drv = IdeDriver(DirectPortIO(ctl), DmaBuffer(PRD_GPA, memoryview(mem.ram)[PRD_GPA:]))
    drv.write_pio(3, b"\x42" * 512)
    drv.read_dma(3, 1, DATA_GPA)
    assert mem.ram[DATA_GPA : DATA_GPA + 512] == b"\x42" * 512
