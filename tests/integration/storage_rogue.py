"""A partition hook for tests/integration/test_storage.py (VIRIDIAN_PARTITION_HOOK).

In child1 it adds the ``disk`` workload action ``rogue``: bad input against
both disks, each attempt logged as ``rogue disk`` with what came back.
"""

from __future__ import annotations

import struct
from typing import Any

from partitions.devices.storage.guest import StorageGuest
from partitions.devices.storage.ide.ata import PRD_ENTRY, PRD_EOT
from partitions.devices.storage.ide.driver import IdeError
from partitions.devices.storage.scsi import vstor as V
from vmbus.packet import GpaRange


def _ide(guest: StorageGuest, log: Any) -> None:
    drv = guest.ide
    assert drv is not None
    sectors = guest.ide_size // 512
    for name, call in (
        ("ide prd table outside memory", lambda: drv.run_dma(0, 8, 1 << 31, to_memory=True)),
        ("ide past the end", lambda: drv.read_dma(sectors, 8, guest.dma_data_gpa)),
    ):
        try:
            call()
            log("rogue disk", attempt=name, outcome="accepted")
        except IdeError as e:
            log("rogue disk", attempt=name, outcome="error", status=e.status, error=e.error,
                bm_status=e.bm_status)
    # a PRD table in granted memory that points the data outside it
    prd = guest.prd
    PRD_ENTRY.pack_into(prd, 0, 0x7FFF0000, 4096, PRD_EOT)
    try:
        drv.run_dma(0, 8, guest.dma_pfn * 4096, to_memory=True)
        log("rogue disk", attempt="ide prd data outside memory", outcome="accepted")
    except IdeError as e:
        log("rogue disk", attempt="ide prd data outside memory", outcome="error",
            status=e.status, error=e.error, bm_status=e.bm_status)


def _scsi(guest: StorageGuest, log: Any) -> None:
    vsc: Any = guest._scsi()
    assert vsc is not None
    ver = vsc.version
    ch = vsc.channel

    def srb(cdb: bytes, nbytes: int, pfns: tuple[int, ...] | None, patch: Any = None) -> Any:
        vsc._tid += 1
        tid = vsc._tid
        payload = V.build_execute_srb(cdb, data_in=V.DataIn.READ, data_transfer_length=nbytes,
                                      version=ver)
        if patch is not None:
            payload = patch(bytearray(payload))
        if pfns:
            ch.outgoing.try_write_gpa_direct(bytes(payload), [GpaRange(nbytes, 0, pfns)],
                                             trans_id=tid, completion_requested=True)
        else:
            ch.try_send(bytes(payload), trans_id=tid, completion_requested=True)
        while True:
            pkt = ch.recv(5.0)
            assert pkt is not None, "no completion"
            if pkt.trans_id == tid:
                return pkt

    read10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0)
    own = tuple(range(vsc.pool_pfn, vsc.pool_pfn + 1))
    for name, cdb, pfns, patch in (
        ("scsi gpa range outside memory", read10, (1 << 30,), None),
        ("scsi past the end", struct.pack(">BBQIBB", 0x88, 0, vsc.size_bytes // 512, 8, 0, 0),
         own, None),
        # cdb_length (vmscsi_request byte 8, after the 12-byte header) says 17
        ("scsi cdb longer than its field", read10, own,
         lambda b: b.__setitem__(12 + 8, 17) or b),
    ):
        pkt = srb(cdb, 4096, pfns, patch)
        done = None
        try:
            done = V.decode_packet(pkt.payload, size=V.packet_size(ver),
                                   completes=V.VstorOperation.EXECUTE_SRB)
        except V.VstorError:
            pass
        body = done.body if done is not None else None
        log("rogue disk", attempt=name, vstor_status=done.status if done else None,
            scsi_status=getattr(body, "scsi_status", None),
            srb_status=getattr(body, "srb_status", None),
            sense=bytes(getattr(body, "sense", b""))[:18].hex() if body else "")


def run(rt: Any) -> None:
    if rt.name != "child1":
        return
    original = StorageGuest.workload

    def workload(self: StorageGuest, action: str, args: dict[str, Any]) -> None:
        if action != "rogue":
            return original(self, action, args)
        for part in (_ide, _scsi):
            try:
                part(self, rt.log)
            except Exception as e:  # the test reads what happened
                rt.log("rogue disk", attempt=part.__name__, outcome="crashed", error=repr(e))
        rt.log("rogue disk done")
        return None

    StorageGuest.workload = workload  # type: ignore[method-assign]
