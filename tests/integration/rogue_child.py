"""A rogue child partition for tests/integration/test_rogue_channels.py.

Loaded in every partition with ``VIRIDIAN_PARTITION_HOOK=rogue_child:run``;
only child1 turns rogue, and only when ``VIRIDIAN_ROGUE`` names a scenario.
child1 first behaves (its VMBus connects and opens its echo channel, relid
1, as any child's does; in the ``control`` scenario it holds that offer back
until the attack), then waits for the test's trigger, the control op
``workload`` with action ``attack``, and attacks the root:

``write_index`` / ``read_index`` / ``packet_offset`` / ``packet_len``
    corrupt the shared ring (a write_index beyond the data area, an
    unaligned read_index in the root's outgoing ring, a packet whose
    offset8 is below the descriptor, a packet whose len8 runs past the
    data written), then ring the root's doorbell.
``control``
    malformed and out-of-order control messages, then 40 more garbage
    messages, then the honest open of the held-back channel and one echo.
``flood_garbage`` / ``flood_contact`` / ``flood_signals``
    thousands of HvPostMessage (garbage, half of it not even of the VMBus
    message type; INITIATE_CONTACT, which the root answers; GPADL headers
    never completed) or HvSignalEvent to the root's VMBus connections,
    pipelined without waiting for replies; statuses are counted.
``doorbell``
    ring the root's doorbell of the open channel in a tight loop, nothing
    in the ring, until a SynIC message (the rescind) arrives.
``gpadl``
    GPADLs over the ring's own pages (with and without a second grant of
    them), over pages never shared, over pages outside its memory, and one
    honest extra GPADL; then one echo on the open channel.

Everything the rogue sees and does is a ``rogue ...`` record in child1's
JSON-lines log, which the test reads.
"""

from __future__ import annotations

import os
import select
import struct
import time
from typing import Any

from hv.abi import HV_MESSAGE_TYPE_VMBUS, VMBUS_EVENT_CONNECTION_ID, HvStatus
from hv.wire import FrameKind, result_status
from vmbus import protocol as P
from vmbus.protocol import MessageType

RELID = 1
FLOOD_MESSAGES = 4000
FLOOD_SIGNALS = 20000
FLOOD_MAX_S = 6.0
# Floods whose messages the root answers go on (up to FLOOD_MAX_S) until this
# many got in, whatever the load: past the root's 512-reply queue for contacts,
# well past the 64 pending GPADLs (yet under 512 answers) for GPADL headers.
DELIVER = {"contact": 1200, "gpadl": 200}
DOORBELL_FLOOD_MAX_S = 8.0
ROGUE_GPADL = 0x0BAD0000  # handles the rogue builds by hand (the client counts from 0xE1E10)
ROGUE_FLOOD = 0x0F100000  # handles of the GPADL flood
_DESC = struct.Struct("<HHHHQ")  # type, offset8, len8, flags, trans_id


def run(rt: Any) -> None:
    scenario = os.environ.get("VIRIDIAN_ROGUE", "")
    if rt.name != "child1" or not scenario:
        return
    rt.start()  # run() would; we wrap the child's VMBus end first
    Rogue(rt, scenario)


