"""Fuzz the emulated IDE controller (``partitions.storage.ata.IdeController``)
with the port accesses a child's driver makes: a sequence of reads and writes
(port, width, value) over the task file, device control and the bus master,
with guest memory (the PRD table and the buffers it names) written by the
input too, so DMA commands run against hostile tables.

Allowed: nothing (``io_read`` / ``io_write`` never raise: a bad register
value or PRD entry ends the command with an error status).  Also checked: an
``in`` returns a value of its width; nothing outside the child's granted
window of guest memory changes; the image never grows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

from _fuzzlib import Reader, Writer, instrumented, main

with instrumented():
    from hv.partition_memory import GpaError
    from partitions.devices.storage.disk import DiskImage, open_image
    from partitions.devices.storage.ide import ata as A

KiB = 1 << 10
DISK_BYTES = 64 * KiB  # 128 sectors
RAM_BYTES = 128 * KiB
GRANT = (16 * KiB, 112 * KiB)  # what the child granted: [lo, hi)
PRD_GPA = 16 * KiB
DATA_GPA = 32 * KiB
PORTS = [0x1F0, 0x1F1, 0x1F2, 0x1F3, 0x1F4, 0x1F5, 0x1F6, 0x1F7, 0x3F6, 0xC000, 0xC002,
         0xC004, 0xC001, 0xC005, 0x1F0, 0x1F7, 0x170, None]
SIZES = [1, 1, 1, 2, 4, 3, 0]
IN, OUT, POKE, PRD = range(4)
STEPS = [IN, IN, OUT, OUT, OUT, POKE, PRD]
_dir: str | None = None
_image: DiskImage | None = None


class _Memory:
    """Guest RAM; only GRANT is reachable (``view`` is what the worker may touch)."""

    def __init__(self) -> None:
        self.ram = bytearray(b"\xaa" * RAM_BYTES)

    def view(self, gpa: int, length: int) -> memoryview:
        if length <= 0 or gpa < GRANT[0] or gpa + length > GRANT[1]:
            raise GpaError(f"GPA {gpa:#x}+{length} is not granted")
        return memoryview(self.ram)[gpa : gpa + length]

    def outside(self) -> bytes:
        return bytes(self.ram[: GRANT[0]]) + bytes(self.ram[GRANT[1] :])


def _the_image() -> DiskImage:
    global _dir, _image
    if _image is None:
        _dir = tempfile.mkdtemp(prefix="viridian-fuzz-ide-")
        _image = open_image(os.path.join(_dir, "disk.img"), DISK_BYTES)
    return _image


def close() -> None:
    global _dir, _image
    if _image is not None:
        _image.close()
        _image = None
    if _dir is not None:
        shutil.rmtree(_dir, ignore_errors=True)
        _dir = None


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    image = _the_image()
    mem = _Memory()
    irqs: list[int] = []
    ctl = A.IdeController(image, mem, irq=lambda: irqs.append(1))
    outside = mem.outside()
    for _ in range(200):
        if not r.left():
            break
        step = r.pick(STEPS)
        if step in (IN, OUT):
            port = r.pick(PORTS)
            if port is None:
                port = r.u16()
            size = r.pick(SIZES)
            if step == IN:
                v = ctl.io_read(port, size)
                assert 0 <= v < 1 << 8 * max(size, 1) or size not in (1, 2, 4), (port, size, v)
            else:
                ctl.io_write(port, size, r.u32())
        elif step == POKE:  # the guest writes its memory (buffers, or anywhere granted)
            off = r.below(GRANT[1] - GRANT[0]) + GRANT[0]
            b = r.chunk(64)[: GRANT[1] - off]
            mem.ram[off : off + len(b)] = b
        else:  # a PRD table at PRD_GPA: up to 4 entries near the data buffers
            entries = []
            for _ in range(r.below(4) + 1):
                addr = r.pick([DATA_GPA, DATA_GPA + 512, GRANT[1] - 512, 0, 3, None])
                if addr is None:
                    addr = r.u32()
                count = r.pick([512, 1024, 0, 4096, 1, None])
                if count is None:
                    count = r.u16()
                entries.append((addr & 0xFFFFFFFF, count & 0xFFFF, r.pick([0, A.PRD_EOT, 1])))
            raw = b"".join(A.PRD_ENTRY.pack(*e) for e in entries)
            mem.ram[PRD_GPA : PRD_GPA + len(raw)] = raw
    assert mem.outside() == outside, "the controller wrote guest memory the child did not grant"
    assert os.fstat(image.fd).st_size == DISK_BYTES


def _out(w: Writer, port: int, size: int, value: int) -> Writer:
    return w.pick(STEPS, OUT).pick(PORTS, port).pick(SIZES, size).u32(value)


def _in(w: Writer, port: int, size: int) -> Writer:
    return w.pick(STEPS, IN).pick(PORTS, port).pick(SIZES, size)


def _taskfile(w: Writer, lba: int, count: int, cmd: int) -> Writer:
    _out(w, 0x1F2, 1, count)
    for i, port in enumerate((0x1F3, 0x1F4, 0x1F5)):
        _out(w, port, 1, lba >> 8 * i & 0xFF)
    _out(w, 0x1F6, 1, A.DEVICE_LBA | lba >> 24 & 0x0F)
    return _out(w, 0x1F7, 1, cmd)


def seeds() -> Iterator[bytes]:
    # IDENTIFY, then the whole block by PIO
    w = _in(Writer(), 0x1F7, 1)
    _taskfile(w, 0, 1, A.Command.IDENTIFY_DEVICE)
    for _ in range(256):
        _in(w, 0x1F0, 2)
    yield _in(w, 0x1F7, 1).done()
    # WRITE SECTORS (PIO) of one sector, READ SECTORS of it back
    w = _taskfile(Writer(), 5, 1, A.Command.WRITE_SECTORS)
    for i in range(256):
        _out(w, 0x1F0, 2, i)
    _taskfile(w, 5, 1, A.Command.READ_SECTORS)
    for _ in range(8):
        _in(w, 0x1F0, 2)
    yield _in(w, 0x1F7, 1).done()
    # READ DMA and WRITE DMA of two sectors through a two-entry PRD table
    for cmd, to_memory in ((A.Command.READ_DMA, True), (A.Command.WRITE_DMA, False)):
        w = Writer().pick(STEPS, PRD).below(4, 1)
        w.below(6, 0).below(6, 0).below(3, 0)
        w.below(6, 1).below(6, 0).below(3, 1)
        _out(w, 0xC004, 4, PRD_GPA)
        _out(w, 0xC002, 1, A.BmStatus.ERROR | A.BmStatus.INTERRUPT)
        _out(w, 0xC000, 1, A.BmCmd.TO_MEMORY if to_memory else 0)
        _taskfile(w, 10, 2, cmd)
        _out(w, 0xC000, 1, A.BmCmd.START | (A.BmCmd.TO_MEMORY if to_memory else 0))
        _in(w, 0xC002, 1)
        _out(w, 0xC000, 1, 0)
        yield _in(w, 0x1F7, 1).done()
    # a software reset, FLUSH CACHE, SET FEATURES
    w = _out(Writer(), 0x3F6, 1, A.DevCtl.SRST | A.DevCtl.NIEN)
    _out(w, 0x3F6, 1, 0)
    _taskfile(w, 0, 0, A.Command.FLUSH_CACHE)
    _taskfile(w, 0, 0, A.Command.SET_FEATURES)
    yield _in(w, 0x1F1, 1).done()


if __name__ == "__main__":
    main(TestOneInput)
