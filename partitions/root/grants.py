"""The root's table of the pages children shared with it (their grants).

Layer: partitions (root).  A child shares pages with VIRIDIAN_SHARE_PAGES;
the supervisor checks they are the child's and sends the root a GRANT
MEMORY frame with the child's memfds (REVOKE when the child takes them
back).  ``RootGrants`` takes those frames from the runtime
(``take_memory``), tells the features that care (``before``: while the
frame's fds are open and before the table changes, e.g. the VMBus host
closing a channel whose ring is being revoked, the storage host forwarding
the grant to a device worker; ``after``: once it changed, e.g. a GPADL
that waited for its grant), and keeps the table (``table``).

Trust: the supervisor (trusted) made the frame; the child chose the pages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from hv.memwire import MemoryMessage, MemoryOp
from hv.partition_memory import GrantTable

if TYPE_CHECKING:
    from hv.wire import Frame
    from partitions.runtime import PartitionRuntime

__all__ = ["RootGrants"]


class RootGrants:
    """The root's grants; ``install`` makes the runtime hand it GRANT and REVOKE."""

    def __init__(self, rt: PartitionRuntime) -> None:
        self.rt = rt
        self.table = GrantTable()
        self.before: list[Callable[[MemoryMessage], None]] = []
        self.after: list[Callable[[MemoryMessage], None]] = []

    def install(self) -> None:
        self.rt.take_memory((MemoryOp.GRANT, MemoryOp.REVOKE), self.on_frame)

    def on_frame(self, fr: Frame) -> None:
        msg = MemoryMessage.from_frame(fr)  # a child's shared pages
        try:
            for fn in self.before:
                fn(msg)
            self.table.apply(msg)
        finally:
            msg.close_fds()
        self.rt.log("grant" if msg.op == MemoryOp.GRANT else "revoke",
                    grant_id=msg.grant_id, owner=msg.owner,
                    pages=sum(seg.npages for seg in msg.segments))
        for fn in self.after:
            fn(msg)

    def close(self) -> None:
        self.table.close()
