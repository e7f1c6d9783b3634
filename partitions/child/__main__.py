"""``python -m partitions.child``: a child partition, started by the supervisor.

Layer: partitions (child).  The child's composition root: the one place
that knows what a child has (partitions/runtime.py knows none of it):

* its VMBus end, ``VmbusGuest`` (partitions/child/vmbus_guest.py): the
  channel-management client and the VSCs of the devices its config lists
  and of those its disks bring (``DeviceClass.disk_bus``), over the guest
  page allocator (partitions/guestmem.py);
* its disks, ``StorageGuest`` (partitions/devices/storage/guest.py): the
  emulated IDE disk through its intercept link, the SCSI disk through the
  storvsc VSC, and the ``disk`` workload.

Each VSC is given its ``DeviceResources`` here: the guest page allocator as
its memory and the hypercalls its DeviceClass lists.  The runtime messages
each feature owns are registered here, before boot;
the features themselves are imported and built when the partition starts
(they need the boot message, and their imports stay out of the boot time,
as they always were).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hv.wire import Frame
from partitions.runtime import PartitionRuntime, main

if TYPE_CHECKING:
    from partitions.child.vmbus_guest import VmbusGuest

__all__ = ["compose"]



def compose(rt: PartitionRuntime) -> None:
    """Install a child's features in ``rt``."""
    early: list[Frame] = []  # intercept links that came before the disks were there

    def intercept(obj: dict[str, Any], fr: Frame) -> None:
        storage = rt.features.get("storage")
        if storage is None:  # during boot: kept for start
            early.append(Frame(fr.kind, fr.seq, fr.body, fr.fds))
            fr.fds = []
        else:
            storage.on_intercept_frame(obj, fr)

    rt.on("doorbells", rt.to_feature("vmbus", lambda bus, o, f: bus.on_doorbells_frame(o, f)),
          pump=True)
    rt.on("root", rt.to_feature("vmbus", lambda bus, o, f: bus.on_root(o)))
    rt.on("root", rt.to_feature("storage", lambda st, o, f: st.on_root_frame(o, f)))
    rt.on("intercept", intercept)
    rt.on("workload", rt.to_feature("storage", lambda st, o, f: st.on_workload_frame(o, f)))
    rt.on("workload", rt.to_feature("vmbus", lambda bus, o, f: bus.workload(o)))

    def bus() -> VmbusGuest | None:
        return rt.features.get("vmbus")

    rt.on_message(lambda origin, mtype, payload: (b := bus()) is not None
                  and b.on_message(origin, mtype, payload))
    rt.on_memory_change(lambda op, msg: (b := bus()) is not None
                        and b.on_memory_change(op, msg))
    rt.on_tracing(lambda on: (b := bus()) is not None and b.set_tracing(on))
    rt.on_report(lambda: (b := bus()) is not None and b.send_report())
    rt.on_close("vmbus", lambda: (b := bus()) is not None and b.close_all())
    rt.on_close("storage", lambda: (s := rt.features.get("storage")) is not None
                and s.close())

    def start() -> None:
        from partitions.child.vmbus_guest import VmbusGuest
        from partitions.devices import DeviceClass, DeviceResources, Hypercalls, disk_clients
        from partitions.devices.storage.guest import StorageGuest
        from partitions.guestmem import PageAllocator

        alloc = PageAllocator(rt.memory)  # rings, DMA buffers, Dynamic Memory: one allocator

        def resources(dc: DeviceClass) -> DeviceResources:
            return DeviceResources(
                log=rt.log, hypercalls=Hypercalls(rt.hv, dc.hypercalls), memory=alloc,
                call_later=rt.call_later, report_soon=rt.report_soon, pump_link=rt.pump_link,
                notify=rt.send)

        info = rt.boot_info
        disks = info.get("disks")
        devices = list(info.get("devices") or []) + disk_clients(disks)
        rt.features["vmbus"] = guest = VmbusGuest(rt, devices, alloc, resources)
        rt.features["storage"] = StorageGuest(rt, disks if isinstance(disks, list) else [],
                                              alloc=alloc, bus=guest)
        kept, early[:] = list(early), []
        for fr in kept:
            try:
                intercept({"op": "intercept"}, fr)
            finally:
                fr.close_fds()
        if info.get("root_up"):
            guest.connect()

    rt.on_start(start)


if __name__ == "__main__":
    raise SystemExit(main("child", compose))
