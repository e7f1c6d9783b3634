"""``python -m partitions.root``: the root partition, started by the supervisor.

Layer: partitions (root).  The root's composition root: the one place that
knows what the root has (partitions/runtime.py knows none of it):

* the children's grants, ``RootGrants`` (partitions/root/grants.py);
* its VMBus end, ``VmbusHost`` (partitions/root/vmbus_host.py): a VMBus
  server per child and the VSPs of the devices each child's config lists
  and of those its disks bring (``DeviceClass.disk_bus``);
* Dynamic Memory's ``MemoryManager`` and balancer
  (partitions/devices/dynmem/manager.py);
* the storage backends and the IDE device workers, ``StorageHost``
  (partitions/devices/storage/host.py).

Each VSP is given its ``DeviceResources`` here: the children's grants as its
memory, the hypercalls its DeviceClass lists, and the feature it serves
(``SERVICES``).  The runtime messages each feature owns are registered here, before boot;
the features themselves are imported and built when the partition starts
(they need the boot message, and their imports stay out of the boot time,
as they always were); the grant table exists from the start (a child may
share pages while the root boots).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hv.memwire import MemoryMessage, MemoryOp
from hv.wire import Frame
from partitions.root.grants import RootGrants
from partitions.runtime import PartitionRuntime, main

if TYPE_CHECKING:
    from partitions.devices.storage.host import StorageHost
    from partitions.root.vmbus_host import VmbusHost

__all__ = ["SERVICES", "compose"]

#: Which of the root's features a device's VSP serves or reports to
#: (``DeviceResources.service``), by device name.
SERVICES = {"dynmem": "dynmem", "storvsc": "storage"}



def _rescind(host: VmbusHost, obj: dict[str, Any], fr: Frame) -> None:
    child, relid = obj.get("child"), obj.get("relid")
    if isinstance(child, int) and isinstance(relid, int):
        host.rescind(child, relid)


def compose(rt: PartitionRuntime) -> None:
    """Install the root's features in ``rt``."""
    grants = RootGrants(rt)
    grants.install()

    def host() -> VmbusHost | None:
        return rt.features.get("vmbus")

    def storage() -> StorageHost | None:
        return rt.features.get("storage")

    def before_grant(msg: MemoryMessage) -> None:
        if msg.op == MemoryOp.REVOKE and (h := host()) is not None:
            h.on_revoke(msg.grant_id)
        if (s := storage()) is not None:
            s.on_memory(msg)  # the IDE worker's DMA reach

    def after_grant(msg: MemoryMessage) -> None:
        if msg.op == MemoryOp.GRANT and (h := host()) is not None:
            h.on_grant()

    grants.before.append(before_grant)
    grants.after.append(after_grant)

    rt.on("partition", rt.to_feature("vmbus", lambda h, o, f: h.on_partition(o)))
    rt.on("rescind", rt.to_feature("vmbus", _rescind))
    rt.on("dm", rt.to_feature("dynmem", lambda mm, o, f: mm.on_frame(o, f)))
    rt.on("dm.settings", rt.to_feature("dynmem", lambda mm, o, f: mm.on_frame(o, f)))
    rt.on("intercept", rt.to_feature("storage", lambda s, o, f: s.on_intercept_frame(o, f)))
    rt.on("intercept.stop", rt.to_feature("storage", lambda s, o, f: s.on_intercept_frame(o, f)))

    rt.on_message(lambda origin, mtype, payload: (h := host()) is not None
                  and h.on_message(origin, mtype, payload))
    rt.on_tracing(lambda on: (h := host()) is not None and h.set_tracing(on))
    rt.on_report(lambda: (h := host()) is not None and h.send_report())
    rt.on_report(lambda: (s := storage()) is not None and s.send_report())
    rt.on_close("vmbus", lambda: (h := host()) is not None and h.close())
    rt.on_close("storage", lambda: (s := storage()) is not None and s.close())
    rt.on_close("grants", grants.close)

    def start() -> None:
        from partitions.devices.dynmem.manager import MemoryManager
        from partitions.devices.framework import DeviceClass, DeviceResources, Hypercalls
        from partitions.devices.storage.host import StorageHost
        from partitions.root.vmbus_host import VmbusHost

        def resources(dc: DeviceClass, child: int) -> DeviceResources:
            return DeviceResources(
                log=rt.log, hypercalls=Hypercalls(rt.hv, dc.hypercalls), memory=grants.table,
                call_later=rt.call_later, report_soon=rt.report_soon, pump_link=rt.pump_link,
                notify=rt.send, service=rt.features.get(SERVICES.get(dc.name, "")))

        kids = rt.boot_info.get("children")
        children = kids if isinstance(kids, list) else []
        rt.features["vmbus"] = vmbus = VmbusHost(rt, children, grants.table, resources)
        rt.features["dynmem"] = MemoryManager(vmbus, children)
        rt.features["storage"] = StorageHost(rt, children)

    rt.on_start(start)


if __name__ == "__main__":
    raise SystemExit(main("root", compose))