class Rogue:
    def __init__(self, rt: Any, scenario: str) -> None:
        self.rt = rt
        self.scenario = scenario
        self.guest = rt.vmbus
        self.gc: Any = None  # the open echo channel (relid 1)
        self.held: Any = None  # the held-back offer (control scenario)
        self.awaiting: dict[int, str] = {}  # rogue GPADL handle -> what it was
        self.results: dict[str, int] = {}
        self.extra: dict[str, Any] = {}
        self.flood_answers: dict[int, int] = {}  # GPADL_CREATED status -> count
        self.flood_expect: int | None = None
        self.attacked = False
        self._on_message = self.guest.on_message
        self._offered = self.guest.offered
        self._workload = self.guest.workload
        self.guest.on_message = self.on_message
        self.guest.offered = self.offered
        self.guest.workload = self.workload
        self.guest.on_channel_open.append(self.opened)
        self.log("rogue ready", scenario=scenario)

    def log(self, event: str, **fields: Any) -> None:
        self.rt.log(event, **fields)

    # -- what the child sees ------------------------------------------------------------
    def on_message(self, origin: int, message_type: int, payload: bytes) -> None:
        try:
            msg = P.decode(payload)
        except P.ProtocolError as e:
            self.log("rogue saw", what="undecodable", error=str(e))
            return
        t = msg.TYPE
        if t is MessageType.GPADL_CREATED and msg.gpadl in self.awaiting:
            what = self.awaiting.pop(msg.gpadl)
            self.results[what] = msg.creation_status
            self.log("rogue saw", what="GPADL_CREATED", gpadl=msg.gpadl, kind=what,
                     status=msg.creation_status)
            if not self.awaiting:
                self.gpadls_answered()
            return
        if t is MessageType.GPADL_CREATED and ROGUE_FLOOD <= msg.gpadl < ROGUE_FLOOD + 2**24:
            st = msg.creation_status
            self.flood_answers[st] = self.flood_answers.get(st, 0) + 1
            self.flood_answered()
            return
        if t is MessageType.GPADL_TORNDOWN and msg.gpadl >= ROGUE_GPADL:
            self.log("rogue saw", what="GPADL_TORNDOWN", gpadl=msg.gpadl)
            self.free_extra()
            return
        if t in (MessageType.RESCIND_CHANNELOFFER, MessageType.OPENCHANNEL_RESULT,
                 MessageType.GPADL_CREATED):
            self.log("rogue saw", what=t.name, **{k: getattr(msg, k) for k in
                                                  ("child_relid", "status", "creation_status")
                                                  if hasattr(msg, k)})
        self._on_message(origin, message_type, payload)

    def offered(self, ch: Any) -> None:
        if self.scenario == "control" and ch.offer.child_relid == RELID and not self.attacked:
            self.held = ch  # opened after the attack
            self.log("rogue holds the offer back", relid=RELID)
            return
        self._offered(ch)

    def opened(self, gc: Any) -> None:
        if gc.relid != RELID:
            return
        self.gc = gc
        self.log("rogue channel open", relid=gc.relid, pfn=gc.pfn, npages=gc.npages,
                 send_pages=gc.send_pages)
        if self.scenario == "control" and self.attacked:
            self.rt.call_later(0.0, lambda: self.echo("after control messages"))

    def workload(self, obj: dict[str, Any]) -> None:
        if obj.get("action") != "attack":
            self._workload(obj)
            return
        if self.attacked:
            self.log("rogue: attack already done")
            return
        self.attacked = True
        self.log("rogue attacks", scenario=self.scenario)
        getattr(self, "attack_" + self.scenario.split("_")[0])()

    # -- helpers ---------------------------------------------------------------------------
    def post(self, data: bytes, conn: int | None = None) -> int:
        """One control message, retried while the root's buffers are full."""
        conn = conn or self.guest.client.msg_conn_id
        for attempt in range(200):
            st = self.rt.hv.post_message(conn, HV_MESSAGE_TYPE_VMBUS, data)
            if st != HvStatus.INSUFFICIENT_BUFFERS:
                return int(st)
            time.sleep(min(0.0005 * 2**attempt, 0.02))
        return int(st)

    def ring_view(self) -> memoryview:
        gc = self.gc
        return self.guest.alloc.view_of(gc.pfn, gc.npages)

    def ring_root(self) -> None:
        self.gc.channel.peer_doorbell.ring()

    def echo(self, when: str) -> None:
        gc = self.gc
        try:
            got = gc.vsc.echo(b"rogue ping", timeout=3.0)
            self.log("rogue echo", when=when, ok=got[:10] == b"rogue ping")
        except (TimeoutError, ValueError, OSError) as e:
            self.log("rogue echo", when=when, ok=False, error=repr(e))

    # -- 1. corrupt ring indices / packets ---------------------------------------------------
    def attack_write(self) -> None:
        self.corrupt("write_index")

    def attack_read(self) -> None:
        self.corrupt("read_index")

    def attack_packet(self) -> None:
        self.corrupt(self.scenario)

    def corrupt(self, how: str) -> None:
        gc = self.gc
        out_dsize = (gc.send_pages - 1) * 4096  # child -> root ring's data area
        if how == "read_index":
            # stop reading what the root sends (else our reader would put a good
            # read_index back)
            self.rt.unwatch(gc.channel.fileno())
        with self.ring_view() as buf:
            w = struct.unpack_from("<I", buf, 0)[0]
            if how == "write_index":
                struct.pack_into("<I", buf, 0, out_dsize + 64)
            elif how == "read_index":
                # the root -> child ring (the root writes it, we own its read_index)
                struct.pack_into("<I", buf, gc.send_pages * 4096 + 4, 12345)
            else:
                if how == "packet_offset":
                    desc = _DESC.pack(6, 1, 3, 0, 7)  # offset8 1: inside the descriptor
                else:
                    desc = _DESC.pack(6, 2, 0x800, 0, 7)  # len8: 16 KiB, 32 bytes written
                buf[4096 + w: 4096 + w + 32] = desc.ljust(32, b"\0")
                struct.pack_into("<I", buf, 0, (w + 32) % out_dsize)
        sent = 0
        if how == "read_index":
            # Make the root write more than the ring holds: its writer looks at
            # our read_index again when its cached free space runs out.
            for i in range(2 * gc.send_pages):
                if not gc.channel.send(b"r" * 4000, 0.5, trans_id=1000 + i,
                                       completion_requested=True):
                    break
                sent += 1
        self.ring_root()
        self.log("rogue attacked", how=how, write_index_was=w, requests=sent)

    # -- 2. malformed and out-of-order control messages ------------------------------------
    def attack_control(self) -> None:
        ud = bytes(120)
        sent = [
            ("no header", b"\x03\x00"),
            ("truncated OPENCHANNEL", P.encode(P.OpenChannel(RELID, RELID, 0x1234))[:20]),
            ("unknown type", struct.pack("<II", 99, 0)),
            ("host-only type", P.encode(P.VersionResponse(1))),
            ("GPADL_BODY unknown", P.encode(P.GpadlBody(0, 0xDEAD, struct.pack("<Q", 5)))),
            ("OPENCHANNEL before GPADL",
             P.encode(P.OpenChannel(RELID, RELID, 0xE1E99, 0, 2, ud))),
            ("second REQUESTOFFERS", P.encode(P.RequestOffers())),
            ("CLOSECHANNEL not open", P.encode(P.CloseChannel(RELID))),
            ("GPADL_TEARDOWN unknown", P.encode(P.GpadlTeardown(RELID, 0xBEEF))),
            ("RELID_RELEASED not rescinded", P.encode(P.RelidReleased(RELID))),
            ("OPENCHANNEL unknown relid", P.encode(P.OpenChannel(42, 42, 0xE1E10, 0, 2, ud))),
        ]
        statuses = {what: self.post(data) for what, data in sent}
        garbage = [self.post(struct.pack("<II", 0xFFFF, i)) for i in range(40)]
        self.log("rogue control sent", statuses=statuses,
                 garbage_ok=garbage.count(HvStatus.SUCCESS), garbage=len(garbage))
        if self.held is not None:  # now the honest open, on the same bus
            ch, self.held = self.held, None
            self._offered(ch)

    # -- 3. message and signal floods --------------------------------------------------------
    def attack_flood(self) -> None:
        hv = self.rt.hv
        kind = self.scenario.split("_", 1)[1]
        t0 = time.monotonic()
        if kind == "signals":
            n = FLOOD_SIGNALS
            for i in range(n):
                hv.signal_event(VMBUS_EVENT_CONNECTION_ID, i % 2048, wait=False)
                if i % 512 == 511:
                    self.take_replies()
            barrier = hv.signal_event(VMBUS_EVENT_CONNECTION_ID, 0)
        else:
            n = FLOOD_MESSAGES
            conn = self.guest.client.msg_conn_id
            if kind == "contact":
                # Each is answered, and we read no answer while we flood: more
                # than the root queues for us (MAX_QUEUED_MESSAGES) must get in.
                conn = 4
                data = P.encode(P.InitiateContact.v5(P.Version.WIN10_V5_3))
            target = DELIVER.get(kind)
            if target:
                n = 1 << 30  # until target got in (or FLOOD_MAX_S)
            deadline = t0 + FLOOD_MAX_S
            every = 64 if kind == "gpadl" else 256  # barrier, count, maybe stop
            for i in range(n):
                if kind == "garbage":
                    data = struct.pack("<II", 0x7777, i)
                elif kind == "gpadl":  # declares 1000 pages, carries one
                    data = P.encode(P.GpadlHeader(RELID, ROGUE_FLOOD + i, 8 + 8 * 1000, 1,
                                                  struct.pack("<IIQ", 1000 * 4096, 0, i + 1)))
                # half of the garbage is not even of the VMBus message type
                mtype = 0x42 if kind == "garbage" and i % 2 else HV_MESSAGE_TYPE_VMBUS
                hv.post_message(conn, mtype, data, wait=False)
                if i % every == every - 1:
                    # the supervisor answers in order: after this reply, all
                    # refusals of the posts before it are in
                    hv.signal_event(VMBUS_EVENT_CONNECTION_ID, 0)
                    refused = sum(self.take_replies().values())
                    if target and (i + 1 - refused >= target or time.monotonic() > deadline):
                        n = i + 1
                        break
            # the supervisor answers in order: once this is through, so are the replies
            barrier = self.post(struct.pack("<II", 0x7778, 0), conn)
        failed = self.take_replies()
        statuses = {"SUCCESS": n - sum(failed.values())}
        for st, k in failed.items():
            statuses[_name(st)] = k
        self.log("rogue flood done", kind=kind, sent=n, statuses=statuses,
                 barrier=_name(barrier), seconds=round(time.monotonic() - t0, 3))
        if kind == "gpadl":  # the root keeps MAX_PENDING_GPADLS, refuses the rest
            from vmbus.server import MAX_PENDING_GPADLS

            self.flood_expect = max(0, statuses["SUCCESS"] - MAX_PENDING_GPADLS)
            self.flood_answered()
        if kind != "contact":  # the bus is untouched: the channel still echoes
            self.rt.call_later(0.0, lambda: self.echo("after the flood"))

    def flood_answered(self) -> None:
        if self.flood_expect is not None and sum(self.flood_answers.values()) >= \
                self.flood_expect:
            self.log("rogue gpadl flood answered", expected=self.flood_expect,
                     answers={str(k): v for k, v in self.flood_answers.items()})
            self.flood_expect = None

    def take_replies(self) -> dict[int, int]:
        """Count (and remove) the failure replies of pipelined hypercalls."""
        hv = self.rt.hv
        try:
            hv.read_available(1)  # one read, no waiting
        except ConnectionError:
            pass
        keep, counts = [], self.extra.setdefault("failed", {})
        for fr in hv.unsolicited:
            if fr.kind == FrameKind.REPLY:
                st = int(result_status(int.from_bytes(fr.body[:8], "little")))
                counts[st] = counts.get(st, 0) + 1
            else:
                keep.append(fr)
        hv.unsolicited.clear()
        hv.unsolicited.extend(keep)
        return counts

    # -- 4. doorbell flood ------------------------------------------------------------------
    def attack_doorbell(self) -> None:
        fd = self.gc.channel.peer_doorbell.fileno()
        synic = self.rt.synic.fileno()
        rings, t0 = 0, time.monotonic()
        deadline = t0 + DOORBELL_FLOOD_MAX_S
        stopped_by = "deadline"
        write = os.eventfd_write
        while time.monotonic() < deadline:
            for _ in range(2000):
                write(fd, 1)
            rings += 2000
            if select.select([synic], [], [], 0)[0]:  # a message: the rescind
                stopped_by = "message"
                break
        self.log("rogue doorbell flood done", rings=rings, stopped_by=stopped_by,
                 seconds=round(time.monotonic() - t0, 3))

    # -- 5. overlapping and foreign GPADLs ---------------------------------------------------
    def attack_gpadl(self) -> None:
        gc, hv = self.gc, self.rt.hv
        ring = list(range(gc.pfn, gc.pfn + gc.npages))
        st, self.extra["dup_grant"] = hv.share_pages(ring[:4])  # the ring's pages, again
        self.log("rogue shared ring pages again", status=int(st))
        unshared = self.guest.alloc.alloc(4)
        self.extra["unshared"] = unshared
        honest = self.guest.alloc.alloc(4)
        self.extra["honest"] = honest
        honest_pfns = list(range(honest, honest + 4))
        st, self.extra["honest_grant"] = hv.share_pages(honest_pfns)
        self.log("rogue shared fresh pages", status=int(st))
        outside = 1 << 30  # 4 TiB: beyond any child's memory
        plan = [
            ("overlap_ring", ring),
            ("overlap_regranted", ring[:4]),
            ("foreign_unshared", list(range(unshared, unshared + 4))),
            ("foreign_outside", [outside, outside + 1]),
            ("honest", honest_pfns),
        ]
        for i, (what, pfns) in enumerate(plan):
            handle = ROGUE_GPADL + i
            self.awaiting[handle] = what
            self.extra.setdefault("handles", {})[what] = handle
            for msg in P.gpadl_messages(RELID, handle, pfns):
                self.post(P.encode(msg))
        self.log("rogue GPADLs sent", plan=[w for w, _ in plan])

    def gpadls_answered(self) -> None:
        self.log("rogue gpadl results", results=self.results)
        self.rt.call_later(0.0, lambda: self.echo("after the GPADLs"))
        if self.results.get("honest") == 0:  # tear the honest one down again
            h = self.extra["handles"]["honest"]
            self.post(P.encode(P.GpadlTeardown(RELID, h)))

    def free_extra(self) -> None:
        hv = self.rt.hv
        for key in ("dup_grant", "honest_grant"):
            if self.extra.get(key):
                hv.revoke_grant(self.extra.pop(key))
        for key in ("unshared", "honest"):
            if key in self.extra:
                self.guest.alloc.free(self.extra.pop(key))
        self.log("rogue released its extra pages")


def _name(st: int) -> str:
    try:
        return HvStatus(st).name
    except ValueError:
        return str(st)
