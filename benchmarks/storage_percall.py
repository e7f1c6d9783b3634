"""Per-request costs of the synthetic SCSI path (storvsc/storvsp), in one process.

Not a benchmark of the suite: it explains test_storage_paths.py's storvsc rows
by pricing, in microseconds per request, each step the child and the root take
for one 4 KiB (or ``--block``) random read or write, with the real objects: a
``Channel`` pair over a private ring buffer, a ``StorVsc`` whose pool is a memfd
granted to a ``StorVsp`` through a real ``GrantTable``, a ``ScsiDisk`` over an
image file in the page cache.  No second process, no doorbell wake-ups: what is
left is CPU per request.

    .venv/bin/python -m benchmarks.storage_percall [--block 4096] [--write] [--cpu 1]

Lines: the three phases of one QD-32 batch as the cluster runs them (the
child's submit of 32 SRBs, the root's ``on_packets`` of the 32 (its lean path,
``StorVsp._fast``), the child's ``_wait_io`` of the 32 completions), then the
general path's calls (``_one``: Packet, decode, ScsiDisk.execute ...), each
timed alone in a loop, for comparison; and the host's own ``os.preadv`` of the
same block for scale.
Each number is the median over repeats of (loop time) / (requests).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from typing import Any

QD = 32


def _median_us(fn: Callable[[], int], repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        k = fn()
        out.append((time.perf_counter_ns() - t0) / k / 1000)
    return statistics.median(out)


class Rig:
    """A StorVsc and a StorVsp over one in-process channel, pool granted."""

    def __init__(self, image: str, size: int) -> None:
        from hv.abi import PAGE_SIZE as PAGE
        from hv.memwire import MemoryMessage, MemoryOp, MemorySegment
        from hv.partition_memory import GrantTable
        from partitions.devices.framework import DeviceResources
        from partitions.devices.storage.scsi.device import SLOT_BYTES, SLOTS, StorVsc, StorVsp
        from vmbus.channel import Channel, init_channel_buffer
        from vmbus.doorbell import Doorbell

        pages = SLOTS * SLOT_BYTES // PAGE
        self.pool_pfn = 0x1000
        fd = os.memfd_create("percall-pool", os.MFD_CLOEXEC)
        os.ftruncate(fd, pages * PAGE)
        import mmap

        self._pool_map = mmap.mmap(fd, pages * PAGE)
        self.grants = GrantTable()
        self.grants.apply(MemoryMessage(MemoryOp.GRANT, 1, [MemorySegment(self.pool_pfn, pages,
                                                                          0, 0)],
                                        [os.dup(fd)], grant_id=1))
        os.close(fd)
        ring_pages = 33
        self.buf = bytearray(2 * ring_pages * PAGE)
        init_channel_buffer(self.buf, ring_pages)
        a, b = Doorbell(), Doorbell()
        self.cch = Channel(self.buf, ring_pages, host=False, own_doorbell=a, peer_doorbell=b)
        self.hch = Channel(self.buf, ring_pages, host=True, own_doorbell=b, peer_doorbell=a)
        self.vsc = StorVsc(self.cch, {})  # given nothing: the pool is the benchmark's
        self.vsc.pool = memoryview(self._pool_map)
        self.vsc.pool_pfn = self.pool_pfn
        self.vsc.version = 0x0602
        self.vsc.ready = True
        self.vsp = StorVsp(self.hch, {"path": image, "size": size}, child=1,
                           resources=DeviceResources(memory=self.grants))
        assert self.vsp.accept() == 0
        self.vsp.version = 0x0602
        self.vsp.ready = True


def run(block: int, write: bool, repeats: int) -> list[tuple[str, float]]:
    from partitions.devices.storage.scsi import vstor as V
    from vmbus.packet import GpaRange

    size = 64 << 20
    tmp = tempfile.mkdtemp(prefix="percall-")
    image = os.path.join(tmp, "disk.img")
    with open(image, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    with open(image, "rb") as f:
        while f.read(1 << 20):
            pass
    rig = Rig(image, size)
    vsc, vsp = rig.vsc, rig.vsp
    rng = random.Random(1)
    blocks = size // block
    op = 0x2A if write else 0x28
    din = V.DataIn.WRITE if write else V.DataIn.READ
    out: list[tuple[str, float]] = []
    state: dict[str, Any] = {}

    def lbas() -> list[int]:
        return [rng.randrange(blocks) * (block // 512) for _ in range(QD)]

    # -- the three phases of a QD-32 batch, as the cluster runs them ------------------------
    def submit() -> int:
        tids = {}
        for i, lba in enumerate(lbas()):
            cdb = struct.pack(">BBIBHB", op, 0, lba, 0, block // 512, 0)
            tids[vsc._send_srb(cdb, din, block, i)] = 0.0
        state["tids"] = tids
        return QD

    def serve() -> int:
        batch = rig.hch.incoming.drain(256)
        assert len(batch) == QD
        t0 = time.perf_counter_ns()
        vsp.on_packets(batch)
        state["serve_ns"] = time.perf_counter_ns() - t0
        return QD

    def wait() -> int:
        got = vsc._wait_io(state["tids"], timeout=1.0)
        assert len(got) == QD
        return QD

    sub, srv, wt = [], [], []
    for _ in range(repeats * 20):
        t0 = time.perf_counter_ns()
        submit()
        t1 = time.perf_counter_ns()
        serve()
        t2 = time.perf_counter_ns()
        wait()
        t3 = time.perf_counter_ns()
        sub.append((t1 - t0) / QD / 1000)
        srv.append(state["serve_ns"] / QD / 1000)
        wt.append((t3 - t2) / QD / 1000)
        rig.cch.ack_doorbell()
        rig.hch.ack_doorbell()
    m_sub, m_srv, m_wt = statistics.median(sub), statistics.median(srv), statistics.median(wt)
    out += [("child: submit (StorVsc._send_srb + CDB pack), per SRB", m_sub),
            ("root:  StorVsp.on_packets (its fast path), per SRB", m_srv),
            ("child: _wait_io (drain, check each completion), per SRB", m_wt),
            ("  sum of the three (CPU per request, both sides)", m_sub + m_srv + m_wt)]

    # -- inside the child's submit ------------------------------------------------------------
    n = 2000
    cdb = struct.pack(">BBIBHB", op, 0, 8, 0, block // 512, 0)

    def t_cdb() -> int:
        for _ in range(n):
            struct.pack(">BBIBHB", op, 0, 8, 0, block // 512, 0)
        return n

    def t_build() -> int:
        for _ in range(n):
            V.build_execute_srb(cdb, data_in=din, data_transfer_length=block, version=0x0602)
        return n

    def t_range() -> int:
        first = rig.pool_pfn
        pages = -(-block // 4096)
        for _ in range(n):
            GpaRange(block, 0, tuple(range(first, first + pages)))
        return n

    payload = V.build_execute_srb(cdb, data_in=din, data_transfer_length=block, version=0x0602)
    rng1 = GpaRange(block, 0, tuple(range(rig.pool_pfn, rig.pool_pfn + -(-block // 4096))))

    def t_write() -> int:
        for i in range(QD):
            assert rig.cch.outgoing.try_write_gpa_direct(payload, [rng1], trans_id=i + 1,
                                                         completion_requested=True)
        state["batch"] = rig.hch.incoming.drain(256)
        return QD

    from vmbus.packet import build_gpa_direct_header

    def t_ext() -> int:
        for _ in range(n):
            build_gpa_direct_header([rng1])
        return n

    def t_inband() -> int:
        for i in range(QD):
            assert rig.cch.outgoing.try_write(payload, trans_id=i + 1,
                                              completion_requested=True)
        rig.hch.incoming.drain(256)
        return QD

    out += [("  the general path's steps, each alone (what the lean paths avoid):", float("nan")),
            ("  child: CDB struct.pack", _median_us(t_cdb, repeats)),
            ("  child: vstor.build_execute_srb", _median_us(t_build, repeats)),
            ("  child: GpaRange(...)", _median_us(t_range, repeats)),
            ("  child: try_write_gpa_direct (+ root drain of the batch)",
             _median_us(t_write, repeats)),
            ("    of which vmbus build_gpa_direct_header", _median_us(t_ext, repeats)),
            ("    (the same packet inband: try_write + drain, for comparison)",
             _median_us(t_inband, repeats))]

    # -- inside the root's on_packets -------------------------------------------------------
    t_write()
    batch = state["batch"]
    pkts = list(batch)

    def t_drain() -> int:
        for i in range(QD):
            rig.cch.outgoing.try_write_gpa_direct(payload, [rng1], trans_id=i + 1,
                                                  completion_requested=True)
        t0 = time.perf_counter_ns()
        b = rig.hch.incoming.drain(256)
        for p in b:
            p.packet_type, p.payload, p.ranges, p.trans_id, p.completion_requested  # noqa: B018
        state["drain_ns"] = time.perf_counter_ns() - t0
        return QD

    drains = []
    for _ in range(repeats * 5):
        t_drain()
        drains.append(state["drain_ns"] / QD / 1000)

    def t_decode() -> int:
        for _ in range(n):
            V.decode_packet(payload, size=64)
        return n

    def t_decode_srb() -> int:
        for _ in range(n):
            V.decode_srb(payload, size=64)
        return n

    req = V.decode_packet(payload, size=64).body
    assert isinstance(req, V.ScsiRequest)
    p0 = pkts[0]

    def t_buffer() -> int:
        for _ in range(n):
            vsp._buffer(p0, req)
        return n

    def t_ranges() -> int:
        for _ in range(n):
            p0.ranges  # noqa: B018
        return n

    def t_views() -> int:
        pfns = p0.ranges[0].pfns
        for _ in range(n):
            rig.grants.views(1, pfns)
        return n

    views = vsp._buffer(p0, req)
    assert vsp.disk is not None
    disk = vsp.disk
    fd = vsp.image.fd
    offs = [rng.randrange(blocks) * block for _ in range(n)]

    def t_execute() -> int:
        for i in range(n):
            c = struct.pack(">BBIBHB", op, 0, offs[i] // 512, 0, block // 512, 0)
            disk.execute(c, 10, not write, views, block)
        return n

    flat = [memoryview(bytearray(block))]

    def t_preadv() -> int:
        io = os.pwritev if write else os.preadv
        for i in range(n):
            io(fd, views, offs[i])
        return n

    def t_preadv_flat() -> int:
        io = os.pwritev if write else os.preadv
        for i in range(n):
            io(fd, flat, offs[i])
        return n

    res = disk.execute(cdb, 10, not write, views, block)

    def t_reply() -> int:
        for _ in range(n):
            V.build_srb_reply(req, version=0x0602, scsi_status=res.scsi_status,
                              data_transfer_length=res.data_transferred, sense=res.sense)
        return n

    reply = V.build_srb_reply(req, version=0x0602, scsi_status=0, data_transfer_length=block)

    def t_complete() -> int:
        for i in range(QD):
            vsp.complete(i + 1, reply)
        rig.cch.incoming.drain(256)
        return QD

    out += [("  root: drain + Packet fields (type, payload, ranges, trans_id)",
             statistics.median(drains)),
            ("  root: vstor.decode_srb (request; the I/O path)", _median_us(t_decode_srb,
                                                                             repeats)),
            ("    (vstor.decode_packet, the general path, for comparison)",
             _median_us(t_decode, repeats)),
            ("  root: StorVsp._buffer (Packet.ranges, GrantTable.views)",
             _median_us(t_buffer, repeats)),
            ("    of which Packet.ranges (parse the GPA range)", _median_us(t_ranges, repeats)),
            ("    of which GrantTable.views", _median_us(t_views, repeats)),
            ("  root: ScsiDisk.execute (incl. the I/O)", _median_us(t_execute, repeats)),
            (f"    of which os.{'pwritev' if write else 'preadv'} into the "
             f"{len(views)} page view(s)", _median_us(t_preadv, repeats)),
            ("  root: vstor.build_srb_reply", _median_us(t_reply, repeats)),
            ("  root: Endpoint.complete (post -> try_send)", _median_us(t_complete, repeats))]

    # -- inside the child's _wait -------------------------------------------------------------
    creply = reply

    def t_recv() -> int:
        for i in range(QD):
            vsp.complete(i + 1, creply)
        for _ in range(QD):
            rig.cch.recv(0.0)
        return QD

    def t_cdecode() -> int:
        for _ in range(n):
            V.decode_srb(creply, size=64, completion=True)
        return n

    out += [("  child: Channel.recv of a completion (+ root complete)", _median_us(t_recv,
                                                                                  repeats)),
            ("  child: vstor.decode_srb (completion)", _median_us(t_cdecode, repeats)),
            (f"host: os.{'pwritev' if write else 'preadv'} of {block} B into one "
             f"buffer (the ceiling's I/O)", _median_us(t_preadv_flat, repeats))]
    vsp.on_close("done")
    rig.grants.close()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cpu", type=int, default=None)
    a = ap.parse_args()
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    rows = run(a.block, a.write, a.repeats)
    print(f"storvsc/storvsp per request, {a.block} B {'writes' if a.write else 'reads'}, "
          f"QD {QD}, one process (us, median of {a.repeats} repeats)")
    for name, us in rows:
        print(f"  {name:<68} {us:8.2f}" if us == us else f"  {name}")  # (nan: a heading)


if __name__ == "__main__":
    main()
