"""VMBus in a child partition: the channel-management client and the VSCs.

Layer: partitions (child), over vmbus (``VmbusClient``, ``Channel``) and the
hv client helpers.  The child's composition root (partitions/child/__main__.py)
plugs ``VmbusGuest`` into its runtime:

1. ``connect``: INITIATE_CONTACT (newest version first; connection ID 4 from
   5.0 on), REQUESTOFFERS.
2. For each offer whose class GUID is a known device the child's config
   lists: allocate the ring pages in its own guest memory (``PageAllocator``),
   initialise both rings, share exactly those pages with the root
   (VIRIDIAN_SHARE_PAGES: the supervisor checks they are ours), describe them
   in a GPADL, and on GPADL_CREATED send OPENCHANNEL.
3. On OPENCHANNEL_RESULT(0): take the channel's doorbells (the supervisor
   sent them on our link before the root could answer), attach the rings,
   start the VSC.
4. Rescind (RESCIND_CHANNELOFFER) or the root going down: stop the VSC,
   detach, revoke the grant, free the pages, RELID_RELEASED.  Close by us:
   CLOSECHANNEL, GPADL_TEARDOWN, then (on GPADL_TORNDOWN) the same clean-up.

Trust: the root is trusted for the control protocol (as a guest trusts its
host's VMBus), but its ring writes are still validated by the ring.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hv.abi import HV_MESSAGE_TYPE_VMBUS, HvStatus
from hv.memwire import MemoryMessage, MemoryOp
from partitions.devices import (
    DeviceClass,
    DeviceError,
    DeviceResources,
    Vsc,
    by_class_id,
    device_spec,
)
from partitions.guestmem import OutOfGuestMemory, PageAllocator
from partitions.reporting import channel_stats, make_packet_tracer, message_event
from vmbus import protocol as P
from vmbus.channel import Channel, init_channel_buffer
from vmbus.client import ClientChannel, ClientState, VmbusClient
from vmbus.doorbell import Doorbell
from vmbus.errors import RingCorruptError

if TYPE_CHECKING:
    from hv.wire import Frame
    from partitions.runtime import PartitionRuntime

__all__ = ["VmbusGuest"]

DOORBELL_WAIT_S = 2.0


@dataclass
class GuestChannel:
    relid: int
    device: DeviceClass
    config: dict[str, Any]
    pfn: int = 0
    npages: int = 0
    send_pages: int = 0
    grant_id: int = 0
    gpadl: int = 0
    channel: Channel | None = None
    vsc: Vsc | None = None
    state: str = "offered"
    opened_at: float = 0.0
    offered_at: float = 0.0


class VmbusGuest:
    """A child's VMBus (the client's ``ClientNotifier``).

    ``alloc``: the guest page allocator the rings come from (default: a new
    one over the partition's memory).  ``resources(device_class)``: what a
    VSC is given (the composition root decides)."""

    def __init__(self, rt: PartitionRuntime, devices: list[Any],
                 alloc: PageAllocator | None = None,
                 resources: Callable[[DeviceClass], DeviceResources] | None = None) -> None:
        self.rt = rt
        self.alloc = alloc if alloc is not None else PageAllocator(rt.memory)
        self.resources = resources or (lambda dc: DeviceResources(log=rt.log))
        self.wanted: dict[str, dict[str, Any]] = {}
        for entry in devices:
            try:
                name, cfg = device_spec(entry)
            except ValueError as e:
                rt.log("device ignored", level="warning", error=str(e))
                continue
            self.wanted.setdefault(name, cfg)
        self.client = VmbusClient(self)
        self.channels: dict[int, GuestChannel] = {}
        self.doorbells: dict[int, list[int]] = {}  # relid -> [to_root, to_child] fds
        self.tracing = False
        self.errors = 0
        self.on_channel_open: list[Any] = []  # callbacks(GuestChannel): tests, benchmarks
        self._last_report: Any = None

    # -- actions -----------------------------------------------------------------
    def connect(self) -> None:
        if self.client.state in (ClientState.DISCONNECTED, ClientState.FAILED):
            self.client = VmbusClient(self)
            self.client.connect()

    def send(self, msg: P.Message, connection_id: int) -> None:
        self.trace_message("out", msg)
        data = P.encode(msg)
        for attempt in range(100):  # Linux retries a refused post, with backoff
            st = self.rt.hv.post_message(connection_id, HV_MESSAGE_TYPE_VMBUS, data)
            if st != HvStatus.INSUFFICIENT_BUFFERS:
                break
            time.sleep(min(0.001 * 2**attempt, 0.05))
        if st != HvStatus.SUCCESS:
            self.rt.log("VMBus message not delivered", level="warning", what=msg.TYPE.name,
                        status=int(st))

    def on_message(self, origin: int, message_type: int, payload: bytes) -> None:
        if origin != 0 or message_type != HV_MESSAGE_TYPE_VMBUS:
            return
        if self.tracing:
            try:
                self.trace_message("in", P.decode(payload))
            except P.ProtocolError:
                pass
        self.client.handle_bytes(payload)

    def on_doorbells_frame(self, obj: dict[str, Any], fr: Frame) -> None:
        """The runtime's ``doorbells`` message: adopt its fds."""
        if self.on_doorbells(obj, fr.fds):
            fr.fds = []  # adopted

    def on_memory_change(self, op: int, msg: MemoryMessage) -> None:
        """Pages the host ballooned out are the allocator's no more."""
        if op == MemoryOp.BALLOON:
            lost = sum(self.alloc.withdraw(seg.gpa_pfn, seg.npages) for seg in msg.segments)
            if lost:
                self.rt.log("the host took pages in use", level="error", pages=lost)

    def on_doorbells(self, obj: dict[str, Any], fds: list[int]) -> bool:
        """The supervisor's doorbells for channel ``relid`` (adopts the fds)."""
        relid = obj.get("relid")
        if not isinstance(relid, int) or len(fds) != 2:
            return False
        for fd in self.doorbells.pop(relid, []):
            _close(fd)
        self.doorbells[relid] = list(fds)
        return True

    def on_root(self, obj: dict[str, Any]) -> None:
        if obj.get("state") == "down":
            self.rt.log("root went down: channels rescinded")
            for relid in list(self.channels):
                self._release(relid, "the root went down", tell_root=False)
            self.client = VmbusClient(self)
        elif obj.get("state") == "up":
            self.connect()
        self.rt.report_soon()

    def workload(self, obj: dict[str, Any]) -> None:
        """A ``workload`` request: ``close`` / ``open`` act on the device's
        channel itself (the child closes it, or opens it again); anything
        else goes to the VSC."""
        name = obj.get("device", "echo")
        action = str(obj.get("action"))
        if action in ("close", "open"):
            for gc in self.channels.values():
                if gc.device.name == name:
                    if action == "close" and gc.state == "open":
                        self.rt.log("closing channel", relid=gc.relid, device=name)
                        self.close(gc.relid)
                    elif action == "open" and gc.state in ("closed", "failed") \
                            and not gc.gpadl and not gc.npages:
                        self.rt.log("opening channel again", relid=gc.relid, device=name)
                        gc.offered_at = time.monotonic()
                        try:
                            self._setup(gc)
                        except (OutOfGuestMemory, ValueError, OSError) as e:
                            self.rt.log("channel not opened", level="error", relid=gc.relid,
                                        error=str(e))
                            self._free(gc)
                            gc.state = "failed"
                    else:
                        self.rt.log("workload refused", level="warning", device=name,
                                    error=f"cannot {action} a channel that is {gc.state}")
                    self.rt.report_soon()
                    return
        for gc in self.channels.values():
            if gc.device.name == name and gc.vsc is not None and not gc.vsc.closed:
                try:
                    what = gc.vsc.workload(str(obj.get("action")), obj.get("args") or {})
                    self.rt.log("workload", device=name, relid=gc.relid, what=what)
                except (ValueError, TypeError) as e:
                    self.rt.log("workload refused", level="warning", error=str(e))
                self.rt.report_soon()
                return
        self.rt.log("workload: no open channel of that device", level="warning", device=name)

    # -- ClientNotifier ----------------------------------------------------------
    def connected(self, version: int) -> None:
        self.rt.log("VMBus connected", version=f"{version >> 16}.{version & 0xFFFF}")

    def connect_failed(self) -> None:
        self.rt.log("VMBus: the root supports none of our versions", level="error")

    def offered(self, ch: ClientChannel) -> None:
        dc = by_class_id(ch.offer.if_type)
        relid = ch.offer.child_relid
        if dc is None or dc.name not in self.wanted:
            self.trace_event({"what": "offer ignored", "relid": relid,
                              "class_id": str(ch.offer.if_type)})
            return
        gc = GuestChannel(relid, dc, dict(self.wanted[dc.name]), offered_at=time.monotonic())
        self.channels[relid] = gc
        try:
            self._setup(gc)
        except (OutOfGuestMemory, ValueError, OSError) as e:
            self.rt.log("channel not opened", level="error", relid=relid, error=str(e))
            self._free(gc)
            gc.state = "failed"

    def _setup(self, gc: GuestChannel) -> None:
        cfg = gc.config
        send = int(cfg.get("send_ring_pages", gc.device.send_ring_pages))
        recv = int(cfg.get("recv_ring_pages", gc.device.recv_ring_pages))
        if send < 2 or recv < 2:
            raise ValueError("each ring needs at least 2 pages")
        gc.npages, gc.send_pages = send + recv, send
        gc.pfn = self.alloc.alloc(gc.npages)
        buf = self.alloc.view_of(gc.pfn, gc.npages)
        try:
            buf[:] = bytes(len(buf))  # pages may have held an old ring
            init_channel_buffer(buf, send)
        finally:
            buf.release()
        pfns = list(range(gc.pfn, gc.pfn + gc.npages))
        st, gid = self.rt.hv.share_pages(pfns)
        if st != HvStatus.SUCCESS:
            raise ValueError(f"the supervisor refused to share the ring pages (status {st})")
        gc.grant_id = gid
        gc.gpadl = self.client.create_gpadl(gc.relid, pfns)
        gc.state = "gpadl"

    def all_offers_delivered(self) -> None:
        self.rt.report_soon()

    def gpadl_created(self, relid: int, gpadl: int, status: int) -> None:
        gc = self.channels.get(relid)
        if gc is None or gc.gpadl != gpadl:
            return
        if status != 0:
            self.rt.log("root refused the ring GPADL", level="error", relid=relid, status=status)
            gc.gpadl = 0
            self._free(gc)
            gc.state = "failed"
            return
        ud = gc.device.vsc.open_userdata(gc.config)
        self.client.open(relid, gpadl, gc.send_pages, ud)
        gc.state = "opening"

    def gpadl_torndown(self, gpadl: int) -> None:
        for gc in self.channels.values():
            if gc.gpadl == gpadl:
                gc.gpadl = 0
                self._free(gc)
                self.rt.report_soon()

    def opened(self, ch: ClientChannel, status: int) -> None:
        relid = ch.offer.child_relid
        gc = self.channels.get(relid)
        if gc is None:
            return
        if status != 0:
            self.rt.log("root refused to open the channel", level="error", relid=relid,
                        status=status)
            gc.state = "failed"
            return
        fds = self.doorbells.pop(relid, None)
        if fds is None:
            self.rt.pump_link()
            fds = self.doorbells.pop(relid, None)
        if fds is None:
            self.rt.log("channel opened without doorbells: closing", level="error", relid=relid)
            self.close(relid)
            return
        buf = self.alloc.view_of(gc.pfn, gc.npages)
        to_root, to_child = fds
        try:
            chan = Channel(buf, gc.send_pages, host=False, own_doorbell=Doorbell(to_child),
                           peer_doorbell=Doorbell(to_root), relid=relid)
        except (ValueError, RingCorruptError) as e:
            self.rt.log("cannot attach the rings", level="error", relid=relid, error=str(e))
            self.close(relid)
            return
        finally:
            buf.release()
        gc.channel = chan
        gc.vsc = gc.device.vsc(chan, gc.config, self.rt.log,
                               resources=self.resources(gc.device))
        gc.vsc.tracer = make_packet_tracer(self.rt, "root", relid) if self.tracing else None
        gc.state = "open"
        gc.opened_at = time.monotonic()
        self.rt.watch(chan.fileno(), lambda: self.service(gc))
        self.rt.log("channel open", relid=relid, device=gc.device.name,
                    setup_ms=round((gc.opened_at - gc.offered_at) * 1000, 3))
        self.trace_event({"what": "channel open", "relid": relid, "class": gc.device.name})
        try:
            gc.vsc.on_open()
        except Exception as e:
            self.rt.log("device on_open failed", level="error", relid=relid, error=repr(e))
        for cb in list(self.on_channel_open):
            cb(gc)
        self.rt.report_soon()

    def rescinded(self, ch: ClientChannel) -> None:
        relid = ch.offer.child_relid
        self.trace_event({"what": "rescinded", "relid": relid})
        self._release(relid, "rescinded by the root", tell_root=True)
        if relid not in self.channels:  # an offer we had ignored
            try:
                self.client.release(relid)
            except ValueError:
                pass

    def unloaded(self) -> None:
        for relid in list(self.channels):
            self._release(relid, "unloaded", tell_root=False)

    def protocol_error(self, reason: str) -> None:
        self.errors += 1
        if self.errors <= 20:
            self.rt.log("root sent a bad VMBus message", level="warning", reason=reason[:200])

    # -- the data path -------------------------------------------------------------
    def service(self, gc: GuestChannel) -> None:
        vsc = gc.vsc
        if vsc is None or vsc.closed or gc.channel is None or gc.channel.closed:
            return
        try:
            more = vsc.service()
        except (RingCorruptError, DeviceError, ValueError) as e:
            self.rt.log("channel broken: closing", level="error", relid=gc.relid,
                        error=f"{type(e).__name__}: {e}")
            self.close(gc.relid)
            return
        self.rt.report_soon()
        if more:
            self.rt.again(lambda: self.service(gc))

    # -- closing -------------------------------------------------------------------
    def close(self, relid: int) -> None:
        """Close a channel we opened: CLOSECHANNEL, then GPADL_TEARDOWN; the
        pages are freed on GPADL_TORNDOWN."""
        gc = self.channels.get(relid)
        if gc is None:
            return
        self._detach(gc, "closed by the child")
        try:
            self.client.close(relid)
            if gc.gpadl:
                self.client.teardown_gpadl(gc.gpadl)
        except ValueError:
            self._free(gc)
        gc.state = "closed"
        self.rt.report_soon()

    def _detach(self, gc: GuestChannel, reason: str) -> None:
        if gc.vsc is not None:
            gc.vsc.close(reason)
        if gc.channel is not None:
            self.rt.unwatch(gc.channel.fileno())
            gc.channel.close()
            gc.channel = None
        for fd in self.doorbells.pop(gc.relid, []):
            _close(fd)

    def _release(self, relid: int, reason: str, *, tell_root: bool) -> None:
        gc = self.channels.pop(relid, None)
        if gc is None:
            return
        self._detach(gc, reason)
        gc.gpadl = 0
        self._free(gc)
        gc.state = "rescinded"
        self.rt.log("channel released", relid=relid, reason=reason)
        self.rt.report_soon()
        if tell_root:
            try:
                self.client.release(relid)
            except ValueError:
                pass

    def _free(self, gc: GuestChannel) -> None:
        """Revoke the grant and free the pages (the root no longer maps them)."""
        if gc.gpadl:
            return  # still described to the root: wait for GPADL_TORNDOWN
        if gc.grant_id:
            try:
                self.rt.hv.revoke_grant(gc.grant_id)
            except (OSError, TimeoutError):
                pass
            gc.grant_id = 0
        if gc.npages:
            self.alloc.free(gc.pfn)
            gc.npages = 0

    # -- status and tracing ----------------------------------------------------------
    def send_report(self) -> None:
        """The runtime's report tick: channel status, when it changed."""
        chans = self.report()
        if chans != self._last_report:
            self._last_report = chans
            self.rt.send({"op": "report", "channels": chans})

    def report(self) -> list[dict[str, Any]]:
        out = []
        for relid, gc in sorted(self.channels.items()):
            entry: dict[str, Any] = {"relid": relid, "class": gc.device.name,
                                     "state": gc.state, "end": "vsc",
                                     "ring_pages": gc.npages, "grant": gc.grant_id}
            entry.update(channel_stats(gc.channel))
            if gc.vsc is not None:
                entry["device"] = gc.vsc.stats()
            if gc.opened_at:
                entry["setup_ms"] = round((gc.opened_at - gc.offered_at) * 1000, 3)
            out.append(entry)
        return out

    def set_tracing(self, on: bool) -> None:
        self.tracing = on
        for relid, gc in self.channels.items():
            if gc.vsc is not None:
                gc.vsc.tracer = make_packet_tracer(self.rt, "root", relid) if on else None

    def trace_message(self, direction: str, msg: P.Message) -> None:
        if self.tracing:
            self.rt.trace(message_event(direction, "root", msg))

    def trace_event(self, ev: dict[str, Any]) -> None:
        if self.tracing:
            self.rt.trace({"dir": "-", "peer": "root", **ev})

    def close_all(self) -> None:
        for relid in list(self.channels):
            gc = self.channels[relid]
            self._detach(gc, "partition stopping")


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
