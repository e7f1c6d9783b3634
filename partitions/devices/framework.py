"""The device framework: VSPs in the root, VSCs in the children, matched by class GUID.

Layer: partitions, over ``vmbus.channel``.  A device is a ``DeviceClass``:
a name (what configs say), a class GUID (OFFERCHANNEL's ``if_type``), a
``Vsp`` subclass the root runs for each child's channel, a ``Vsc`` subclass
the child runs, and ring sizes.  The partition layer does the VMBus part
(offer, GPADL, open, doorbells, close, rescind: partitions/root/vmbus_host.py and
partitions/child/vmbus_guest.py); a device sees only this lifecycle:

    on_open()          the channel is open; packets may flow
    on_packet(pkt)     a packet that is not the completion of our own request
    on_writable()      ring space came back after a send found it full
    on_close(reason)   the channel is gone (closed, rescinded, peer died)

and these tools, common to both ends (``Endpoint``):

    send(payload, ...)              one packet; False when the ring is full
    request(payload, on_done)       send with a fresh trans_id and completion
                                    requested; ``on_done(pkt)`` gets the
                                    completion (matched by trans_id)
    complete(trans_id, payload)     answer a request with a completion packet
    post(payload, ...)              send, or queue behind a full ring (bounded
                                    backlog; while it is not empty the
                                    endpoint stops reading: backpressure)

Writing a device (docs/devices.md walks through it, in its own folder
``partitions/devices/upper/``)::

    from partitions.devices.framework import DeviceClass, Vsc, Vsp, register

    class UpperVsp(Vsp):
        def on_packet(self, pkt):
            if pkt.completion_requested:
                self.complete(pkt.trans_id, pkt.payload.upper())

    class UpperVsc(Vsc):
        def on_open(self):
            self.request(b"hello", lambda pkt: print(pkt.payload))   # b'HELLO'

    register(DeviceClass("upper", uuid.UUID("..."), UpperVsp, UpperVsc))

in ``partitions/devices/upper/device.py`` (re-exported by its
``__init__.py``), and ``devices = ["upper"]`` in a child's config.

A device is *given* what it may use (``DeviceResources``, built by the
role's composition root): its channel and config, its log, its memory
access (the pages its child granted, in the root; the guest page
allocator, in a child), the hypercalls its ``DeviceClass`` lists, timers,
and the role's feature it serves (the root's Dynamic Memory manager, its
storage host).  It never sees the partition runtime.

Trust: in the root, every packet comes from a child that may be hostile.
The ring validated framing; a device validates its own payloads and raises
``DeviceError`` (or any ``ValueError``) for a bad one: the channel is then
closed with one log line and the root goes on.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmbus.channel import Channel
from vmbus.packet import Packet, PacketType
from vmbus.ring import packet_bytes

__all__ = [
    "DEVICES",
    "DeviceClass",
    "DeviceError",
    "DeviceResources",
    "Endpoint",
    "Hypercalls",
    "Vsc",
    "Vsp",
    "by_class_id",
    "device_spec",
    "disk_clients",
    "disk_offers",
    "register",
]

#: Most packets one ``service`` call reads before yielding to the loop.
SERVICE_BUDGET_PACKETS = 4096
#: Most packets queued behind a full ring before ``post`` refuses.
BACKLOG_LIMIT = 4096
#: After a ``service`` call that read packets, how long it polls the empty
#: ring (interrupts masked: the peer need not ring) before it lets the loop
#: sleep; 0: never.  A call that read nothing never polls, so an idle channel
#: costs nothing.
SERVICE_SPIN_NS = 20_000


_COMP = PacketType.COMP


def _nothing(*a: Any, **k: Any) -> None:
    return None


class DeviceError(ValueError):
    """A peer sent something this device cannot accept (closes the channel)."""


class Hypercalls:
    """The hypercalls one device may make: those its ``DeviceClass`` lists
    (``hypercalls``), passed through to the partition's client; any other
    name is an AttributeError."""

    def __init__(self, client: Any, allowed: Sequence[str]) -> None:
        self._client = client
        self._allowed = frozenset(allowed)

    def __getattr__(self, name: str) -> Any:
        if name in self._allowed:
            return getattr(self._client, name)
        raise AttributeError(f"this device may not make the hypercall {name!r}")


@dataclass
class DeviceResources:
    """What a device is given besides its channel and config (all it may use).

    Attributes:
        log: ``log(event, **fields)``: the partition's JSON log.
        hypercalls: the hypercalls it may make (``Hypercalls``), or None.
        memory: its memory access: in the root, the pages children granted
            (``hv.memory.GrantTable``: ``views(child, pfns)``); in a child,
            its guest page allocator (``partitions.guestmem.PageAllocator``:
            ``alloc``, ``view_of``, ``free``; ``view``, the memory it sees).
        call_later: ``call_later(delay, fn)``: a timer on the partition's loop.
        report_soon: the device's status changed (a report follows).
        pump_link: take in the memory frames and doorbells the supervisor
            already sent (e.g. a range it mapped before the root asked).
        notify: a runtime message to the supervisor (``{"op": "memory", ...}``).
        service: the role's feature this device serves or reports to (the
            root's Dynamic Memory manager, its storage host), or None.
    """

    log: Callable[..., None] = _nothing
    hypercalls: Any = None
    memory: Any = None
    call_later: Callable[[float, Callable[[], None]], None] = _nothing
    report_soon: Callable[[], None] = _nothing
    pump_link: Callable[[], None] = _nothing
    notify: Callable[[dict[str, Any]], None] = _nothing
    service: Any = None


class Endpoint:
    """One device end over one open channel (the VSP and VSC base).

    Args:
        channel: the open channel.
        config: the device's settings from the partition config (a dict).
        log: ``log(event, **fields)`` (default: the resources' log).
        resources: what else the device may use (``DeviceResources``;
            default: nothing).
    """

    role = "?"

    def __init__(self, channel: Channel, config: dict[str, Any] | None = None,
                 log: Callable[..., None] | None = None, *,
                 resources: DeviceResources | None = None) -> None:
        self.channel = channel
        self.config = dict(config or {})
        self.res = resources if resources is not None else DeviceResources()
        self.log = log or (self.res.log if resources is not None else (lambda *a, **k: None))
        self._next_tid = 1
        self._waiting: dict[int, Callable[[Packet], None]] = {}
        self._backlog: deque[tuple[bytes, int, int, PacketType]] = deque()
        self.tracer: Callable[[str, Packet | tuple[int, int, int, int]], None] | None = None
        self.closed = False
        self.last_activity = 0
        self._space_wanted = False  # a send found the ring full: on_writable is owed

    # -- the device's hooks (override) ----------------------------------------
    def on_open(self) -> None:
        """The channel is open."""

    def on_packet(self, pkt: Packet) -> None:
        """A packet arrived (not a completion of one of our requests)."""

    def on_packets(self, pkts: Sequence[Packet]) -> None:
        """A batch arrived; the default hands each to ``on_packet``.  Override
        for devices that can treat a batch at once.  ``pkts`` is a sequence,
        often the ring's ``PacketBatch`` (a private copy): each Packet is made
        when it is indexed or iterated, so a device that only needs
        ``len(pkts)`` makes none."""
        for p in pkts:
            self.on_packet(p)

    def on_writable(self) -> None:
        """Ring space came back (after a full ring, backlog flushed)."""

    def on_close(self, reason: str) -> None:
        """The channel is gone; no more sends."""

    def stats(self) -> dict[str, Any]:
        """Device counters added to the channel's status (override to add)."""
        return {}

    # -- sending ---------------------------------------------------------------
    def send(self, payload: bytes, *, trans_id: int = 0, completion_requested: bool = False,
             packet_type: PacketType = PacketType.DATA_INBAND) -> bool:
        """One packet; False when the ring is full (we are then woken by the
        peer when there is room, and ``on_writable`` runs)."""
        if self.closed:
            return False
        if self._backlog:  # keep order behind what is queued
            return False
        ok = self.channel.try_send(payload, trans_id=trans_id,
                                   completion_requested=completion_requested,
                                   packet_type=packet_type)
        if ok:
            if self.tracer is not None:
                self.tracer("out", (packet_type, 1 if completion_requested else 0, trans_id,
                                    len(payload)))
        else:
            self._want_space(len(payload))
        return ok

    def post(self, payload: bytes, *, trans_id: int = 0, completion_requested: bool = False,
             packet_type: PacketType = PacketType.DATA_INBAND) -> bool:
        """``send``, or queue behind a full ring; False only when the backlog
        is full too.  While anything is queued this end stops reading."""
        if self.send(payload, trans_id=trans_id, completion_requested=completion_requested,
                     packet_type=packet_type):
            return True
        if self.closed or len(self._backlog) >= BACKLOG_LIMIT:
            return False
        self._backlog.append((payload, trans_id, 1 if completion_requested else 0,
                              packet_type))
        return True

    def request(self, payload: bytes, on_done: Callable[[Packet], None], *,
                queue: bool = False) -> int | None:
        """Send ``payload`` with completion requested and a fresh trans_id;
        ``on_done`` gets the completion packet.  Returns the trans_id, or
        None when the ring is full (``queue=True``: queue it instead)."""
        tid = self.new_trans_id()
        sender = self.post if queue else self.send
        if not sender(payload, trans_id=tid, completion_requested=True):
            return None
        self._waiting[tid] = on_done
        return tid

    def new_trans_id(self) -> int:
        """A fresh trans_id for a request of ours (u64, never 0)."""
        tid = self._next_tid
        self._next_tid = tid + 1 if tid < 0xFFFFFFFFFFFFFFFF else 1
        return tid

    def complete(self, trans_id: int, payload: bytes = b"") -> bool:
        """Answer a request: a completion packet (type 0xB) with its trans_id
        (queued behind a full ring)."""
        # The per-request path of every VSP: straight to the ring while nothing
        # is queued or traced; ``post`` (the same, with its bookkeeping) otherwise.
        if not self._backlog and self.tracer is None and not self.closed \
                and self.channel.outgoing.try_write(payload, packet_type=_COMP,
                                                    trans_id=trans_id):
            return True
        return self.post(payload, trans_id=trans_id, packet_type=_COMP)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet completed."""
        return len(self._waiting)

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def _want_space(self, payload_len: int) -> None:
        # The reader rings our doorbell once that much is free.  If it already
        # is (the reader freed it before pending_send_sz was published), no
        # ring will come: ring our own doorbell, so the loop serves us again
        # (backlog flush, on_writable).
        self._space_wanted = True
        if self.channel.request_space(packet_bytes(payload_len)):
            self.channel.doorbell.signal()

    def _flush_backlog(self) -> bool:
        """Send what is queued; True when the backlog is empty."""
        ch = self.channel
        q = self._backlog
        while q:
            payload, tid, creq, ptype = q[0]
            if not ch.try_send(payload, trans_id=tid, completion_requested=bool(creq),
                               packet_type=ptype):
                self._want_space(len(payload))
                return False
            q.popleft()
            if self.tracer is not None:
                self.tracer("out", (ptype, creq, tid, len(payload)))
        return True

    # -- receiving (called by the partition's loop) ----------------------------
    def service(self, budget: int = SERVICE_BUDGET_PACKETS) -> bool:
        """Flush the backlog, then read up to ``budget`` packets and dispatch
        them; once the ring is empty, if this call read anything, poll it for
        up to ``SERVICE_SPIN_NS`` before returning.  Returns True if work
        remains (call again before sleeping).

        Raises:
            vmbus.RingCorruptError, DeviceError, ValueError: the peer broke
                the channel (the caller closes it).
        """
        ch = self.channel
        ch.ack_doorbell()
        if self._backlog:
            if not self._flush_backlog():
                return False  # backpressure: read nothing until the peer makes room
            self._space_wanted = False
            self.on_writable()
        elif self._space_wanted:
            self._space_wanted = False
            self.on_writable()
        n = 0
        waiting = self._waiting
        tracer = self.tracer
        inc = ch.incoming
        drain = inc.drain
        on_packets = self.on_packets
        spin = SERVICE_SPIN_NS
        masked = False  # a successful poll leaves the peer's signals masked
        go = not self._backlog and not self.closed
        while go and n < budget:
            batch = drain(256 if budget - n >= 256 else budget - n)
            k = len(batch)
            if not k:
                if n and spin:
                    # The peer is busy: its next packets usually come sooner
                    # than a wake-up from the loop's select would (tens of us
                    # between vCPUs).  Poll, then unmask and re-check.
                    masked = inc.wait_readable(ch.doorbell, 0.0, spin_ns=spin)
                    if masked:
                        continue
                break
            n += k
            if tracer is None and not waiting:
                # Nothing to pick out first: the device gets the batch itself,
                # whose Packets are made only as it indexes or iterates them
                # (a sink that counts makes none: at 64 B, making them cost
                # 4x the drain).
                on_packets(batch)
            else:
                self._dispatch(batch, waiting, tracer)
            go = not self._backlog and not self.closed
        if masked and not self.closed:
            inc.unmask_interrupts()  # the loop may sleep: the peer must ring again
        self.last_activity += n
        return n >= budget and not self._backlog

    def _dispatch(self, batch: Sequence[Packet], waiting: dict[int, Callable[[Packet], None]],
                  tracer: Callable[[str, Any], None] | None) -> None:
        """A batch, packet by packet: traced, completions of our requests to
        their callbacks, the rest to ``on_packets``."""
        pkts: Sequence[Packet] = list(batch)
        if tracer is not None:
            for p in pkts:
                tracer("in", p)
        if waiting:
            rest = []
            for p in pkts:
                if p.packet_type == PacketType.COMP and p.trans_id in waiting:
                    waiting.pop(p.trans_id)(p)
                else:
                    rest.append(p)
            pkts = rest
        if pkts:
            self.on_packets(pkts)

    def close(self, reason: str) -> None:
        """Tell the device (once) and forget pending requests."""
        if self.closed:
            return
        self.closed = True
        self._backlog.clear()
        self._waiting.clear()
        try:
            self.on_close(reason)
        except Exception as e:  # a device bug must not take the partition down
            self.log("device on_close failed", level="error", error=repr(e))


class Vsp(Endpoint):
    """Root side of a device (a Virtualization Service Provider).

    ``userdata`` is OPENCHANNEL's 120 bytes from the child; ``child`` the
    child's partition id.  ``accept()`` may refuse the open (return a non-zero
    status for OPENCHANNEL_RESULT)."""

    role = "vsp"

    def __init__(self, channel: Channel, config: dict[str, Any] | None = None,
                 log: Callable[..., None] | None = None, *, child: int = 0,
                 userdata: bytes = bytes(120),
                 resources: DeviceResources | None = None) -> None:
        super().__init__(channel, config, log, resources=resources)
        self.child = child
        self.userdata = userdata

    def accept(self) -> int:
        """0 to accept the open; anything else is the refusal status."""
        return 0


class Vsc(Endpoint):
    """Child side of a device (a Virtualization Service Client).

    ``open_userdata(config)`` (a classmethod) gives OPENCHANNEL's 120 bytes."""

    role = "vsc"

    @classmethod
    def open_userdata(cls, config: dict[str, Any]) -> bytes:
        return bytes(120)

    def workload(self, action: str, args: dict[str, Any]) -> str:
        """Start or stop a workload (``viridian demo``, the control socket's
        ``workload`` op).  Returns a short description; raises ValueError for
        an unknown action."""
        raise ValueError(f"this device has no workload {action!r}")


