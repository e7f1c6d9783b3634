"""Synthetic SCSI over VMBus: storvsp in the root, storvsc in the child (spec §8.1).

The enlightened path of issue 7.  The child opens the SCSI channel, shares a
buffer pool of its own pages with the root once (a grant, as netvsc shares
its buffers), and runs the initialisation handshake (BEGIN_INITIALIZATION,
QUERY_PROTOCOL_VERSION newest first, QUERY_PROPERTIES,
END_INITIALIZATION).  Each I/O is one EXECUTE_SRB sent GPA-direct: the
packet names the pool pages holding (or receiving) the data; the VSP reads
or writes those pages in place (``ScsiDisk`` over the image with
preadv/pwritev straight into views of the child's pages: no extra copy) and
completes with SCSI and SRB status and sense data.  Several requests may be
in flight; completions are matched by trans_id.

Per I/O: two ring packets and at most two doorbell rings; no supervisor, no
trap.  Compare partitions/devices/storage/ide/worker.py (every register access traps).

Trust (root side): every SRB is decoded by ``vstor.decode_packet`` (lengths,
CDB length, sense length); a GPA-direct range must lie inside pages this
child granted, cover the transfer length, and be the packet's only range;
the CDB goes to ``ScsiDisk``, which refuses anything past the end of the
disk.  A violation is CHECK CONDITION or a closed channel, never data from
outside the child's memory or its disk.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from typing import Any

from hv.abi import PAGE_SIZE
from partitions.devices.framework import DeviceClass, DeviceError, Vsc, Vsp, register
from vmbus.packet import GpaRange, Packet, PacketType, build_gpa_direct_header
from vmbus.ring import PacketBatch

from . import vstor as V
from .scsi import CHECK_CONDITION, FileBackend, ScsiDisk, SenseKey, fixed_sense

__all__ = ["SCSI_CLASS_ID", "STORVSC", "StorVsc", "StorVsp"]

SCSI_CLASS_ID = uuid.UUID("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f")  # spec §5
SLOT_BYTES = 128 * 1024  # the largest I/O one request carries
SLOTS = 32  # requests in flight at once (queue depth)
_ACCEPTED = (V.VstorVersion.WIN10, V.VstorVersion.WIN8_1, V.VstorVersion.WIN8)
_READ10, _WRITE10, _SYNC10, _READCAP16 = 0x28, 0x2A, 0x35, 0x9E
_READ16, _WRITE16, _SYNC16 = 0x88, 0x8A, 0x91

# The I/O fast path (StorVsp._fast): a GPA-direct packet's descriptor, its
# GPA header and its one range in one unpack (type, offset8, len8, flags,
# trans_id, reserved, range_cnt, byte_count, byte_offset) ...
_GPA1 = struct.Struct("<HHHHQIIII")
_PFNS_AT = _GPA1.size  # the range's pfn array follows
_GPA1_MIN = _PFNS_AT + 8  # descriptor to payload: at least one range of one page
# ... and the vstor_packet fields the path needs: operation, cdb_length,
# sense_info_length, data_in, data_transfer_length, the CDB's 16 bytes.
_SRB_IO = struct.Struct("<I16xBBBxI16s")
_CDB10 = struct.Struct(">xBIxH")  # flags, LBA, blocks
_CDB16 = struct.Struct(">xBQI")
_REPLIES = 256  # most cached completions (per address, CDB length, data_in, bytes)
# The child's side: the CDB's place in a vstor_packet, READ/WRITE(10) as the
# benchmark loop packs them, and what _wait_io reads of a completion: the
# descriptor's type and trans_id, the operation and the SCSI status.
_CDB_AT = 28
_CDB10_OUT = struct.Struct(">BBIBHB")
_DESC_TID = struct.Struct("<H6xQ")
_DONE = struct.Struct("<I11xB")


class StorVsp(Vsp):
    """Root side: the handshake, then SRBs against the child's disk image."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.version: int | None = None
        self.ready = False
        self.disk: ScsiDisk | None = None
        self.fd = -1
        self.counters = {"read_ops": 0, "write_ops": 0, "read_bytes": 0, "write_bytes": 0,
                         "flushes": 0, "errors": 0}
        self._published: dict[str, int] | None = None
        self._replies: dict[tuple[bytes, int], bytes] = {}  # see _fast

    def accept(self) -> int:
        from ..disk import open_image

        path, size = self.config.get("path"), int(self.config.get("size", 0))
        try:
            os.makedirs(os.path.dirname(str(path)) or ".", mode=0o700, exist_ok=True)
            self.image = open_image(str(path), size, create=True)
        except (OSError, ValueError) as e:
            self.log("storvsp: cannot open the disk image", level="error", path=path,
                     error=str(e))
            return 1
        self.disk = ScsiDisk(FileBackend(self.image.fd, size))
        return 0

    def on_packets(self, pkts: Any) -> None:
        if self.ready and isinstance(pkts, PacketBatch) and self.version is not None \
                and self.version >= V.VstorVersion.WIN8 and self.disk is not None \
                and self.disk.block_size == 512:  # (_fast counts in 512-byte blocks)
            self._fast(*pkts.layout())
            return
        for p in pkts:
            self._one(p)

    def _fast(self, raw: bytes, st: list[int]) -> None:
        """A batch, with READ/WRITE (10 and 16) of granted pages served
        straight from the packet bytes: one unpack for descriptor and range,
        one for the SRB, the pages' views cached by their pfn array, a
        completion cached per shape.  Anything else, anything odd (several
        ranges, an offset into the first page, a range longer or shorter
        than the transfer, FUA, a short file, pages not granted ...) goes to ``_one``,
        the general path, which decides on errors: this path only takes
        requests it can serve exactly as ``_one`` would (the completion bytes
        are ``_one``'s: tests/unit/test_storvsp_fast.py compares them)."""
        disk = self.disk
        assert disk is not None
        fd, block_count = self.image.fd, disk.block_count
        grants = self.res.memory  # the pages the children granted
        views_of = grants.views_packed if grants is not None else None
        replies = self._replies
        counters = self.counters
        preadv, pwritev = os.preadv, os.pwritev
        gpa1, srb_io, gpa = _GPA1.unpack_from, _SRB_IO.unpack_from, PacketType.DATA_USING_GPA_DIRECT
        for j in range(0, len(st) - 1, 2):
            if self.closed:
                return
            pos, pay, end = st[j], st[j + 1], st[j + 2]
            if pay - pos < _GPA1_MIN:  # no room for a GPA header with a range: not ours
                self._one(Packet(raw, pos))
                continue
            ptype, _o8, _l8, flags, tid, _rs, nranges, count, offset = gpa1(raw, pos)
            if ptype != gpa or nranges != 1 or offset or end - pay < 64 \
                    or not flags & 1 or views_of is None:
                self._one(Packet(raw, pos))
                continue
            op, cdb_len, sense_len, data_in, dtl, cdb = srb_io(raw, pay)
            code = cdb[0]
            if code in (_READ10, _WRITE10):
                cflags, lba, blocks = _CDB10.unpack_from(cdb)
                need = 10
            elif code in (_READ16, _WRITE16):
                cflags, lba, blocks = _CDB16.unpack_from(cdb)
                need = 16
            else:  # another command: the general path
                self._one(Packet(raw, pos))
                continue
            write = code & 2  # 0x2A, 0x8A
            n = blocks << 9
            if op != V.VstorOperation.EXECUTE_SRB or not need <= cdb_len <= 16 \
                    or sense_len > 20 or cflags & 0xE8 or data_in != (0 if write else 1) \
                    or not 0 < n == count == dtl or lba + blocks > block_count:
                self._one(Packet(raw, pos))
                continue
            # the range's pfns (exactly the pages it spans: checked by the ring)
            pfns_end = pos + _PFNS_AT + 8 * ((n + 4095) >> 12)
            views = views_of(self.child, raw[pos + _PFNS_AT : pfns_end])
            if views is not None and n & 4095:  # less than a page at the end
                views = [views[0][:n]] if len(views) == 1 else None
            if views is None:
                self._one(Packet(raw, pos))
                continue
            try:
                got = pwritev(fd, views, lba << 9) if write else preadv(fd, views, lba << 9)
            except OSError:
                got = -1
            if got != n:  # short or failed: the general path retries and decides
                self._one(Packet(raw, pos))
                continue
            if write:
                counters["write_ops"] += 1
                counters["write_bytes"] += n
            else:
                counters["read_ops"] += 1
                counters["read_bytes"] += n
            key = (raw[pay + 16 : pay + 24], n)
            reply = replies.get(key)
            if reply is None:
                reply = self._reply_for(raw[pay:end], n, key)
            self.complete(tid, reply)
        if self._published is not counters:
            self._publish()

    def _reply_for(self, payload: bytes, n: int, key: tuple[bytes, int]) -> bytes:
        """The GOOD completion of a request shaped like ``payload`` that moved
        ``n`` bytes, as ``_srb`` builds it; cached under ``key``."""
        srb = V.decode_srb(payload, size=V.VSTOR_PACKET_BYTES)
        assert srb is not None and self.version is not None
        reply = V.build_srb_reply(srb[1], version=self.version, scsi_status=0,
                                  data_transfer_length=n, sense=b"")
        if len(self._replies) >= _REPLIES:
            self._replies.clear()
        self._replies[key] = reply
        return reply

    def _size(self) -> int:
        return V.packet_size(self.version) if self.version is not None else \
            V.VSTOR_PACKET_BYTES_PRE_WIN8

    def _one(self, p: Packet) -> None:
        if p.packet_type not in (PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT):
            raise DeviceError(f"storvsp takes inband or GPA-direct packets, not "
                              f"{p.packet_type:#x}")
        payload = p.payload
        size = V.VSTOR_PACKET_BYTES if len(payload) >= V.VSTOR_PACKET_BYTES else self._size()
        try:
            # After the handshake the I/O path: an EXECUTE_SRB in one unpack, no
            # dataclasses.  decode_srb refuses exactly what decode_packet refuses
            # (tests/unit/test_vstor_fastpath.py): anything else is decoded once.
            srb = V.decode_srb(payload, size=size) if self.ready else None
            pkt = V.decode_packet(payload, size=size) if srb is None else None
        except (V.VstorError, ValueError) as e:
            # A malformed request (a CDB longer than its field allows, a short
            # packet ...): an error status for it, nothing more.
            self.counters["errors"] += 1
            if self.counters["errors"] <= 20:
                self.log("storvsp: malformed request", level="warning", child=self.child,
                         error=str(e)[:200])
            if p.completion_requested:
                self.complete(p.trans_id, V.build_completion(
                    size=V.reply_size(len(payload), self.version),
                    status=V.VstorStatus.INVALID_PARAMETER))
            return
        if srb is not None:
            self._srb(p, srb[1])
            return
        assert pkt is not None
        op = pkt.operation
        if op == V.VstorOperation.EXECUTE_SRB:  # (once ready, decode_srb took it)
            raise DeviceError("EXECUTE_SRB before the handshake ended")
        size = V.reply_size(len(payload), self.version)
        if op == V.VstorOperation.BEGIN_INITIALIZATION:
            self.complete(p.trans_id, V.build_completion(size=size))
        elif op == V.VstorOperation.QUERY_PROTOCOL_VERSION:
            assert isinstance(pkt.body, V.ProtocolVersion)
            ok = pkt.body.major_minor in _ACCEPTED
            if ok:
                self.version = pkt.body.major_minor
            self.complete(p.trans_id, V.build_version_reply(pkt.body.major_minor, accepted=ok,
                                                            size=size))
        elif op == V.VstorOperation.QUERY_PROPERTIES:
            props = V.ChannelProperties(max_sub_channels=0, flags=0,
                                        max_transfer_bytes=SLOT_BYTES)
            self.complete(p.trans_id, V.build_properties_reply(props, size=size))
        elif op == V.VstorOperation.END_INITIALIZATION:
            if self.version is None:
                raise DeviceError("END_INITIALIZATION without a protocol version")
            self.ready = True
            self.complete(p.trans_id, V.build_completion(size=size))
        else:
            self.complete(p.trans_id, V.build_completion(size=size,
                                                         status=V.VstorStatus.INVALID_DEVICE_STATE))

    def _buffer(self, p: Packet, req: V.ScsiRequest | V.RawSrb) -> list[memoryview] | None:
        """Views of the child's pages the SRB names (None: no data phase)."""
        if p.packet_type != PacketType.DATA_USING_GPA_DIRECT:
            return None
        ranges = p.ranges or ()
        if len(ranges) != 1 or not isinstance(ranges[0], GpaRange):
            raise DeviceError("an SRB carries exactly one GPA range")
        r = ranges[0]
        if r.byte_count < req.data_transfer_length:
            raise DeviceError(f"GPA range of {r.byte_count} bytes for a "
                              f"{req.data_transfer_length}-byte transfer")
        grants = self.res.memory  # the pages the children granted
        views = grants.views(self.child, r.pfns) if grants is not None else None
        if views is None:
            raise DeviceError("an SRB names pages the child did not grant")
        off, left = r.byte_offset, r.byte_count
        if not off and left == len(views) * PAGE_SIZE:
            return views  # whole pages (the usual case): the views as they are
        out = []
        for v in views:
            if left <= 0:
                break
            piece = v[off : off + left]
            out.append(piece)
            left -= len(piece)
            off = 0
        return out

    def _srb(self, p: Packet, req: V.ScsiRequest | V.RawSrb) -> None:
        assert self.disk is not None and self.version is not None
        try:
            buf = self._buffer(p, req)
            # (the CDB is the union's first cdb_length bytes: execute copies those)
            res = self.disk.execute(req.payload, req.cdb_length, req.data_in == V.DataIn.READ,
                                    buf, req.data_transfer_length if buf is not None else 0)
        except (DeviceError, ValueError) as e:
            # Pages that are not the child's, a range shorter than the transfer:
            # CHECK CONDITION, ILLEGAL REQUEST, INVALID FIELD IN CDB; nothing moved.
            self.counters["errors"] += 1
            if self.counters["errors"] <= 20:
                self.log("storvsp: SRB refused", level="warning", child=self.child,
                         error=str(e)[:200])
            self.complete(p.trans_id, V.build_srb_reply(
                req, version=self.version, scsi_status=CHECK_CONDITION,
                data_transfer_length=0, sense=fixed_sense(SenseKey.ILLEGAL_REQUEST, 0x24, 0),
                srb_status=V.SrbStatus.INVALID_REQUEST))
            return
        st = self.counters
        opcode = req.payload[0] if req.cdb_length else 0
        if res.scsi_status:
            st["errors"] += 1
        elif opcode in (_READ10, _READ16):
            st["read_ops"] += 1
            st["read_bytes"] += res.data_transferred
        elif opcode in (_WRITE10, _WRITE16):
            st["write_ops"] += 1
            st["write_bytes"] += res.data_transferred
        elif opcode in (_SYNC10, _SYNC16):
            st["flushes"] += 1
        self.complete(p.trans_id, V.build_srb_reply(
            req, version=self.version, scsi_status=res.scsi_status,
            data_transfer_length=res.data_transferred, sense=res.sense))
        if self._published is not st:
            self._publish()

    def _publish(self) -> None:
        """Hand the root's storage host our live counters (it copies them into
        each report), once per VSP rather than a copy per request."""
        host = self.res.service  # the root's storage host
        if host is not None:
            host.scsi_stats.setdefault(self.child, {})[int(self.config.get("disk", 0))] = \
                self.counters
            self._published = self.counters

    def on_close(self, reason: str) -> None:
        self.ready = False
        if self.disk is not None:
            self.image.close()
            self.disk = None

    def stats(self) -> dict[str, Any]:
        return {"version": f"{self.version:#06x}" if self.version else None,
                "ready": self.ready, **self.counters}


