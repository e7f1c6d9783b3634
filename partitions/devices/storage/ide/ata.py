"""An emulated IDE disk: one ATA channel, one device, PIO and bus-master DMA (sans-IO).

Layer: partitions/devices/storage (root side).  Issue 7's "trapped" storage path: every
port access the child makes is trapped by the supervisor and handed to a worker
in the root, which calls ``IdeController.io_read`` / ``io_write``.  This module
is only the device model: no processes, no sockets; the guest's memory comes in
through ``GuestMemoryAccess`` and the interrupt goes out through ``irq()``.

Port map (defaults; each base is a constructor argument)::

    0x1F0       data (16-bit), PIO transfers while DRQ is set
    0x1F1       read: error          write: features
    0x1F2       sector count (0 means 256)
    0x1F3-0x1F5 LBA bits 0-7, 8-15, 16-23
    0x1F6       device: LBA bits 24-27, bit 4 DEV (1 = device 1, absent), bit 6 LBA
    0x1F7       read: status (acknowledges the interrupt)   write: command
    0x3F6       read: alternate status (no acknowledge)     write: device control
                (bit 1 nIEN masks the interrupt, bit 2 SRST resets the device)
    0xC000      bus master command (bit 0 start, bit 3 direction: 1 = to memory)
    0xC002      bus master status (bit 0 active, bit 1 error, bit 2 interrupt;
                1 and 2 are write-1-to-clear; 5 and 6 "drive DMA capable" are plain bits)
    0xC004      PRD table address (32-bit access; bits 0-1 are ignored)

The bus master block is what PCI BAR4 of a PIIX-style controller holds
(SFF-8038i); 0xC000 is where we put it.  Names and bits follow Linux
``include/linux/ata.h`` and QEMU ``hw/ide/pci.h`` (whose ``BM_CMD_READ`` is
our ``TO_MEMORY``, Linux ``ATA_DMA_WR``: the bus master writes memory, an ATA read).

Emulated: READ SECTORS (0x20), WRITE SECTORS (0x30), READ DMA (0xC8), WRITE DMA
(0xCA) with 28-bit LBA; IDENTIFY DEVICE (0xEC); FLUSH CACHE (0xE7); SET FEATURES
(0xEF, accepted and ignored).  Anything else ends with ERR and ABRT.  CHS
addressing (device bit 6 clear) is refused with ABRT.  The 48-bit commands are
not emulated: IDENTIFY fills the LBA48 capacity words 100-103 but leaves
word 83 bit 10 clear, so a driver does not use them.  The device is never busy
between accesses: each command runs to its next DRQ block or to completion
inside the port write that issued it.

Trust: the guest is hostile.  Every register value, every PRD table entry and
every address in it is checked before use; a bad one ends the command with an
error status, never with an exception and never with a byte read or written
outside the image or outside what ``GuestMemoryAccess.view`` grants.  A DMA
command's whole PRD table is read (one private copy per entry) and every region
mapped before the first byte moves, so a refused command transfers nothing and a
guest rewriting its table meanwhile changes nothing we act on.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from hv.memwire import GuestMemoryError

from ..disk import (
    SECTOR_SIZE,
    DiskImage,
    DiskImageError,
    pread_into,
    preadv_into,
    pwrite_from,
    pwritev_from,
)

__all__ = [
    "BM_BASE",
    "IDE_PORTS",
    "MAX_PRD_ENTRIES",
    "MODEL",
    "PRD_ENTRY",
    "PRD_EOT",
    "PRIMARY_BASE",
    "PRIMARY_CTRL",
    "BmCmd",
    "BmStatus",
    "Command",
    "DevCtl",
    "Error",
    "GuestMemoryAccess",
    "IdeController",
    "IdeStats",
    "Status",
    "identify_data",
]

PRIMARY_BASE = 0x1F0
PRIMARY_CTRL = 0x3F6
BM_BASE = 0xC000
#: The ports this controller claims, as (first port, count): the primary
#: channel's task file, its device control / alternate status, the bus master.
#: The root hands them to hv's intercept routing (hv knows no device's ports).
IDE_PORTS = ((PRIMARY_BASE, 8), (PRIMARY_CTRL, 1), (BM_BASE, 8))
#: A PRD table longer than this is refused (Linux builds at most 128-256 entries).
MAX_PRD_ENTRIES = 512
PRD_ENTRY = struct.Struct("<IHH")  # physical address u32, byte count u16 (0 = 64 KiB), flags u16
PRD_EOT = 0x8000  # end of table: bit 15 of the flags word (bit 31 of the second dword)
MODEL = "VIRIDIAN IDE DISK"
LBA28_MAX_SECTORS = (1 << 28) - 1  # words 60-61 saturate here


class Status(enum.IntFlag):
    """Status register (0x1F7, 0x3F6)."""

    ERR = 0x01
    DRQ = 0x08
    DSC = 0x10  # seek complete: obsolete, set when idle as drives (and QEMU) do
    DF = 0x20
    DRDY = 0x40
    BSY = 0x80


class Error(enum.IntFlag):
    """Error register (0x1F1) after a command that set ERR."""

    ABRT = 0x04
    IDNF = 0x10
    UNC = 0x40


class DevCtl(enum.IntFlag):
    """Device control register (0x3F6, write)."""

    NIEN = 0x02
    SRST = 0x04


class Command(enum.IntEnum):
    READ_SECTORS = 0x20
    WRITE_SECTORS = 0x30
    READ_DMA = 0xC8
    WRITE_DMA = 0xCA
    FLUSH_CACHE = 0xE7
    IDENTIFY_DEVICE = 0xEC
    SET_FEATURES = 0xEF


class BmCmd(enum.IntFlag):
    START = 0x01
    TO_MEMORY = 0x08  # Linux ATA_DMA_WR, QEMU BM_CMD_READ, Intel "RWCON = writes"


class BmStatus(enum.IntFlag):
    ACTIVE = 0x01
    ERROR = 0x02
    INTERRUPT = 0x04
    DRIVE0_DMA = 0x20
    DRIVE1_DMA = 0x40


DEVICE_LBA = 0x40  # device register: LBA addressing
DEVICE_DEV1 = 0x10  # device register: device 1 selected (we have none)
IDLE = Status.DRDY | Status.DSC
#: After SRST the device holds its signature: count 1, LBA 1/0/0 ("an ATA device").
_DIAG_OK = 0x01

_PIO_IN, _PIO_OUT = 1, 2


class GuestMemoryAccess(Protocol):
    """What the controller may touch of the child's memory (root side)."""

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable byte view of [gpa, gpa+length).

        Raises:
            GuestMemoryError: any part outside what the child granted (``GpaError``).
        """
        ...


@dataclass(slots=True)
class IdeStats:
    """Counters; ``*_ops`` count commands that moved all their data."""

    port_reads: int = 0
    port_writes: int = 0
    unhandled: int = 0  # accesses to no register (wrong port or width)
    read_ops: int = 0
    write_ops: int = 0
    dma_ops: int = 0  # of read_ops + write_ops, those done by DMA
    flush_ops: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    errors: int = 0  # commands ended with ERR
    irqs: int = 0  # interrupts delivered through irq()

    @property
    def port_accesses(self) -> int:
        return self.port_reads + self.port_writes

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _string_words(s: str, nwords: int) -> list[int]:
    # ATA strings: space-padded, two characters per word, the first in the high byte
    b = s.encode("ascii").ljust(2 * nwords)[: 2 * nwords]
    return [b[i] << 8 | b[i + 1] for i in range(0, 2 * nwords, 2)]


def identify_data(sectors: int, model: str = MODEL, serial: str = "VIRIDIAN0001",
                  firmware: str = "0.1") -> bytes:
    """The 512-byte IDENTIFY DEVICE block of a fixed ATA disk of ``sectors`` sectors."""
    w = [0] * 256
    w[0] = 0x0040  # ATA device (bit 15 clear), fixed (bit 6)
    # Obsolete CHS geometry, for drivers that still look: 16 heads, 63 sectors/track
    w[1], w[3], w[6] = min(sectors // (16 * 63), 16383), 16, 63
    w[10:20] = _string_words(serial, 10)
    w[23:27] = _string_words(firmware, 4)
    w[27:47] = _string_words(model, 20)
    w[47] = 0x8000  # READ/WRITE MULTIPLE: 0 sectors, not supported
    w[49] = 1 << 9 | 1 << 8  # LBA supported, DMA supported
    w[50] = 0x4000  # bit 14 shall be one
    w[51] = 0x0200  # obsolete PIO timing mode 2
    w[53] = 0x0002  # words 64-70 are valid
    lba28 = min(sectors, LBA28_MAX_SECTORS)
    w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
    w[63] = 0x0407  # multiword DMA modes 0-2 supported, mode 2 selected
    w[64] = 0x0003  # PIO modes 3 and 4
    w[65] = w[66] = w[67] = w[68] = 120  # cycle times, ns
    w[80] = 0x0070  # ATA-4 to ATA-6
    w[83] = 0x4000 | 1 << 12  # valid (bits 15:14 = 01); FLUSH CACHE; no LBA48 commands
    w[84] = w[87] = 0x4000
    w[86] = 1 << 12  # FLUSH CACHE enabled
    for i in range(4):  # words 100-103: the full capacity, 48 bits
        w[100 + i] = sectors >> (16 * i) & 0xFFFF
    body = struct.pack("<255H", *w[:255])
    # Word 255: signature 0xA5 and a checksum making all 512 bytes sum to 0 mod 256
    w[255] = ((-(sum(body) + 0xA5)) & 0xFF) << 8 | 0xA5
    return body + struct.pack("<H", w[255])


class IdeController:
    """One IDE channel with one ATA disk (device 0) backed by ``image``.

    Args:
        image: the open disk image (its size is the disk's).
        memory: the child's granted memory, for DMA.
        irq: called when the device raises its interrupt (INTRQ) and nIEN is clear.
        base, ctrl, bm_base: the command block, control and bus master ports.
    """

    def __init__(self, image: DiskImage, memory: GuestMemoryAccess,
                 irq: Callable[[], None] | None = None, *, base: int = PRIMARY_BASE,
                 ctrl: int = PRIMARY_CTRL, bm_base: int = BM_BASE) -> None:
        self.image = image
        self.memory = memory
        self.irq: Callable[[], None] = irq or (lambda: None)
        self.base, self.ctrl, self.bm_base = base, ctrl, bm_base
        self.sectors = image.size_bytes // SECTOR_SIZE
        self.stats = IdeStats()
        self.identify_block = identify_data(self.sectors)
        self.nien = False
        self._srst = False
        self.bm_cmd = 0
        self.bm_status: int = BmStatus.DRIVE0_DMA  # firmware would set this; we do
        self.prd_addr = 0
        #: Why the last DMA command was refused (for humans and tests), or "".
        self.last_dma_error = ""
        self._buf = bytearray(SECTOR_SIZE)
        self._reset_device()

    # --- state --------------------------------------------------------------------------

    def _reset_device(self) -> None:
        """Power-on / SRST state: idle, signature of an ATA device in the task file."""
        self.status: int = IDLE
        self.error = _DIAG_OK
        self.features = 0
        self.count, self.lba_low, self.lba_mid, self.lba_high, self.device = 1, 1, 0, 0, 0
        self.intrq = False
        self._pio = 0  # 0, _PIO_IN or _PIO_OUT while DRQ is set
        self._pos = 0  # byte offset in _buf
        self._remaining = 0  # sectors left in this PIO command, the current one included
        self._lba = 0  # sector in _buf
        self._dma: tuple[bool, int, int] | None = None  # (to_memory, lba, count) awaiting START

    # --- port access ----------------------------------------------------------------------

    def io_read(self, port: int, size: int) -> int:
        """The value an ``in`` of ``size`` bytes (1, 2 or 4) at ``port`` returns.

        Unknown ports and widths read as all ones (an undriven bus) and count
        as ``unhandled``.
        """
        self.stats.port_reads += 1
        off = port - self.base
        if off == 0 and size == 2:  # the PIO hot path: 256 of these per sector
            return self._read_data()
        if size == 1:
            if 0 < off < 8:
                return self._read_taskfile(off)
            if port == self.ctrl:
                return self._status_value()
            boff = port - self.bm_base
            if boff == 0:
                return self.bm_cmd
            if boff == 2:
                return self.bm_status
            if 4 <= boff < 8:
                return self.prd_addr >> 8 * (boff - 4) & 0xFF
            if boff in (1, 3):  # vendor-specific: nothing here
                return 0
        elif size == 4 and port == self.bm_base + 4:
            return self.prd_addr
        self.stats.unhandled += 1
        return (1 << 8 * size) - 1 if size in (1, 2, 4) else 0

    def io_write(self, port: int, size: int, value: int) -> None:
        """An ``out`` of ``size`` bytes at ``port``; ``value`` is cut to ``size``."""
        self.stats.port_writes += 1
        if size not in (1, 2, 4):
            self.stats.unhandled += 1
            return
        value &= (1 << 8 * size) - 1
        off = port - self.base
        if off == 0 and size == 2:
            self._write_data(value)
            return
        if size == 1:
            if 0 < off < 8:
                self._write_taskfile(off, value)
                return
            if port == self.ctrl:
                self._write_devctl(value)
                return
            boff = port - self.bm_base
            if boff == 0:
                self._write_bm_cmd(value)
                return
            if boff == 2:
                self._write_bm_status(value)
                return
            if boff in (1, 3):
                return
        elif size == 4 and port == self.bm_base + 4:
            self.prd_addr = value & ~3  # the table is dword aligned: bits 0-1 are not there
            return
        self.stats.unhandled += 1

    # --- task file ------------------------------------------------------------------------

    def _status_value(self) -> int:
        if self.device & DEVICE_DEV1:
            return 0  # device 1 is absent: nothing drives the bus (QEMU reads 0 too)
        return int(self.status)

    def _read_taskfile(self, off: int) -> int:
        if off == 7:
            self.intrq = False  # reading status acknowledges the interrupt
            return self._status_value()
        if self.status & Status.BSY:
            return self._status_value()  # while BSY every command block register reads status
        if off == 1:
            return self.error
        if off == 2:
            return self.count
        if off == 3:
            return self.lba_low
        if off == 4:
            return self.lba_mid
        if off == 5:
            return self.lba_high
        return self.device

    def _write_taskfile(self, off: int, v: int) -> None:
        if self.status & Status.BSY:
            return  # the host must not write while BSY; a guest that does is ignored
        if off == 1:
            self.features = v
        elif off == 2:
            self.count = v
        elif off == 3:
            self.lba_low = v
        elif off == 4:
            self.lba_mid = v
        elif off == 5:
            self.lba_high = v
        elif off == 6:
            self.device = v
        else:
            self._command(v)

    def _write_devctl(self, v: int) -> None:
        self.nien = bool(v & DevCtl.NIEN)
        srst = bool(v & DevCtl.SRST)
        if srst != self._srst:
            self._reset_device()  # cancels any PIO or DMA command in flight
            if srst:
                self.status = Status.BSY  # held in reset until SRST is cleared
        self._srst = srst

    # --- commands -------------------------------------------------------------------------

    def _interrupt(self) -> None:
        self.intrq = True
        if not self.nien:
            self.stats.irqs += 1
            self.irq()

    def _complete(self, error: int = 0) -> None:
        """End the command: idle, or ERR with ``error``; raise the interrupt."""
        self._pio = 0
        self.status = IDLE | Status.ERR if error else IDLE
        self.error = error
        if error:
            self.stats.errors += 1
        self._interrupt()

    def _lba_range(self) -> tuple[int, int] | int:
        """(lba, count) of a READ/WRITE command, or the error code refusing it."""
        if not self.device & DEVICE_LBA:
            return Error.ABRT  # CHS addressing is not emulated
        lba = (self.device & 0x0F) << 24 | self.lba_high << 16 | self.lba_mid << 8 | self.lba_low
        count = self.count or 256
        if lba + count > self.sectors:
            return Error.IDNF
        return lba, count

    def _command(self, cmd: int) -> None:
        if self.device & DEVICE_DEV1:
            return  # addressed to the absent device 1
        self.intrq = False
        self._pio = 0
        self._dma = None
        self.error = 0
        if cmd in (Command.READ_SECTORS, Command.WRITE_SECTORS,
                   Command.READ_DMA, Command.WRITE_DMA):
            rng = self._lba_range()
            dma = cmd in (Command.READ_DMA, Command.WRITE_DMA)
            if isinstance(rng, int):
                if dma:  # the bus master sees the interrupt too, so a polling driver stops
                    self.bm_status |= BmStatus.INTERRUPT
                self._complete(rng)
                return
            lba, count = rng
            if dma:
                self._dma = (cmd == Command.READ_DMA, lba, count)
                self.status = IDLE | Status.BSY
                if self.bm_cmd & BmCmd.START:
                    self._run_dma()
            elif cmd == Command.READ_SECTORS:
                self._lba, self._remaining = lba, count
                self._pio_in_next()
            else:
                self._lba, self._remaining, self._pos = lba, count, 0
                self._pio = _PIO_OUT
                self.status = IDLE | Status.DRQ  # PIO out: no interrupt before the first block
        elif cmd == Command.IDENTIFY_DEVICE:
            self._buf[:] = self.identify_block
            self._lba, self._remaining, self._pos = -1, 1, 0
            self._pio = _PIO_IN
            self.status = IDLE | Status.DRQ
            self._interrupt()
        elif cmd == Command.FLUSH_CACHE:
            try:
                os.fdatasync(self.image.fd)
            except OSError:
                self._complete(Error.ABRT)
                return
            self.stats.flush_ops += 1
            self._complete()
        elif cmd == Command.SET_FEATURES:
            self._complete()  # transfer modes and caching are ours to pick: accept
        else:
            self._complete(Error.ABRT)

    # --- PIO ------------------------------------------------------------------------------

    def _pio_in_next(self) -> None:
        """Load sector ``_lba`` and offer it (DRQ plus an interrupt per block)."""
        try:
            pread_into(self.image.fd, self._lba * SECTOR_SIZE, memoryview(self._buf))
        except (OSError, DiskImageError):
            self._complete(Error.UNC)
            return
        self.stats.read_bytes += SECTOR_SIZE
        self._pos = 0
        self._pio = _PIO_IN
        self.status = IDLE | Status.DRQ
        self._interrupt()

    def _read_data(self) -> int:
        if self._pio != _PIO_IN:
            return 0xFFFF  # no DRQ: the device does not drive the bus
        p, b = self._pos, self._buf
        word = b[p] | b[p + 1] << 8
        self._pos = p + 2
        if self._pos == SECTOR_SIZE:
            self._remaining -= 1
            if self._remaining:
                self._lba += 1
                self._pio_in_next()
            else:  # a PIO-in command ends without an interrupt: one preceded each block
                self._pio = 0
                self.status = IDLE
                if self._lba >= 0:  # IDENTIFY reads no sector
                    self.stats.read_ops += 1
        return word

    def _write_data(self, word: int) -> None:
        if self._pio != _PIO_OUT:
            return
        p = self._pos
        self._buf[p] = word & 0xFF
        self._buf[p + 1] = word >> 8
        self._pos = p + 2
        if self._pos < SECTOR_SIZE:
            return
        try:
            pwrite_from(self.image.fd, self._lba * SECTOR_SIZE, memoryview(self._buf))
        except OSError:
            self._complete(Error.ABRT)
            return
        self.stats.write_bytes += SECTOR_SIZE
        self._remaining -= 1
        if self._remaining:
            self._lba += 1
            self._pos = 0
            self._interrupt()  # DRQ stays set: the next block
        else:
            self.stats.write_ops += 1
            self._complete()

    # --- bus master DMA -------------------------------------------------------------------

    def _write_bm_cmd(self, v: int) -> None:
        was = self.bm_cmd & BmCmd.START
        self.bm_cmd = v & (BmCmd.START | BmCmd.TO_MEMORY)
        if v & BmCmd.START and not was:
            self.bm_status |= BmStatus.ACTIVE
            if self._dma is not None:
                self._run_dma()
        elif not v & BmCmd.START and was:
            self.bm_status &= ~BmStatus.ACTIVE  # stop; a command still awaiting DMA waits on

    def _write_bm_status(self, v: int) -> None:
        sticky = self.bm_status & (BmStatus.ERROR | BmStatus.INTERRUPT) & ~v  # write 1 to clear
        caps = v & (BmStatus.DRIVE0_DMA | BmStatus.DRIVE1_DMA)
        self.bm_status = (self.bm_status & BmStatus.ACTIVE) | sticky | caps

    def _prd_views(self, nbytes: int, to_memory: bool) -> list[memoryview] | str:
        """The memory regions of the PRD table at ``prd_addr``, all mapped, or why not."""
        entries: list[tuple[int, int]] = []
        total = 0
        for i in range(MAX_PRD_ENTRIES):
            gpa = self.prd_addr + PRD_ENTRY.size * i
            if gpa + PRD_ENTRY.size > 1 << 32:
                return "the PRD table runs past 4 GiB"
            try:
                raw = bytes(self.memory.view(gpa, PRD_ENTRY.size))  # private copy
            except GuestMemoryError:
                return f"PRD entry {i} at {gpa:#x} is outside granted memory"
            if len(raw) != PRD_ENTRY.size:
                return f"PRD entry {i} at {gpa:#x}: short view"
            addr, count, flags = PRD_ENTRY.unpack(raw)
            count = count or 0x10000
            if addr & 1 or count & 1:
                return f"PRD entry {i}: odd address {addr:#x} or byte count {count}"
            total += count
            if total > nbytes:
                return f"the PRD table holds more than the command's {nbytes} bytes"
            entries.append((addr, count))
            if flags & PRD_EOT:
                break
        else:
            return f"no end-of-table bit in {MAX_PRD_ENTRIES} PRD entries"
        if total != nbytes:
            return f"the PRD table holds {total} bytes, the command {nbytes}"
        views = []
        for addr, count in entries:
            if addr + count > 1 << 32:
                return f"PRD region {addr:#x}+{count} runs past 4 GiB"
            try:
                v = self.memory.view(addr, count)
            except GuestMemoryError:
                return f"PRD region {addr:#x}+{count} is outside granted memory"
            if v.nbytes != count or (to_memory and v.readonly):
                return f"PRD region {addr:#x}+{count}: view of {v.nbytes} bytes"
            views.append(v)
        return views

    def _run_dma(self) -> None:
        """The DMA command is issued and the bus master started: move the data."""
        assert self._dma is not None
        to_memory, lba, count = self._dma
        self._dma = None
        nbytes = count * SECTOR_SIZE
        if bool(self.bm_cmd & BmCmd.TO_MEMORY) != to_memory:
            views: list[memoryview] | str = "the bus master direction does not match the command"
        else:
            views = self._prd_views(nbytes, to_memory)
        if isinstance(views, str):
            # Like a master abort on hardware: the bus master stops with ERROR; the
            # device ends the command with ABRT and interrupts, so the driver wakes.
            self.last_dma_error = views
            self.bm_status = self.bm_status & ~BmStatus.ACTIVE | BmStatus.ERROR | BmStatus.INTERRUPT
            self._complete(Error.ABRT)
            return
        try:
            if to_memory:
                preadv_into(self.image.fd, lba * SECTOR_SIZE, views)
            else:
                pwritev_from(self.image.fd, lba * SECTOR_SIZE, views)
        except (OSError, DiskImageError) as e:
            self.last_dma_error = f"host I/O: {e}"
            self.bm_status = (self.bm_status & ~BmStatus.ACTIVE) | BmStatus.INTERRUPT
            self._complete(Error.UNC if to_memory else Error.ABRT)
            return
        if to_memory:
            self.stats.read_ops += 1
            self.stats.read_bytes += nbytes
        else:
            self.stats.write_ops += 1
            self.stats.write_bytes += nbytes
        self.stats.dma_ops += 1
        self.last_dma_error = ""
        # The table is exhausted exactly (sizes must match), so ACTIVE drops with INTERRUPT
        self.bm_status = (self.bm_status & ~BmStatus.ACTIVE) | BmStatus.INTERRUPT
        self._complete()