@dataclass(frozen=True)
class DeviceClass:
    """A device type: name, class GUID, both ends, ring sizes.

    ``send_ring_pages`` and ``recv_ring_pages`` are the child's outbound and
    inbound rings, control page included (each at least 2).  ``hypercalls``:
    the hypercalls its ends may make (``DeviceResources.hypercalls``).  ``disk_bus``:
    the device is what a child's disks on that bus (``disks = [{bus = ...}]``)
    bring, not a ``devices`` entry: the root offers one per such disk (its
    settings: ``disk``, ``path``, ``size``) and a child with one wants it."""

    name: str
    class_id: uuid.UUID
    vsp: type[Vsp]
    vsc: type[Vsc]
    send_ring_pages: int = 16
    recv_ring_pages: int = 16
    description: str = ""
    hypercalls: tuple[str, ...] = ()
    disk_bus: str | None = None

    def __post_init__(self) -> None:
        if self.send_ring_pages < 2 or self.recv_ring_pages < 2:
            raise ValueError("each ring needs a control page and at least one data page")


DEVICES: dict[str, DeviceClass] = {}


def register(dc: DeviceClass) -> DeviceClass:
    """Make a device known to both partition kinds (by name and class GUID)."""
    other = by_class_id(dc.class_id)
    if (dc.name in DEVICES and DEVICES[dc.name] is not dc) or (other and other.name != dc.name):
        raise ValueError(f"device {dc.name} or class {dc.class_id} is already registered")
    DEVICES[dc.name] = dc
    return dc


