"""What both VMBus ends report: channel status keys and ``viridian trace`` events.

Layer: partitions.  Used by the root's ``VmbusHost`` and a child's
``VmbusGuest`` alike (the same keys, the same event shapes).
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING, Any

from vmbus import protocol as P
from vmbus.channel import Channel

if TYPE_CHECKING:
    from partitions.runtime import PartitionRuntime

__all__ = ["channel_stats", "make_packet_tracer", "message_event"]


def channel_stats(chan: Channel | None) -> dict[str, Any]:
    """The status keys of a channel (zeros when it is not open)."""
    if chan is None or chan.closed:
        return {"packets_in": 0, "packets_out": 0, "bytes_in": 0, "bytes_out": 0,
                "out_ring_fill": None, "in_ring_fill": None, "signals_sent": 0,
                "signals_suppressed": 0}
    return chan.stats()


def message_event(direction: str, peer: str, msg: P.Message) -> dict[str, Any]:
    """A decoded control message as a trace event."""
    fields: dict[str, Any] = {}
    # dataclasses.fields, not __dataclass_fields__: that also lists the ClassVars
    # (TYPE, _LAYOUT, a struct.Struct that json cannot encode)
    for k in (f.name for f in dataclasses.fields(msg)):
        v = getattr(msg, k)
        if isinstance(v, bytes):
            if not any(v):
                continue
            v = v[:32].hex() + ("..." if len(v) > 32 else "")
        elif isinstance(v, uuid.UUID):
            v = str(v)
        if v in (0, "") and k not in ("child_relid", "status", "version_supported"):
            continue
        fields[k] = v
    return {"dir": direction, "peer": peer, "what": msg.TYPE.name, "fields": fields}


def make_packet_tracer(rt: PartitionRuntime, peer: str, relid: int) -> Any:
    def tracer(direction: str, p: Any) -> None:
        if isinstance(p, tuple):
            ptype, flags, tid, length = p
        else:
            ptype, flags, tid, length = p.packet_type, p.flags, p.trans_id, len(p.payload)
        rt.trace({"dir": direction, "peer": peer, "relid": relid, "what": "packet",
                  "type": int(ptype), "flags": int(flags), "trans_id": int(tid),
                  "len": int(length)})
    return tracer
