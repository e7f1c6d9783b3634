"""Disks in a child: one block API over an emulated IDE disk or a synthetic SCSI disk.

Layer: partitions (child).  The child's composition root builds
``StorageGuest`` and hands it the ``intercept``, ``root`` and ``workload``
(device "disk") messages.

* ``ide``: the supervisor hands the child its intercept link at boot
  (``intercept`` frame); every port access of ``IdeDriver`` then traps (this
  process stops until the root's device worker answered).  DMA buffers live
  in the child's own memory: 128 KiB of data and a page for the PRD table,
  shared with the root once (the grant the worker may DMA into).
* ``scsi``: the storvsc VSC on the child's storage channel
  (partitions/devices/storage/scsi/device.py) sends SRBs as GPA-direct packets naming
  pages of a buffer pool the child shared at open time.

``BlockDevice`` is what workloads and tests use: ``read(lba, count)``,
``write(lba, data)``, ``flush()``, ``block_size``, ``size_bytes``.  The
``disk`` workload (control op ``workload``, device "disk") runs a
benchmark or writes/checks a pattern, and logs its result (``disk bench``,
``disk pattern`` events in the child's log).
"""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import time
from typing import TYPE_CHECKING, Any, Protocol

from hv.abi import PAGE_SIZE
from hv.intercept.client import InterceptClient

from .ide.driver import DmaBuffer, IdeDriver

if TYPE_CHECKING:
    from hv.wire import Frame
    from partitions.guestmem import PageAllocator
    from partitions.runtime import PartitionRuntime

__all__ = ["BlockDevice", "IdeBlock", "StorageGuest"]

SECTOR = 512
DMA_DATA_BYTES = 128 * 1024


class BlockDevice(Protocol):
    name: str
    path: str  # "ide-pio", "ide-dma", "scsi"
    block_size: int
    size_bytes: int

    def read(self, lba: int, count: int) -> bytes: ...
    def write(self, lba: int, data: bytes) -> None: ...
    def flush(self) -> None: ...


class IdeBlock:
    """The emulated IDE disk through trapped port I/O, by PIO or DMA."""

    block_size = SECTOR

    def __init__(self, guest: StorageGuest, mode: str) -> None:
        self.guest = guest
        self.mode = mode
        self.path = f"ide-{mode}"
        self.name = "ide0"
        self.size_bytes = guest.ide_size

    @property
    def driver(self) -> IdeDriver:
        assert self.guest.ide is not None
        return self.guest.ide

    def read(self, lba: int, count: int) -> bytes:
        if self.mode == "pio":
            buf = bytearray(count * SECTOR)
            self.driver.read_pio(lba, count, buf)
            return bytes(buf)
        data = self.guest.dma_data
        self.driver.read_dma(lba, count, self.guest.dma_data_gpa)
        return bytes(data[: count * SECTOR])

    def write(self, lba: int, data: bytes) -> None:
        count = len(data) // SECTOR
        if self.mode == "pio":
            self.driver.write_pio(lba, data)
            return
        self.guest.dma_data[: len(data)] = data
        self.driver.write_dma(lba, count, self.guest.dma_data_gpa)

    def flush(self) -> None:
        self.driver.flush()


