"""The guest side of the emulated IDE disk: a small polling ATA driver (sans-IO).

Layer: partitions/devices/storage (child side).  It drives the channel the way a simple
real driver does (OSDev's PIO driver, Linux libata-sff's bus-master path): wait
for BSY to clear, program the task file, poll status for DRQ and move 256 words
per sector through the data port; for DMA, write a PRD table into its own DMA
buffer, program the bus master (table address, clear status, direction), issue
the command, set START, wait for the interrupt or poll the bus master status,
clear START and read the device status.

Each ``inb``/``outb``/... of ``port_io`` is a trap to the supervisor once the
driver runs in a child, so the driver counts them (``port_accesses``,
``last_op_accesses``): the benchmark reports traps per operation.  The emulated
device is never busy between accesses, so every poll here succeeds at its first
read; a real driver on real hardware adds a few (and a 400 ns delay of four
alternate-status reads after selecting the device, which we leave out).

Accesses per operation (n = sectors): PIO read or write 8 + 257 n (512 B: 265,
4 KiB: 2064, 64 KiB: 32904); DMA read or write 14 whatever the size;
IDENTIFY 261; FLUSH CACHE 4.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..disk import SECTOR_SIZE
from .ata import (
    BM_BASE,
    PRD_ENTRY,
    PRD_EOT,
    PRIMARY_BASE,
    PRIMARY_CTRL,
    BmCmd,
    BmStatus,
    Command,
    DevCtl,
    Status,
)

__all__ = ["DirectPortIO", "DmaBuffer", "IdeDriver", "IdeError", "Identity", "PortIO"]

MAX_POLLS = 100_000  # a poll loop that long means the device is gone: IdeError
_DEVICE_LBA = 0xE0  # device register: LBA (bit 6) plus the obsolete bits 7 and 5 set, device 0
_DATA = 0


class PortIO(Protocol):
    """Port I/O as the guest issues it (each call a trapping access later)."""

    def inb(self, port: int) -> int: ...
    def inw(self, port: int) -> int: ...
    def inl(self, port: int) -> int: ...
    def outb(self, port: int, value: int) -> None: ...
    def outw(self, port: int, value: int) -> None: ...
    def outl(self, port: int, value: int) -> None: ...


class _Device(Protocol):
    def io_read(self, port: int, size: int) -> int: ...
    def io_write(self, port: int, size: int, value: int) -> None: ...


class DirectPortIO:
    """``PortIO`` straight into a device model's ``io_read``/``io_write`` (no trap)."""

    def __init__(self, device: _Device) -> None:
        self.device = device

    def inb(self, port: int) -> int:
        return self.device.io_read(port, 1)

    def inw(self, port: int) -> int:
        return self.device.io_read(port, 2)

    def inl(self, port: int) -> int:
        return self.device.io_read(port, 4)

    def outb(self, port: int, value: int) -> None:
        self.device.io_write(port, 1, value)

    def outw(self, port: int, value: int) -> None:
        self.device.io_write(port, 2, value)

    def outl(self, port: int, value: int) -> None:
        self.device.io_write(port, 4, value)


@dataclass(frozen=True, slots=True)
class DmaBuffer:
    """Guest memory the driver owns for its PRD table: ``mem`` is the child's view
    of [gpa, gpa + len(mem))."""

    gpa: int
    mem: memoryview


class IdeError(Exception):
    """A command ended with ERR (or the bus master with ERROR), or no device answered."""

    def __init__(self, msg: str, status: int = 0, error: int = 0, bm_status: int = 0) -> None:
        super().__init__(f"{msg} (status {status:#04x}, error {error:#04x}, "
                         f"bus master {bm_status:#04x})")
        self.status, self.error, self.bm_status = status, error, bm_status


def _ata_string(words: tuple[int, ...]) -> str:
    return b"".join(struct.pack(">H", w) for w in words).decode("ascii", "replace").strip()


@dataclass(frozen=True, slots=True)
class Identity:
    """The fields of IDENTIFY DEVICE a driver uses; ``words`` is all 256."""

    words: tuple[int, ...]

    @property
    def model(self) -> str:
        return _ata_string(self.words[27:47])

    @property
    def serial(self) -> str:
        return _ata_string(self.words[10:20])

    @property
    def sectors_lba28(self) -> int:
        return self.words[60] | self.words[61] << 16

    @property
    def sectors_lba48(self) -> int:
        return sum(self.words[100 + i] << 16 * i for i in range(4))

    @property
    def supports_lba(self) -> bool:
        return bool(self.words[49] & 1 << 9)

    @property
    def supports_dma(self) -> bool:
        return bool(self.words[49] & 1 << 8)

    @property
    def supports_lba48(self) -> bool:  # word 83 counts only with bits 15:14 = 01
        return self.words[83] & 0xC000 == 0x4000 and bool(self.words[83] & 1 << 10)

    @property
    def checksum_ok(self) -> bool:
        w = self.words[255]
        return w & 0xFF != 0xA5 or sum(struct.pack("<256H", *self.words)) % 256 == 0