def by_class_id(class_id: uuid.UUID) -> DeviceClass | None:
    for dc in DEVICES.values():
        if dc.class_id == class_id:
            return dc
    return None


def device_spec(entry: object) -> tuple[str, dict]:  # type: ignore[type-arg]
    """A config ``devices`` entry ("echo" or {"type": "echo", ...}) as
    (name, settings).  Raises ValueError for an unknown or malformed entry."""
    if isinstance(entry, str):
        name, cfg = entry, {}
    elif isinstance(entry, dict) and isinstance(entry.get("type"), str):
        name, cfg = entry["type"], {k: v for k, v in entry.items() if k != "type"}
    else:
        raise ValueError(f"a device is a name or a table with a \"type\", not {entry!r}")
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r} (known: {', '.join(sorted(DEVICES))})")
    return name, cfg


def disk_offers(disks: object) -> list[dict[str, Any]]:
    """The root's side of ``DeviceClass.disk_bus``: a ``devices`` entry per
    disk of a child that a device serves, after the child's own entries."""
    out: list[dict[str, Any]] = []
    for d in disks or []:  # type: ignore[attr-defined]
        for dc in DEVICES.values():
            if dc.disk_bus is not None and isinstance(d, dict) and d.get("bus") == dc.disk_bus:
                out.append({"type": dc.name, "disk": d.get("index", 0),
                            "path": d.get("path"), "size": d.get("size", 0)})
    return out


def disk_clients(disks: object) -> list[str]:
    """The child's side of ``DeviceClass.disk_bus``: the devices its disks
    bring (by name, once each; the root's offer carries the settings)."""
    disks = disks or []
    return [dc.name for dc in DEVICES.values() if dc.disk_bus is not None
            and any(isinstance(d, dict) and d.get("bus") == dc.disk_bus
                    for d in disks)]  # type: ignore[attr-defined]