class StorVsc(Vsc):
    """Child side: the handshake, then a block device (``BlockDevice``)."""

    name = "scsi0"
    path = "scsi"
    block_size = 512

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.ready = False
        self.version = 0
        self.size_bytes = 0
        self.pool_pfn = 0
        self.pool_grant = 0
        self.pool: memoryview | None = None
        self._tid = 1 << 32  # above the framework's own request ids
        self._step = "begin"
        self._vi = 0
        self._headers: dict[tuple[int, int, int], bytes] = {}  # (pool, slot, bytes) ->
        self._templates: dict[tuple[int, int, int], bytes] = {}  # (data_in, bytes, cdb) ->

    @classmethod
    def open_userdata(cls, config: dict[str, Any]) -> bytes:
        return bytes(120)  # a zeroed properties struct (Linux)

    def on_open(self) -> None:
        alloc = self.res.memory  # the guest page allocator
        pages = SLOTS * SLOT_BYTES // PAGE_SIZE
        self.pool_pfn = alloc.alloc(pages)
        self.pool = alloc.view_of(self.pool_pfn, pages)
        st, gid = self.res.hypercalls.share_pages(list(range(self.pool_pfn,
                                                           self.pool_pfn + pages)))
        if st != 0:
            raise DeviceError(f"cannot share the I/O pool (status {st})")
        self.pool_grant = gid
        self.request(V.build_begin_initialization(), self._after)

    def _after(self, pkt: Packet) -> None:
        """The handshake, one completed step after the other (as Linux waits)."""
        try:
            done = V.decode_packet(pkt.payload, size=V.VSTOR_PACKET_BYTES,
                                   completes=self._completes())
        except V.VstorError as e:
            self.log("storvsc: bad completion", level="error", error=str(e))
            return
        if self._step == "begin":
            self._step = "version"
            self.request(V.build_query_protocol_version(_ACCEPTED[0]), self._after)
        elif self._step == "version":
            if done.status != 0:
                self._vi += 1
                if self._vi >= len(_ACCEPTED):
                    self.log("storvsc: no common protocol version", level="error")
                    return
                self.request(V.build_query_protocol_version(_ACCEPTED[self._vi]), self._after)
                return
            self.version = _ACCEPTED[self._vi]
            self._step = "properties"
            self.request(V.build_query_properties(), self._after)
        elif self._step == "properties":
            self._step = "end"
            self.request(V.build_end_initialization(), self._after)
        elif self._step == "end":
            self._step = "ready"
            try:
                self._capacity()
            except (DeviceError, TimeoutError, V.VstorError) as e:
                self.log("storvsc: no capacity", level="error", error=str(e))
                return
            self.ready = True
            self.log("storvsc ready", version=f"{self.version:#06x}", bytes=self.size_bytes)
            self.res.report_soon()

    def _completes(self) -> V.VstorOperation:
        return {"begin": V.VstorOperation.BEGIN_INITIALIZATION,
                "version": V.VstorOperation.QUERY_PROTOCOL_VERSION,
                "properties": V.VstorOperation.QUERY_PROPERTIES,
                "end": V.VstorOperation.END_INITIALIZATION}.get(self._step,
                                                                 V.VstorOperation.EXECUTE_SRB)

    # -- I/O (blocking: the calling workload waits; the loop is not used) ------------
    def _send_srb(self, cdb: bytes, data_in: V.DataIn, nbytes: int, slot: int) -> int:
        self._tid += 1
        tid = self._tid
        # The request is a template per shape with the CDB put in: the bytes
        # build_execute_srb gives (tests/unit/test_storvsp_fast.py), for a
        # tenth of its cost.
        shape = (data_in, nbytes, len(cdb))
        tmpl = self._templates.get(shape)
        if tmpl is None:
            if len(self._templates) >= 64:
                self._templates.clear()
            tmpl = self._templates[shape] = V.build_execute_srb(
                bytes(len(cdb)), data_in=data_in, data_transfer_length=nbytes,
                version=self.version)
        payload = tmpl[:_CDB_AT] + cdb + tmpl[_CDB_AT + len(cdb):]
        ch = self.channel
        if nbytes:
            key = (self.pool_pfn, slot, nbytes)
            hdr = self._headers.get(key)
            if hdr is None:  # (the GPA-direct header: made once per slot and size)
                if len(self._headers) >= 4 * SLOTS:
                    self._headers.clear()
                first = self.pool_pfn + slot * (SLOT_BYTES // PAGE_SIZE)
                pages = -(-nbytes // PAGE_SIZE)
                hdr = self._headers[key] = build_gpa_direct_header(
                    (GpaRange(nbytes, 0, tuple(range(first, first + pages))),))
            ok = ch.outgoing.try_write_gpa_direct(payload, hdr, trans_id=tid,
                                                  completion_requested=True)
        else:
            ok = ch.try_send(payload, trans_id=tid, completion_requested=True)
        if not ok:
            raise DeviceError("the SCSI ring is full")
        return tid

    def _wait_io(self, tids: dict[int, float], timeout: float = 10.0) -> dict[int, float]:
        """``_wait`` for submit_many: the arrival time of each of ``tids``'
        completions, read from the drained batches in place (one unpack of
        descriptor and SRB status per completion).  The first completion that
        is not GOOD is decoded in full and raised as OSError with its sense,
        once all of ``tids`` are back."""
        when: dict[int, float] = {}
        error: OSError | None = None
        deadline = time.monotonic() + timeout
        ch = self.channel
        inc, db = ch.incoming, ch.doorbell
        unpack = _DONE.unpack_from
        size = V.packet_size(self.version)
        want = len(tids)
        try:
            while len(when) < want:
                batch = inc.drain()
                if not len(batch):
                    if not inc.wait_readable(db, max(0.0, deadline - time.monotonic())):
                        raise TimeoutError(f"{want - len(when)} SRBs not completed")
                    continue
                now = time.perf_counter()
                raw, st = batch.layout()
                for j in range(0, len(st) - 1, 2):
                    pay = st[j + 1]
                    ptype, tid = _DESC_TID.unpack_from(raw, st[j])
                    if ptype != PacketType.COMP or tid not in tids:
                        continue  # unsolicited (ENUMERATE_BUS ...)
                    if st[j + 2] - pay < size:
                        raise DeviceError("an SRB completion without an SRB")
                    op, scsi_status = unpack(raw, pay)
                    if (op != V.VstorOperation.COMPLETE_IO or scsi_status) and error is None:
                        done = V.decode_srb(raw[pay : st[j + 2]], size=size, completion=True)
                        if done is None:
                            raise DeviceError("an SRB completion without an SRB")
                        error = OSError(f"SCSI CHECK CONDITION, sense {done[1].sense[:18].hex()}")
                    when[tid] = now
        finally:
            inc.unmask_interrupts()  # (a poll may have left them masked): ring us again
        if error is not None:  # raised once every request is back: no slot is still in use
            raise error
        return when

    def _wait(self, tids: set[int], timeout: float = 10.0) -> dict[int, V.RawSrb]:
        """Completions of ``tids``, decoded."""
        got: dict[int, V.RawSrb] = {}
        deadline = time.monotonic() + timeout
        size = V.packet_size(self.version)
        recv = self.channel.recv
        comp = PacketType.COMP
        while len(got) < len(tids):
            left = deadline - time.monotonic()
            pkt = recv(max(0.0, left))
            if pkt is None:
                raise TimeoutError(f"{len(tids) - len(got)} SRBs not completed")
            if pkt.packet_type != comp:
                continue  # unsolicited (ENUMERATE_BUS ...)
            tid = pkt.trans_id
            if tid not in tids:
                continue
            done = V.decode_srb(pkt.payload, size=size, completion=True)
            if done is None:
                raise DeviceError("an SRB completion without an SRB")
            got[tid] = done[1]
        return got

    def _do(self, cdb: bytes, data_in: V.DataIn, nbytes: int) -> V.ScsiRequest | V.RawSrb:
        tid = self._send_srb(cdb, data_in, nbytes, 0)
        srb = self._wait({tid})[tid]
        if srb.scsi_status:
            raise OSError(f"SCSI CHECK CONDITION, sense {srb.sense[:18].hex()}")
        return srb

    def _capacity(self) -> None:
        cdb = struct.pack(">BBQIBB", _READCAP16, 0x10, 0, 32, 0, 0)
        self._do(cdb, V.DataIn.READ, 32)
        assert self.pool is not None
        last, block = struct.unpack_from(">QI", self.pool, 0)
        self.size_bytes = (last + 1) * block

    def read(self, lba: int, count: int) -> bytes:
        n = count * 512
        self._do(_CDB10_OUT.pack(_READ10, 0, lba, 0, count, 0), V.DataIn.READ, n)
        assert self.pool is not None
        return bytes(self.pool[:n])

    def write(self, lba: int, data: bytes) -> None:
        assert self.pool is not None
        self.pool[: len(data)] = data
        self._do(_CDB10_OUT.pack(_WRITE10, 0, lba, 0, len(data) // 512, 0),
                 V.DataIn.WRITE, len(data))

    def flush(self) -> None:
        self._do(_CDB10_OUT.pack(_SYNC10, 0, 0, 0, 0, 0), V.DataIn.UNKNOWN, 0)

    def submit_many(self, lbas: list[int], block: int, write: bool, data: bytes) -> list[float]:
        """Up to SLOTS requests in flight at once; per-request latencies (s)."""
        assert self.pool is not None and len(lbas) <= SLOTS and block <= SLOT_BYTES
        op = _WRITE10 if write else _READ10
        t0: dict[int, float] = {}
        pool = self.pool
        direction = V.DataIn.WRITE if write else V.DataIn.READ
        pack = _CDB10_OUT.pack
        blocks = block // 512
        send = self._send_srb
        for i, lba in enumerate(lbas):
            if write:
                pool[i * SLOT_BYTES : i * SLOT_BYTES + block] = data
            cdb = pack(op, 0, lba, 0, blocks, 0)
            t = time.perf_counter()
            t0[send(cdb, direction, block, i)] = t
        t1 = self._wait_io(t0)
        return [t1[tid] - t for tid, t in t0.items()]  # each request's own latency

    def on_close(self, reason: str) -> None:
        self.ready = False
        if self.pool is not None:
            self.pool.release()
            self.pool = None
        if self.pool_grant and self.res.hypercalls is not None:
            try:
                self.res.hypercalls.revoke_grant(self.pool_grant)
            except (OSError, TimeoutError):
                pass
            self.pool_grant = 0
        if self.pool_pfn and self.res.memory is not None:
            self.res.memory.free(self.pool_pfn)
            self.pool_pfn = 0

    def stats(self) -> dict[str, Any]:
        return {"ready": self.ready, "version": f"{self.version:#06x}" if self.version else None,
                "size_bytes": self.size_bytes}


STORVSC = register(DeviceClass(
    "storvsc", SCSI_CLASS_ID, StorVsp, StorVsc, send_ring_pages=33, recv_ring_pages=33,
    description="synthetic SCSI disk (storvsc/storvsp, VSTOR over VMBus)",
    hypercalls=("share_pages", "revoke_grant"),  # the VSC's I/O pool
    disk_bus="scsi",  # one controller per scsi disk of a child
))