F = TypeVar("F", bound=Callable[..., Any])


def _op(fn: F) -> F:
    """Record the port accesses of one public operation in ``last_op_accesses``."""

    @functools.wraps(fn)
    def wrapper(self: IdeDriver, *args: Any, **kwargs: Any) -> Any:
        start = self.port_accesses
        try:
            return fn(self, *args, **kwargs)
        finally:
            self.last_op_accesses = self.port_accesses - start

    return wrapper  # type: ignore[return-value]


class IdeDriver:
    """A polling driver for device 0 of one IDE channel.

    Args:
        port_io: where ``in``/``out`` go.
        dma_buffer: memory for the PRD table (needed for DMA only); 4-byte aligned.
        interrupts: leave the device interrupt enabled (nIEN clear) and take it in
            ``interrupt()``; otherwise nIEN is set and the driver only polls.
        base, ctrl, bm_base: the channel's ports (defaults: the primary channel,
            bus master at 0xC000).
    """

    def __init__(self, port_io: PortIO, dma_buffer: DmaBuffer | None = None, *,
                 interrupts: bool = False, base: int = PRIMARY_BASE,
                 ctrl: int = PRIMARY_CTRL, bm_base: int = BM_BASE) -> None:
        if dma_buffer is not None and (dma_buffer.gpa % 4 or len(dma_buffer.mem) < 8):
            raise ValueError("the DMA buffer must be 4-byte aligned and hold a PRD entry")
        self.io = port_io
        self.dma_buffer = dma_buffer
        self.interrupts = interrupts
        self.base, self.ctrl, self.bm_base = base, ctrl, bm_base
        self.port_accesses = 0
        self.last_op_accesses = 0
        self.irqs_seen = 0
        self._irq = False
        self._outb(ctrl, 0 if interrupts else DevCtl.NIEN)

    # --- counted port access --------------------------------------------------------------

    def _inb(self, port: int) -> int:
        self.port_accesses += 1
        return self.io.inb(port)

    def _outb(self, port: int, value: int) -> None:
        self.port_accesses += 1
        self.io.outb(port, value)

    def interrupt(self) -> None:
        """The device's interrupt (wire the controller's ``irq`` here)."""
        self.irqs_seen += 1
        self._irq = True

    # --- protocol steps -------------------------------------------------------------------

    def _wait_not_busy(self) -> int:
        for _ in range(MAX_POLLS):
            st = self._inb(self.base + 7)
            if not st & Status.BSY:
                return st
        raise IdeError("device stays busy", st)

    def _check(self, st: int, what: str, *, want_drq: bool = False) -> None:
        if st & (Status.ERR | Status.DF):
            raise IdeError(f"{what} failed", st, self._inb(self.base + 1))
        if st == 0 or st == 0xFF:
            raise IdeError(f"{what}: no device", st)
        if want_drq and not st & Status.DRQ:
            raise IdeError(f"{what}: the device asks for no data", st)

    def _issue(self, lba: int, count: int, cmd: Command) -> None:
        """Program the LBA28 task file and write the command (6 accesses)."""
        if not 1 <= count <= 256 or lba < 0 or lba + count > 1 << 28:
            raise ValueError(f"LBA28 cannot address {count} sectors at {lba}")
        b = self.base
        self._outb(b + 6, _DEVICE_LBA | lba >> 24 & 0x0F)
        self._outb(b + 2, count & 0xFF)  # 256 is written as 0
        self._outb(b + 3, lba & 0xFF)
        self._outb(b + 4, lba >> 8 & 0xFF)
        self._outb(b + 5, lba >> 16 & 0xFF)
        self._outb(b + 7, cmd)

    # --- operations -----------------------------------------------------------------------

    @_op
    def identify(self) -> Identity:
        """IDENTIFY DEVICE by PIO."""
        self._wait_not_busy()
        self._outb(self.base + 6, _DEVICE_LBA)
        self._outb(self.base + 7, Command.IDENTIFY_DEVICE)
        self._check(self._wait_not_busy(), "IDENTIFY", want_drq=True)
        self.port_accesses += 256
        inw, data = self.io.inw, self.base + _DATA
        words = tuple(inw(data) for _ in range(256))
        self._check(self._inb(self.base + 7), "IDENTIFY")
        return Identity(words)

    @_op
    def read_pio(self, lba: int, count: int, into: bytearray | memoryview) -> None:
        """READ SECTORS: ``count`` (1-256) sectors at ``lba`` into ``into``."""
        mv = memoryview(into).cast("B")
        if mv.nbytes < count * SECTOR_SIZE or mv.readonly:
            raise ValueError(f"need a writable buffer of {count * SECTOR_SIZE} bytes")
        self._wait_not_busy()
        self._issue(lba, count, Command.READ_SECTORS)
        inw, data = self.io.inw, self.base + _DATA
        for s in range(count):
            self._check(self._wait_not_busy(), "READ SECTORS", want_drq=True)
            self.port_accesses += SECTOR_SIZE // 2
            for i in range(s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE, 2):
                w = inw(data)
                mv[i] = w & 0xFF
                mv[i + 1] = w >> 8
        self._check(self._inb(self.base + 7), "READ SECTORS")

    @_op
    def write_pio(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        """WRITE SECTORS: ``data`` (a whole number of sectors, at most 256) to ``lba``."""
        mv = memoryview(data).cast("B")
        count, rest = divmod(mv.nbytes, SECTOR_SIZE)
        if rest:
            raise ValueError(f"{mv.nbytes} bytes is not a whole number of sectors")
        self._wait_not_busy()
        self._issue(lba, count, Command.WRITE_SECTORS)
        outw, port = self.io.outw, self.base + _DATA
        for s in range(count):
            self._check(self._wait_not_busy(), "WRITE SECTORS", want_drq=True)
            self.port_accesses += SECTOR_SIZE // 2
            for i in range(s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE, 2):
                outw(port, mv[i] | mv[i + 1] << 8)
        self._check(self._wait_not_busy(), "WRITE SECTORS")

    @_op
    def flush(self) -> None:
        """FLUSH CACHE: the device's data reaches the image's storage."""
        self._wait_not_busy()
        self._outb(self.base + 6, _DEVICE_LBA)
        self._outb(self.base + 7, Command.FLUSH_CACHE)
        self._check(self._wait_not_busy(), "FLUSH CACHE")

    def build_prd(self, buffer_gpa: int, nbytes: int) -> int:
        """Write a PRD table for the contiguous buffer [buffer_gpa, +nbytes) into the
        DMA buffer; returns the table's GPA.  Regions are at most 64 KiB and never
        cross a 64 KiB boundary (the rule PIIX-style bus masters impose)."""
        if self.dma_buffer is None:
            raise ValueError("this driver has no DMA buffer")
        if buffer_gpa % 2 or nbytes <= 0 or nbytes % 2 or buffer_gpa + nbytes > 1 << 32:
            raise ValueError(f"cannot DMA {nbytes} bytes at {buffer_gpa:#x}")
        entries = []
        gpa, end = buffer_gpa, buffer_gpa + nbytes
        while gpa < end:
            n = min(end, (gpa | 0xFFFF) + 1) - gpa
            entries.append((gpa, n))
            gpa += n
        mem = self.dma_buffer.mem
        if len(entries) * PRD_ENTRY.size > len(mem):
            raise ValueError(f"{len(entries)} PRD entries do not fit the DMA buffer")
        for i, (a, n) in enumerate(entries):
            flags = PRD_EOT if i == len(entries) - 1 else 0
            PRD_ENTRY.pack_into(mem, i * PRD_ENTRY.size, a, n & 0xFFFF, flags)  # 64 KiB is 0
        return self.dma_buffer.gpa

    @_op
    def read_dma(self, lba: int, count: int, buffer_gpa: int) -> None:
        """READ DMA: ``count`` sectors at ``lba`` into guest memory at ``buffer_gpa``."""
        prd = self.build_prd(buffer_gpa, count * SECTOR_SIZE)
        self._dma(lba, count, prd, to_memory=True)

    @_op
    def write_dma(self, lba: int, count: int, buffer_gpa: int) -> None:
        """WRITE DMA: ``count`` sectors from guest memory at ``buffer_gpa`` to ``lba``."""
        prd = self.build_prd(buffer_gpa, count * SECTOR_SIZE)
        self._dma(lba, count, prd, to_memory=False)

    @_op
    def run_dma(self, lba: int, count: int, prd_gpa: int, *, to_memory: bool) -> None:
        """READ/WRITE DMA with a PRD table the caller already wrote at ``prd_gpa``."""
        self._dma(lba, count, prd_gpa, to_memory=to_memory)

    def _dma(self, lba: int, count: int, prd_gpa: int, *, to_memory: bool) -> None:
        bm = self.bm_base
        direction = BmCmd.TO_MEMORY if to_memory else 0
        self._wait_not_busy()
        self.port_accesses += 1
        self.io.outl(bm + 4, prd_gpa)
        self._outb(bm + 2, BmStatus.INTERRUPT | BmStatus.ERROR)  # write 1 to clear both
        self._outb(bm, direction)  # direction first, START clear
        self._irq = False
        self._issue(lba, count, Command.READ_DMA if to_memory else Command.WRITE_DMA)
        self._outb(bm, direction | BmCmd.START)
        # With interrupts on, the trapped OUT above returns after the interrupt was
        # delivered: one status read follows.  Polling reads until INTERRUPT or ERROR.
        for _ in range(MAX_POLLS):
            bm_st = self._inb(bm + 2)
            if bm_st & (BmStatus.INTERRUPT | BmStatus.ERROR) or self._irq:
                break
        else:
            raise IdeError("DMA never completed", bm_status=bm_st)
        self._outb(bm, direction)  # clear START
        st = self._inb(self.base + 7)  # also acknowledges the device interrupt
        what = "READ DMA" if to_memory else "WRITE DMA"
        if bm_st & BmStatus.ERROR:
            raise IdeError(f"{what}: bus master error", st, self._inb(self.base + 1), bm_st)
        self._check(st, what)
