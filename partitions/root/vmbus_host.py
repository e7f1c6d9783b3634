"""VMBus in the root partition: one channel-management server per child, and the VSPs.

Layer: partitions (root), over vmbus (``VmbusServer``, ``Channel``) and the
hv client helpers (hypercalls, grants).  The root's composition root
(partitions/root/__main__.py) plugs ``VmbusHost`` into its runtime: SynIC
messages from children (their
OriginationId names the child; nobody can forge it) go to that child's
``VmbusServer``; the server's decisions come back here as notifier calls:

* ``validate_gpadl``: the GPADL's pages must be exactly the pages of one
  grant the child made with VIRIDIAN_SHARE_PAGES (the supervisor already
  checked the child owns them), page-aligned, not overlapping another live
  GPADL of that child.  The grant's frame reaches us on the link before the
  child could post the GPADL (the supervisor sends it before replying to the
  child); should it lag, the check waits up to ``GRANT_WAIT_S``.
* ``open_channel``: map the ring GPADL (the grant's pages, one mapping), ask
  the supervisor for the channel's two doorbells (VIRIDIAN_CHANNEL_DOORBELLS;
  the child gets its copies first), attach both rings, start the VSP.
* ``close_channel`` / ``teardown_gpadl``: stop the VSP, detach, forget.

Hostile children: a control-protocol error is one log line (the server
closes the channel it names); a ring the child corrupted, a payload the
device refuses, or a doorbell flood (wake-ups with nothing to read) closes
that channel and rescinds it, with one log line.  Nothing a child does
raises out of this module.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hv.abi import HV_MESSAGE_TYPE_VMBUS, PAGE_SIZE, HvStatus
from hv.partition_memory import GpaError
from partitions.devices import (
    DEVICES,
    DeviceClass,
    DeviceError,
    DeviceResources,
    Vsp,
    device_spec,
    disk_offers,
)
from partitions.reporting import channel_stats, make_packet_tracer, message_event
from vmbus import protocol as P
from vmbus.channel import Channel
from vmbus.doorbell import Doorbell
from vmbus.errors import RingCorruptError
from vmbus.server import GpadlState, ServerChannel, ServerGpadl, VmbusServer

if TYPE_CHECKING:
    from hv.partition_memory import GrantTable
    from partitions.runtime import PartitionRuntime

__all__ = ["GRANT_WAIT_S", "VmbusHost"]

GRANT_WAIT_S = 1.0
RETRY_S = 0.005  # a post refused with INSUFFICIENT_BUFFERS is retried after this
MAX_QUEUED_MESSAGES = 512  # per child, waiting for message buffers
# A doorbell flood: in one window, more than FLOOD_SPURIOUS wake-ups that found
# nothing to read, and more than FLOOD_RATIO of them per packet read.  An
# honest child rings only on empty -> non-empty (or space freed), so its
# spurious wake-ups (a ring for data an earlier pass already took) stay below
# its packets: a busy ping-pong channel makes ~0.3 per packet, thousands a
# second.  A pure rate threshold would sooner or later close a fast honest
# channel; the ratio never does.
FLOOD_WINDOW_S = 1.0
FLOOD_SPURIOUS = 5000
FLOOD_RATIO = 4
LOGGED_ERRORS = 20  # protocol errors logged per child (the rest are counted)
_INSTANCE_NS = uuid.UUID("b0d6c1f4-3f2a-4c6e-8d43-7669726964ff")


@dataclass
class HostChannel:
    relid: int
    device: DeviceClass
    channel: Channel
    vsp: Vsp
    spurious: int = 0  # wake-ups with nothing to read in this window
    window_start: float = field(default_factory=time.monotonic)
    window_packets: int = 0  # vsp.last_activity when the window started


class ChildBus:
    """VMBus towards one child: its server, offers, GPADL grants, channels
    (the server's ``ServerNotifier``)."""

    def __init__(self, host: VmbusHost, child_id: int, name: str, devices: list[Any]) -> None:
        self.host = host
        self.rt = host.rt
        self.child = child_id
        self.name = name
        self.server = VmbusServer(self)
        conns = self.rt.connections.get("to_child_message", {})
        self.conn = int(conns.get(str(child_id), 0x10000 + child_id))
        self.offers: dict[int, tuple[DeviceClass, dict[str, Any]]] = {}
        self.channels: dict[int, HostChannel] = {}
        self.gpadl_grants: dict[int, int] = {}  # gpadl handle -> grant id
        self.waiting: dict[int, ServerGpadl] = {}  # gpadl -> one whose grant has not come
        self.outq: deque[bytes] = deque()
        self.resetting = False  # the bus reset after a queue overflow is pending
        self.errors = 0
        for i, entry in enumerate(devices):
            try:
                dname, cfg = device_spec(entry)
            except ValueError as e:
                self.rt.log("device not offered", level="warning", child=name, error=str(e))
                continue
            dc = DEVICES[dname]
            relid = len(self.offers) + 1
            inst = uuid.uuid5(_INSTANCE_NS, f"{self.rt.cluster}/{name}/{i}/{dname}")
            self.offers[relid] = (dc, cfg)
            self.server.offer(P.OfferChannel(dc.class_id, inst, child_relid=relid,
                                             connection_id=2))

    # -- ServerNotifier --------------------------------------------------------
    def send(self, msg: P.Message) -> None:
        if self.resetting:
            return  # what the bus says before its reset is void
        data = P.encode(msg)
        self.host.trace_message("out", self.name, msg)
        if self.outq:
            self._queue(data)
        else:
            self._post(data)

    def _post(self, data: bytes) -> bool:
        st = self.rt.hv.post_message(self.conn, HV_MESSAGE_TYPE_VMBUS, data)
        if st == HvStatus.SUCCESS:
            return True
        if st == HvStatus.INSUFFICIENT_BUFFERS:
            self._queue(data)
        # INVALID_PORT_ID: the child is down; its next contact starts over
        return False

    def _queue(self, data: bytes) -> None:
        if len(self.outq) >= MAX_QUEUED_MESSAGES:
            self.protocol_error("does not read its VMBus messages; resetting its bus", None)
            self.outq.clear()
            # Not from here: this runs inside the server's own handler (a
            # reset under it would pull its state away mid-message).
            self.resetting = True
            self.rt.again(self._overflow_reset)
            return
        first = not self.outq
        self.outq.append(data)
        if first:
            self.rt.call_later(RETRY_S, self._retry)

    def _overflow_reset(self) -> None:
        self.resetting = False
        self.outq.clear()
        self.server.reset("message queue overflow")

    def _retry(self) -> None:
        while self.outq:
            data = self.outq[0]
            st = self.rt.hv.post_message(self.conn, HV_MESSAGE_TYPE_VMBUS, data)
            if st == HvStatus.INSUFFICIENT_BUFFERS:
                self.rt.call_later(RETRY_S, self._retry)
                return
            self.outq.popleft()

    def validate_gpadl(self, relid: int, g: ServerGpadl) -> None:
        # Each refusal is one protocol error (complete_gpadl logs it).
        if g.byte_offset != 0 or g.byte_count != g.pages * PAGE_SIZE:
            self.server.complete_gpadl(g.gpadl, False, "is not whole pages")
            return
        if len(set(g.pfns)) != len(g.pfns):
            self.server.complete_gpadl(g.gpadl, False, "names a page twice")
            return
        in_use = {pfn for gid, other in self._live_gpadls() if gid != g.gpadl
                  for pfn in other.pfns}
        if not in_use.isdisjoint(g.pfns):
            self.server.complete_gpadl(g.gpadl, False, "overlaps another GPADL")
            return
        if not self._match(g):
            self.rt.pump_link()  # the grant frame may be waiting on the link
            if not self._match(g):
                self.waiting[g.gpadl] = g
                self.rt.call_later(GRANT_WAIT_S, lambda: self._give_up(g.gpadl))

    def _live_gpadls(self) -> list[tuple[int, ServerGpadl]]:
        return [(gid, g) for gid, g in self.server.gpadls.items()
                if gid in self.gpadl_grants]

    def _match(self, g: ServerGpadl) -> bool:
        gid = self.host.grants.find(self.child, g.pfns, exclude=self.gpadl_grants.values())
        if gid is None:
            return False
        self.gpadl_grants[g.gpadl] = gid
        self.waiting.pop(g.gpadl, None)
        self.server.complete_gpadl(g.gpadl, True)
        return True

    def grant_arrived(self) -> None:
        for g in list(self.waiting.values()):
            self._match(g)

    def _give_up(self, gpadl: int) -> None:
        if self.waiting.pop(gpadl, None) is not None:
            self.server.complete_gpadl(gpadl, False)  # logs "pages the child does not own"

    def open_channel(self, ch: ServerChannel, userdata: bytes) -> None:
        relid = ch.relid
        status = self._open(ch, userdata)
        self.server.complete_open(relid, status)
        hc = self.channels.get(relid)
        if status == 0 and hc is not None:
            self.host.trace_event({"dir": "-", "child": self.name, "relid": relid,
                                   "what": "channel open", "class": hc.device.name})
            try:
                hc.vsp.on_open()
            except Exception as e:
                self.fail(hc, f"device on_open failed: {e!r}")

    def _open(self, ch: ServerChannel, userdata: bytes) -> int:
        relid = ch.relid
        gid = self.gpadl_grants.get(ch.ring_gpadl)
        gm = self.host.grants.get(gid) if gid is not None else None
        if gm is None:
            return 1
        try:
            buf = gm.contiguous()
        except GpaError:
            self.protocol_error("ring GPADL is not one run of pages", relid)
            return 1
        dc, cfg = self.offers[relid]
        st, fds = self.rt.hv.channel_doorbells(self.child, relid)
        if st != HvStatus.SUCCESS:
            self.rt.log("no doorbells for a channel", level="warning", child=self.name,
                        relid=relid, status=int(st))
            return 1
        own, peer = Doorbell(fds[0]), Doorbell(fds[1])
        try:
            chan = Channel(buf, ch.downstream_offset, host=True, own_doorbell=own,
                           peer_doorbell=peer, relid=relid)
        except (ValueError, RingCorruptError) as e:
            own.close()
            peer.close()
            self.protocol_error(f"ring buffer refused: {e}", relid)
            return 1
        vsp = dc.vsp(chan, cfg, self.rt.log, child=self.child, userdata=bytes(userdata),
                     resources=self.host.resources(dc, self.child))
        try:
            status = int(vsp.accept())
        except Exception as e:
            self.protocol_error(f"device refused the open: {e!r}", relid)
            status = 1
        if status:
            vsp.close("open refused")
            chan.close()
            return status
        hc = HostChannel(relid, dc, chan, vsp)
        self.channels[relid] = hc
        vsp.tracer = self.host.packet_tracer(self.name, relid) if self.host.tracing else None
        self.rt.watch(chan.fileno(), lambda: self.host.service(self, hc))
        self.rt.report_soon()
        return 0

    def close_channel(self, ch: ServerChannel, reason: str) -> None:
        self._close(ch.relid, reason)

    def _close(self, relid: int, reason: str) -> None:
        hc = self.channels.pop(relid, None)
        if hc is None:
            return
        self.rt.unwatch(hc.channel.fileno())
        hc.vsp.close(reason)
        hc.channel.close()
        self.host.trace_event({"dir": "-", "child": self.name, "relid": relid,
                               "what": "channel closed", "reason": reason})
        self.rt.report_soon()

    def teardown_gpadl(self, g: ServerGpadl) -> None:
        self.gpadl_grants.pop(g.gpadl, None)
        self.waiting.pop(g.gpadl, None)
        if g.state is GpadlState.TEARING_DOWN:
            self.server.complete_teardown(g.gpadl)

    def protocol_error(self, reason: str, relid: int | None) -> None:
        self.errors += 1
        self.rt.report_soon()  # (the count is in status: vmbus_errors)
        if self.errors <= LOGGED_ERRORS:
            self.rt.log("child broke the VMBus protocol", level="warning", child=self.name,
                        relid=relid, reason=reason[:200],
                        **({"further_errors": "counted, not logged"}
                           if self.errors == LOGGED_ERRORS else {}))
        self.host.trace_event({"dir": "in", "child": self.name, "relid": relid,
                               "what": "protocol error", "reason": reason[:200]})

    # -- channel failures ------------------------------------------------------
    def fail(self, hc: HostChannel, reason: str, level: str = "warning") -> None:
        """The child broke channel ``hc``: close and rescind it, one log line."""
        if self.channels.get(hc.relid) is not hc:
            return
        self.rt.log("channel closed", level=level, child=self.name, relid=hc.relid,
                    device=hc.device.name, reason=reason[:300])
        try:
            self.server.rescind(hc.relid)  # closes it (close_channel) and tells the child
        except ValueError:  # the server has no such relid any more: just detach
            self._close(hc.relid, reason)

    def internal_error(self, e: Exception) -> None:
        """Handling this child's message raised (a bug, not the child's
        fault alone): log it, reset its bus (closing its channels) and go on
        serving the others."""
        self.rt.log("VMBus message handling failed: resetting the child's bus", level="error",
                    child=self.name, error=f"{type(e).__name__}: {e}"[:300])
        self.outq.clear()
        try:
            self.server.reset("internal error")
        except Exception as e2:  # its state is broken: at least drop the channels
            self.rt.log("VMBus reset failed", level="error", child=self.name, error=repr(e2))
            for relid in list(self.channels):
                self._close(relid, "internal error")

    def child_down(self) -> None:
        self.outq.clear()
        self.waiting.clear()
        self.server.reset("the child exited")
        self.gpadl_grants.clear()

    def report(self) -> list[dict[str, Any]]:
        out = []
        for relid, sch in sorted(self.server.channels.items()):
            dc = self.offers.get(relid, (None, {}))[0]
            hc = self.channels.get(relid)
            entry: dict[str, Any] = {
                "child": self.name, "relid": relid, "class": dc.name if dc else "?",
                "class_id": str(sch.offer.if_type), "instance_id": str(sch.offer.if_instance),
                "state": sch.state.value, "end": "vsp",
            }
            entry.update(channel_stats(hc.channel if hc else None))
            if hc is not None:
                entry["device"] = hc.vsp.stats()
            out.append(entry)
        return out


class VmbusHost:
    """The root's VMBus: a ``ChildBus`` per child, fed by the runtime.

    ``grants``: the root's table of the pages children shared with it (ring
    GPADLs must be exactly one grant's pages).  ``resources(device_class,
    child)``: what a VSP is given (the composition root decides)."""

    def __init__(self, rt: PartitionRuntime, children: list[dict[str, Any]],
                 grants: GrantTable,
                 resources: Callable[[DeviceClass, int], DeviceResources] | None = None) -> None:
        self.rt = rt
        self.grants = grants
        self.resources = resources or (lambda dc, child: DeviceResources(log=rt.log))
        self.buses: dict[int, ChildBus] = {}
        self.tracing = False
        self.unknown = 0  # messages from partitions that are not our children
        self._last_report: Any = None
        self._last_errors: Any = None
        for c in children:
            try:
                cid, name = int(c["id"]), str(c["name"])
            except (KeyError, TypeError, ValueError):
                continue
            devices = list(c.get("devices") if isinstance(c.get("devices"), list) else [])
            devices += disk_offers(c.get("disks"))  # e.g. a SCSI controller per scsi disk
            self.buses[cid] = ChildBus(self, cid, name, devices)

    # -- from the runtime --------------------------------------------------------
    def on_message(self, origin: int, message_type: int, payload: bytes) -> None:
        bus = self.buses.get(origin)
        if bus is None:
            self.unknown += 1
            if self.unknown <= LOGGED_ERRORS:
                self.rt.log("message from an unknown sender dropped", level="warning",
                            origin=origin, message_type=message_type)
            return
        if message_type != HV_MESSAGE_TYPE_VMBUS:  # a child may post any type: capped too
            bus.protocol_error(f"message of type {message_type:#x} is not a VMBus message", None)
            return
        try:
            msg = bus.server.decode(payload)
            if msg is None:
                return
            self.trace_message("in", bus.name, msg)
            bus.server.handle(msg)
        except (ConnectionError, TimeoutError):
            raise  # the supervisor link failed: the runtime's business
        except Exception as e:  # a bug a child's message hit: that child's bus only
            bus.internal_error(e)

    def on_grant(self) -> None:
        for bus in self.buses.values():
            if bus.waiting:
                bus.grant_arrived()

    def on_revoke(self, grant_id: int) -> None:
        """A grant is about to go: close any channel whose ring lives in it."""
        for bus in self.buses.values():
            for gpadl, gid in list(bus.gpadl_grants.items()):
                if gid != grant_id:
                    continue
                for relid, sch in list(bus.server.channels.items()):
                    if sch.ring_gpadl == gpadl and relid in bus.channels:
                        bus.server.close(relid, "its ring memory was revoked")

    def on_partition(self, obj: dict[str, Any]) -> None:
        bus = self.buses.get(obj.get("id"))  # type: ignore[arg-type]
        if bus is not None and obj.get("state") == "down":
            bus.child_down()
            self.rt.report_soon()

    def rescind(self, child: int, relid: int) -> None:
        bus = self.buses.get(child)
        if bus is None:
            return
        try:
            bus.server.rescind(relid)
            self.rt.log("channel rescinded", child=bus.name, relid=relid)
        except ValueError as e:
            self.rt.log("rescind refused", level="warning", child=bus.name, error=str(e))
        self.rt.report_soon()

    def service(self, bus: ChildBus, hc: HostChannel) -> None:
        if hc.channel.closed:
            return
        try:
            before = hc.vsp.last_activity
            more = hc.vsp.service()
        except (RingCorruptError, DeviceError, ValueError) as e:
            bus.fail(hc, f"{type(e).__name__}: {e}")
            return
        except (ConnectionError, TimeoutError):
            raise  # the supervisor link failed: the runtime's business
        except Exception as e:  # a device bug a child's packet hit: that channel only
            bus.fail(hc, f"device failed: {type(e).__name__}: {e}", level="error")
            return
        self.rt.report_soon()
        if more:
            self.rt.again(lambda: self.service(bus, hc))
        elif hc.vsp.last_activity == before and not hc.vsp.backlog:
            self._spurious(bus, hc)

    def _spurious(self, bus: ChildBus, hc: HostChannel) -> None:
        """A wake-up that found nothing to read: count it; close the channel
        on a doorbell flood (see FLOOD_RATIO)."""
        now = time.monotonic()
        if now - hc.window_start > FLOOD_WINDOW_S:
            hc.window_start, hc.spurious = now, 0
            hc.window_packets = hc.vsp.last_activity
        hc.spurious += 1
        if hc.spurious > FLOOD_SPURIOUS:
            packets = hc.vsp.last_activity - hc.window_packets
            if hc.spurious > FLOOD_RATIO * packets:
                bus.fail(hc, f"doorbell flood: {hc.spurious} wake-ups with nothing to read "
                         f"and {packets} packets in {now - hc.window_start:.2f} s")

    # -- status and tracing --------------------------------------------------------
    def send_report(self) -> None:
        """The runtime's report tick: channel status and protocol error
        counts to the supervisor, each when it changed."""
        chans = self.report()
        if chans != self._last_report:
            self._last_report = chans
            self.rt.send({"op": "report", "channels": chans})
        errors = self.error_counts()
        if errors != self._last_errors:
            self._last_errors = errors
            self.rt.send({"op": "vmbus.errors", "errors": errors})

    def report(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for bus in self.buses.values():
            out.extend(bus.report())
        return out

    def error_counts(self) -> dict[str, int]:
        """VMBus protocol errors per child (all counted; the first 20 logged)."""
        return {bus.name: bus.errors for bus in self.buses.values()}

    def set_tracing(self, on: bool) -> None:
        self.tracing = on
        for bus in self.buses.values():
            for relid, hc in bus.channels.items():
                hc.vsp.tracer = self.packet_tracer(bus.name, relid) if on else None

    def trace_message(self, direction: str, peer: str, msg: P.Message) -> None:
        if self.tracing:
            self.rt.trace(message_event(direction, peer, msg))

    def trace_event(self, ev: dict[str, Any]) -> None:
        if self.tracing:
            self.rt.trace(ev)

    def packet_tracer(self, peer: str, relid: int) -> Any:
        return make_packet_tracer(self.rt, peer, relid)

    def close(self) -> None:
        for bus in self.buses.values():
            for relid in list(bus.channels):
                bus.close_channel(bus.server.channels[relid], "root stopping")