class StorageGuest:
    def __init__(self, rt: PartitionRuntime, disks: list[dict[str, Any]],
                 alloc: PageAllocator | None = None, bus: Any = None) -> None:
        """``alloc``: the guest page allocator (DMA buffers come from it);
        ``bus``: the child's VMBus end (its storvsc channel is the SCSI disk)."""
        self.rt = rt
        self.alloc = alloc
        self.bus = bus
        self.disks = [d for d in disks if isinstance(d, dict)]
        ide = [d for d in self.disks if d.get("bus") == "ide"]
        self.ide_size = int(ide[0].get("size", 0)) if ide else 0
        self.client: InterceptClient | None = None
        self.ide: IdeDriver | None = None
        self.dma_pfn = 0
        self.dma_pages = 1 + DMA_DATA_BYTES // PAGE_SIZE
        self.dma_grant = 0
        self.dma_data: memoryview = memoryview(b"")
        self.prd: memoryview = memoryview(b"")  # the page holding the driver's PRD table
        self.dma_data_gpa = 0

    # -- the runtime's messages ----------------------------------------------------------------
    def on_intercept_frame(self, obj: dict[str, Any], fr: Frame) -> None:
        """``intercept``: the child's end of its intercept link (adopted)."""
        if self.on_intercept(fr.fds):
            fr.fds = []  # adopted

    def on_root_frame(self, obj: dict[str, Any], fr: Frame) -> None:
        if obj.get("state") == "up":
            self.share_dma()  # a new root: its worker needs our DMA pages again

    def on_workload_frame(self, obj: dict[str, Any], fr: Frame) -> bool:
        """``workload`` for the device "disk" (True: taken); others are not ours."""
        if obj.get("device") != "disk":
            return False
        args = obj.get("args")
        self.workload(str(obj.get("action")), args if isinstance(args, dict) else {})
        return True

    # -- the IDE path ------------------------------------------------------------------------
    def on_intercept(self, fds: list[int]) -> bool:
        if len(fds) != 3 or self.client is not None:
            return False
        self.client = InterceptClient(*fds)
        alloc = self.alloc
        if alloc is None:
            from partitions.guestmem import PageAllocator

            alloc = self.alloc = PageAllocator(self.rt.memory)
        self.dma_pfn = alloc.alloc(self.dma_pages)
        self.prd = prd = alloc.view_of(self.dma_pfn, 1)
        self.dma_data = alloc.view_of(self.dma_pfn + 1, self.dma_pages - 1)
        self.dma_data_gpa = (self.dma_pfn + 1) * PAGE_SIZE
        self.ide = IdeDriver(self.client, DmaBuffer(self.dma_pfn * PAGE_SIZE, prd))
        self.share_dma()
        self.rt.log("IDE disk attached", dma_pfn=self.dma_pfn, pages=self.dma_pages)
        return True

    def share_dma(self) -> None:
        """(Re)share the DMA pages with the root: its device worker may reach
        exactly these pages of ours."""
        if self.client is None:
            return
        if self.dma_grant:
            try:
                self.rt.hv.revoke_grant(self.dma_grant)
            except (OSError, TimeoutError):
                pass
        st, gid = self.rt.hv.share_pages(list(range(self.dma_pfn, self.dma_pfn + self.dma_pages)))
        self.dma_grant = gid if st == 0 else 0

    def devices(self) -> dict[str, BlockDevice]:
        out: dict[str, BlockDevice] = {}
        if self.ide is not None:
            out["ide-pio"] = IdeBlock(self, "pio")
            out["ide-dma"] = IdeBlock(self, "dma")
        scsi = self._scsi()
        if scsi is not None:
            out["scsi"] = scsi
        return out

    def _scsi(self) -> BlockDevice | None:
        bus = self.bus
        if bus is None:
            return None
        for gc in bus.channels.values():
            if gc.device.name == "storvsc" and gc.vsc is not None and not gc.vsc.closed \
                    and getattr(gc.vsc, "ready", False):
                return gc.vsc  # type: ignore[no-any-return]
        return None

    # -- the disk workload ---------------------------------------------------------------------
    def workload(self, action: str, args: dict[str, Any]) -> None:
        try:
            if action == "bench":
                r = self.bench(**args)
                self.rt.log("disk bench", **r)
            elif action == "pattern":
                r = self.pattern(**args)
                self.rt.log("disk pattern", **r)
            else:
                raise ValueError(f"disk has workloads bench and pattern, not {action!r}")
        except Exception as e:  # a failed disk (IdeError, ScsiError, ...) must not end us
            self.rt.log("disk workload failed", level="error", action=action,
                        error=f"{type(e).__name__}: {e}")

    def _device(self, path: str) -> BlockDevice:
        dev = self.devices().get(path)
        if dev is None:
            raise ValueError(f"no {path} disk here (have: {', '.join(self.devices()) or 'none'})")
        return dev

    def bench(self, path: str, block: int = 4096, ops: int = 100, qd: int = 1,
              write: bool = False, seed: int = 1, tag: str = "") -> dict[str, Any]:
        """Random reads or writes of ``block`` bytes; ops/s and latencies."""
        dev = self._device(path)
        if block % SECTOR or not SECTOR <= block <= DMA_DATA_BYTES:
            raise ValueError(f"block must be a multiple of 512 up to {DMA_DATA_BYTES}")
        rng = random.Random(seed)
        blocks = dev.size_bytes // block
        data = os.urandom(block)
        lat: list[float] = []
        before = self._counters()
        t0 = time.perf_counter()
        if qd > 1:
            if not hasattr(dev, "submit_many"):
                raise ValueError(f"{path} has no queue: qd must be 1")
            done = 0
            while done < ops:
                n = min(qd, ops - done)
                lbas = [rng.randrange(blocks) * (block // SECTOR) for _ in range(n)]
                lat.extend(dev.submit_many(lbas, block, write, data))  # type: ignore[attr-defined]
                done += n
        else:
            for _ in range(ops):
                lba = rng.randrange(blocks) * (block // SECTOR)
                t = time.perf_counter()
                if write:
                    dev.write(lba, data)
                else:
                    dev.read(lba, block // SECTOR)
                lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        after = self._counters()
        lat.sort()
        return {"tag": tag, "path": path, "block_bytes": block, "queue_depth": qd,
                "ops": ops, "write": write, "seconds": round(wall, 6),
                "ops_per_s": round(ops / wall, 1),
                "p50_us": round(statistics.median(lat) * 1e6, 1),
                "p99_us": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e6, 1),
                "traps": after["traps"] - before["traps"],
                "hypercalls": after["hypercalls"] - before["hypercalls"]}

    def _counters(self) -> dict[str, int]:
        return {"traps": self.client.traps if self.client is not None else 0,
                "hypercalls": self.rt.hv.calls}

    def pattern(self, path: str, mode: str, lbas: int = 64, seed: int = 7,
                tag: str = "") -> dict[str, Any]:
        """Write (``mode="write"``) or check (``"check"``) a pattern of 4 KiB
        blocks derived from ``seed``; returns a digest to compare across paths."""
        dev = self._device(path)
        rng = random.Random(seed)
        places = [rng.randrange(dev.size_bytes // 4096) * 8 for _ in range(lbas)]
        h = hashlib.sha256()
        bad = 0
        for i, lba in enumerate(places):
            want = hashlib.sha256(f"{seed}:{i}:{lba}".encode()).digest() * 128
            if mode == "write":
                dev.write(lba, want)
            else:
                got = dev.read(lba, 8)
                bad += got != want
                h.update(got)
        if mode == "write":
            dev.flush()
        return {"tag": tag, "path": path, "mode": mode, "blocks": lbas, "bad": bad,
                "digest": h.hexdigest()[:16] if mode != "write" else None}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
