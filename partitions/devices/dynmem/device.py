"""The Dynamic Memory device (hv_balloon): a DM VSP in the root, a DM VSC in each child.

Protocol: spec §7, messages in ``dm_protocol``.  Roles, as in Hyper-V:

* the **supervisor** owns memory: a hot-add is a new memfd range it maps into
  the child (VIRIDIAN_MEMORY_HOT_ADD, within the child's maximum and what
  the host can give); a balloon punches the pages the child gave up out of
  its memory (VIRIDIAN_MEMORY_BALLOON, never below its minimum, only pages
  that are the child's and not shared); unballoon maps ballooned pages back.
* the **DM VSP** (root) drives the protocol: version and capabilities, the
  child's pressure reports, one hot-add / balloon / unballoon at a time;
  ``partitions/devices/dynmem/balancer.py`` decides when.
* the **DM VSC** (child) answers: it hands hot-added pages to its page
  allocator at once, gives its highest free pages to the balloon, and
  reports its committed pages every second.

Results of an operation go to a callback as a dict: ``ok``, ``error`` (why
not: "above the maximum ...", "not enough host memory ...", "the guest
refused ...", "the channel is not open"), ``pages``, ``ms``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hv.abi import MAX_MEMORY_RANGES, PAGE_SIZE, HvStatus
from partitions.devices.framework import DeviceClass, DeviceError, Vsc, Vsp, register
from vmbus.packet import Packet, PacketType

from . import protocol as D

__all__ = ["DYNMEM", "OP_TIMEOUT_S", "STATUS_EVERY_S", "DmVsc", "DmVsp"]

STATUS_EVERY_S = 1.0  # the guest's pressure report period (Linux: about 1 s)
OP_TIMEOUT_S = 5.0  # a hot-add / balloon the guest does not answer in time fails
MAX_PENDING_RANGES = 4096  # balloon response ranges gathered for one request
GIVE_UP_TICKS = 40  # the bursts workload waits this many periods for memory
NOT_READING = "the child does not read its dynamic memory channel"

Done = Callable[[dict[str, Any]], None]

_VERSIONS = (D.DmVersion.WIN10, D.DmVersion.WIN8, D.DmVersion.WIN7)


def _mib(pages: int) -> str:
    return f"{pages * PAGE_SIZE / (1 << 20):g} MiB"


class DmVsp(Vsp):
    """Root side: negotiation, pressure, and the operations the balancer or
    the CLI asks for (one outstanding at a time, as the protocol requires)."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.version: int | None = None
        self.ready = False
        self.committed_pages = 0
        self.avail_pages = 0
        self.reports = 0
        self.op: dict[str, Any] | None = None  # the outstanding operation
        self.ballooned_pages = 0
        self.hot_added_pages = 0
        self.failures = 0
        self._tid = 0

    # -- from the child ------------------------------------------------------------
    def on_packets(self, pkts: list[Packet]) -> None:
        for p in pkts:
            if p.packet_type != PacketType.DATA_INBAND:
                raise DeviceError(f"dynamic memory takes inband packets, not {p.packet_type:#x}")
            try:
                msg, tid = D.decode(p.payload)
            except D.DmProtocolError as e:
                raise DeviceError(f"bad dynamic memory message: {e}") from None
            self._on_message(msg, tid)

    def _send(self, msg: D.DmMessage, tid: int) -> None:
        """An answer to the child's own message (a failure closes its channel:
        we are handling its packets)."""
        if not self.post(msg.encode(tid)):
            raise DeviceError(NOT_READING)

    def _on_message(self, msg: D.DmMessage, tid: int) -> None:
        if self.ready and isinstance(msg, (D.VersionRequest, D.CapabilitiesReport)):
            # once per channel: each answer is packets and a log line
            raise DeviceError(f"{msg.TYPE.name} after dynamic memory was negotiated")
        if isinstance(msg, D.VersionRequest):
            ok = msg.version in _VERSIONS
            if ok:
                self.version = msg.version
            self._send(D.VersionResponse(ok), tid)
        elif isinstance(msg, D.CapabilitiesReport):
            if self.version is None:
                raise DeviceError("CAPABILITIES_REPORT before a version was agreed")
            self.ready = True
            self._send(D.CapabilitiesResponse(True), tid)
            maximum = self._settings().get("maximum")
            if isinstance(maximum, int) and self.version >= D.DmVersion.WIN8:
                # DM_INFO (>= 1.0): the most memory this guest may ever have
                self._send(D.InfoMessage.max_page_count(maximum // PAGE_SIZE), 0)
            self.log("dynamic memory ready", child=self.child, version=f"{self.version:#x}",
                     balloon=msg.balloon, hot_add=msg.hot_add)
        elif isinstance(msg, D.StatusReport):
            if not self.ready:
                raise DeviceError("STATUS_REPORT before capabilities")
            self.committed_pages = msg.num_committed
            self.avail_pages = msg.num_avail
            self.reports += 1
            mm = self.res.service  # the root's MemoryManager (manager.py)
            if mm is not None:
                mm.on_status(self)
        elif isinstance(msg, D.HotAddResponse):
            self._hot_add_done(msg, tid)
        elif isinstance(msg, D.BalloonResponse):
            self._balloon_part(msg, tid)
        elif isinstance(msg, D.UnballoonResponse):
            op = self._current("unballoon", tid)
            self._finish(True, pages=op["pages"])
        else:
            raise DeviceError(f"{msg.TYPE.name} is not a message a guest sends")

    def _settings(self) -> dict[str, Any]:
        mm = self.res.service
        return mm.settings.get(self.child, {}) if mm is not None else {}

    # -- operations (root side) ----------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.op is not None

    def _start(self, kind: str, done: Done, **extra: Any) -> dict[str, Any] | None:
        if self.closed or not self.ready:
            done({"ok": False, "error": "the dynamic memory channel is not open"
                  + ("" if self.closed else " yet (negotiating)")})
            return None
        if self.op is not None:
            done({"ok": False, "error": f"a {self.op['kind']} is already in progress"})
            return None
        if self.backlog:
            # The child does not read what we sent: refuse here.  An operation
            # may start inside another child's packet handling (the balancer)
            # or a supervisor request; nothing of this child's may raise there.
            done({"ok": False, "error": NOT_READING})
            return None
        self._tid = self._tid + 1 & 0xFFFFFFFF or 1
        op = {"kind": kind, "tid": self._tid, "done": done, "t0": time.monotonic(), **extra}
        self.op = op
        self.res.call_later(OP_TIMEOUT_S, lambda: self._timeout(op))
        return op

    def _timeout(self, op: dict[str, Any]) -> None:
        if self.op is op:
            if op["kind"] == "hot-add" and "start" in op:
                # the supervisor mapped the range into the child: it is the
                # child's (it may be using it) whether or not it answers
                self.hot_added_pages += op["count"]
            self._finish(False, error=f"the guest did not answer the {op['kind']} within "
                         f"{OP_TIMEOUT_S:g} s")

    def _current(self, kind: str, tid: int) -> dict[str, Any]:
        op = self.op
        if op is None or op["kind"] != kind or op["tid"] != tid:
            raise DeviceError(f"an unexpected {kind} response (trans_id {tid})")
        return op

    def _request(self, msg: D.DmMessage, op: dict[str, Any]) -> bool:
        """Send a request of operation ``op``: False (never an exception)
        when the child's ring and backlog are full."""
        return self.post(msg.encode(op["tid"]))

    def fail(self, error: str) -> None:
        """End the outstanding operation, if any, as failed."""
        self._finish(False, error=error)

    def _finish(self, ok: bool, **result: Any) -> None:
        op, self.op = self.op, None
        if op is None:
            return
        if not ok:
            self.failures += 1
        result.update(ok=ok, action=op["kind"],
                      ms=round((time.monotonic() - op["t0"]) * 1000, 3))
        try:
            op["done"](result)
        except Exception as e:  # a caller's bug must not break the channel
            self.log("dynamic memory callback failed", level="error", error=repr(e))

    def hot_add(self, nbytes: int, done: Done) -> None:
        """Grow the child by ``nbytes``: the supervisor maps a new range into
        it, then the child is asked to use it (HOT_ADD_REQUEST)."""
        op = self._start("hot-add", done, bytes=nbytes)
        if op is None:
            return
        st, start, count = self.res.hypercalls.memory_hot_add(self.child, nbytes)
        if st != HvStatus.SUCCESS:
            self._finish(False, error=self._why(st, "hot-add", nbytes))
            return
        op.update(start=start, count=count)
        if not self._request(D.HotAddRequest(D.PageRange(start, count)), op):
            # the child never heard of the range: the host takes it back
            self._give_back(start, count)
            self._finish(False, error=NOT_READING)

    def _host_takes(self, ranges: list[tuple[int, int]]) -> bool:
        """Ask the supervisor to take ``ranges`` (pages the child does not
        know it has) out of the child; whether it did."""
        st, _ = self.res.hypercalls.memory_balloon(self.child, ranges)
        return st == HvStatus.SUCCESS

    def _give_back(self, start: int, count: int) -> None:
        """Hand hot-added pages the child does not use back to the host; if
        the supervisor keeps them mapped, they are the child's (counted as
        hot-added, as after a timeout)."""
        if not self._host_takes([(start, count)]):
            self.hot_added_pages += count

    def _hot_add_done(self, msg: D.HotAddResponse, tid: int) -> None:
        op = self._current("hot-add", tid)
        start, count = op["start"], op["count"]
        took = min(msg.page_count, count) if msg.result == 1 else 0
        if took < count:
            # the guest did not take all of it: give the rest back to the host
            self._give_back(start + took, count - took)
        self.hot_added_pages += took
        if took == count:
            self._finish(True, pages=took, start=start)
        else:
            self._finish(False, pages=took, error=f"the guest refused: it took {_mib(took)} of "
                         f"{_mib(count)} (result {msg.result})")

    def balloon(self, nbytes: int, done: Done) -> None:
        """Ask the child for ``nbytes`` back (BALLOON_REQUEST); the pages it
        names are then taken out of its memory by the supervisor."""
        pages = nbytes // PAGE_SIZE
        op = self._start("balloon", done, want=pages, ranges=[])
        if op is None:
            return
        if not self._request(D.BalloonRequest(pages), op):
            self._finish(False, error=NOT_READING)

    def _balloon_part(self, msg: D.BalloonResponse, tid: int) -> None:
        op = self._current("balloon", tid)
        op["ranges"].extend((r.start, r.count) for r in msg.ranges if r.count)
        if len(op["ranges"]) > MAX_PENDING_RANGES:
            raise DeviceError("balloon response with too many ranges")
        if msg.more_pages:
            return
        ranges = op["ranges"]
        got = sum(n for _, n in ranges)
        if got > op["want"]:
            raise DeviceError(f"balloon response of {got} pages for a request of {op['want']}")
        if not ranges:
            self._finish(False, pages=0, error="the guest refused: it gave no pages back")
            return
        st, taken = HvStatus.SUCCESS, 0
        for i in range(0, len(ranges), MAX_MEMORY_RANGES):
            chunk = ranges[i : i + MAX_MEMORY_RANGES]
            st, _n = self.res.hypercalls.memory_balloon(self.child, chunk)
            if st != HvStatus.SUCCESS:
                break
            taken += sum(n for _, n in chunk)  # each call is all or nothing
        self.ballooned_pages += taken
        if st != HvStatus.SUCCESS:
            self._finish(False, pages=taken, error=self._why(st, "balloon", got * PAGE_SIZE))
            return
        if got < op["want"]:
            self._finish(True, pages=got, partial=True,
                         note=f"the guest gave {_mib(got)} of {_mib(op['want'])}")
        else:
            self._finish(True, pages=got)

    def unballoon(self, max_bytes: int, done: Done) -> None:
        """Give up to ``max_bytes`` of ballooned memory back to the child."""
        op = self._start("unballoon", done)
        if op is None:
            return
        st, ranges = self.res.hypercalls.memory_unballoon(self.child, max_bytes // PAGE_SIZE)
        if st != HvStatus.SUCCESS:
            self._finish(False, error=self._why(st, "unballoon", max_bytes))
            return
        if not ranges:
            self._finish(True, pages=0)
            return
        op["pages"] = sum(n for _, n in ranges)
        self.ballooned_pages = max(0, self.ballooned_pages - op["pages"])
        step = D.MAX_RANGES_PER_MESSAGE  # (the supervisor gives at most MAX_MEMORY_RANGES)
        chunks = [ranges[i : i + step] for i in range(0, len(ranges), step)]
        for i, chunk in enumerate(chunks):
            rr = tuple(D.PageRange(p, n) for p, n in chunk)
            if not self._request(D.UnballoonRequest(rr, more_pages=i < len(chunks) - 1), op):
                # the child never heard of these pages: the host takes them back
                # (if it cannot, they stay mapped in the child: the child's)
                unsent = [r for c in chunks[i:] for r in c]
                if self._host_takes(unsent):
                    self.ballooned_pages += sum(n for _, n in unsent)
                self._finish(False, error=NOT_READING)
                return

    def _why(self, st: int, what: str, nbytes: int) -> str:
        reason = {
            HvStatus.OPERATION_DENIED: "above the maximum" if what != "balloon"
            else "below the minimum",
            HvStatus.INSUFFICIENT_MEMORY: "not enough host memory",
            HvStatus.ACCESS_DENIED: "the guest named pages that are not its own",
            HvStatus.INVALID_PARTITION_ID: "the child is not running",
        }.get(st, f"the supervisor refused (status {st:#x})")  # type: ignore[call-overload]
        return f"{what} of {_mib(nbytes // PAGE_SIZE)} refused: {reason}"

    def on_close(self, reason: str) -> None:
        self.ready = False
        if self.op is not None:
            self._finish(False, error=f"the dynamic memory channel closed ({reason})")

    def stats(self) -> dict[str, Any]:
        return {"ready": self.ready, "committed_pages": self.committed_pages,
                "avail_pages": self.avail_pages, "reports": self.reports,
                "hot_added_pages": self.hot_added_pages, "ballooned_pages": self.ballooned_pages,
                "busy": self.op["kind"] if self.op else None, "failures": self.failures}


class DmVsc(Vsc):
    """Child side: negotiate, report pressure, hot-add into the allocator,
    balloon from it; plus the ``bursts`` workload (allocate, hold, free)."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self._vi = 0  # index into _VERSIONS
        self.state = "version"
        self._tid = 0
        self.hot_adds = 0
        self.hot_added_pages = 0
        self.balloons = 0
        self.last_hot_add_ms: float | None = None
        self.workload_pages: list[tuple[int, int]] = []  # runs the bursts workload holds
        self.burst: dict[str, Any] | None = None
        self.unmet_pages = 0  # what the workload asked for and did not get (demand too)
        self.max_pages: int | None = None  # from DM_INFO: the most this guest may have
        self.verified_pages = 0  # workload pages checked when freed
        self.corrupt_pages = 0  # ... whose data had changed (must stay 0)

    @property
    def alloc(self) -> Any:
        return self.res.memory  # the guest page allocator

    def _new_tid(self) -> int:
        self._tid = self._tid + 1 & 0xFFFFFFFF
        return self._tid

    def _send(self, msg: D.DmMessage, tid: int | None = None) -> bool:
        return self.post(msg.encode(self._new_tid() if tid is None else tid))

    def on_open(self) -> None:
        self._send(D.VersionRequest(_VERSIONS[0]))

    def on_packet(self, pkt: Packet) -> None:
        try:
            msg, tid = D.decode(pkt.payload)
        except D.DmProtocolError as e:
            raise DeviceError(f"bad dynamic memory message from the root: {e}") from None
        if isinstance(msg, D.VersionResponse):
            if msg.is_accepted:
                self.state = "caps"
                self._send(D.CapabilitiesReport())
            elif self._vi + 1 < len(_VERSIONS):
                self._vi += 1
                self._send(D.VersionRequest(_VERSIONS[self._vi], self._vi == len(_VERSIONS) - 1))
            else:
                self.state = "failed"
        elif isinstance(msg, D.CapabilitiesResponse):
            self.state = "ready" if msg.is_accepted else "failed"
            if self.state == "ready":
                self._report()
        elif isinstance(msg, D.HotAddRequest):
            self._hot_add(msg.range, tid)
        elif isinstance(msg, D.BalloonRequest):
            self._balloon(msg.num_pages, tid)
        elif isinstance(msg, D.UnballoonRequest):
            for r in msg.ranges:
                try:
                    self.alloc.give_back(r.start, r.count)
                except ValueError as e:
                    self.log("unballoon of pages we did not balloon", level="warning", error=str(e))
            if not msg.more_pages:
                self._send(D.UnballoonResponse(), tid)
            self._report_now()
        elif isinstance(msg, D.InfoMessage):
            for t, data in msg.items:
                if t == D.INFO_TYPE_MAX_PAGE_CNT and len(data) == 8:
                    self.max_pages = int.from_bytes(data, "little")
        else:
            raise DeviceError(f"{msg.TYPE.name} is not a message the root sends")

    # -- pressure ------------------------------------------------------------------------
    def status(self) -> D.StatusReport:
        """Committed = pages in use plus what was asked for and not found
        (as Linux's committed memory counts commitments, not only resident
        pages): a guest out of memory shows its pressure."""
        a = self.alloc
        return D.StatusReport(num_avail=a.free_pages,
                              num_committed=a.used_pages + self.unmet_pages)

    def _report(self) -> None:
        if self.closed or self.state != "ready":
            return
        self._send(self.status())
        self.res.call_later(STATUS_EVERY_S, self._report)

    def _report_now(self) -> None:
        if self.state == "ready" and not self.closed:
            self._send(self.status())

    # -- hot-add and balloon ---------------------------------------------------------------
    def _hot_add(self, rng: D.PageRange, tid: int) -> None:
        t0 = time.monotonic()
        if not self._mapped(rng):
            self.res.pump_link()  # the supervisor mapped it before the root asked us
        if not self._mapped(rng):
            self.log("hot-add of pages that are not mapped", level="warning",
                     start=rng.start, count=rng.count)
            self._send(D.HotAddResponse(0, 0), tid)  # transient: the root may retry
            return
        self.alloc.sync()  # usable at once: the allocator hands the pages out from now on
        first = self.alloc.view_of(rng.start, 1)
        first[0] = 1  # first use: the new memory is there (a page fault, no more)
        first[0] = 0
        first.release()
        self.last_hot_add_ms = round((time.monotonic() - t0) * 1000, 3)
        self.hot_adds += 1
        self.hot_added_pages += rng.count
        self._send(D.HotAddResponse(rng.count, 1), tid)
        self.res.notify({"op": "memory", "guest_visible_bytes": self.alloc.view.visible_bytes})
        self.log("hot-add", pages=rng.count, start=rng.start, ms=self.last_hot_add_ms)
        self._report_now()

    def _mapped(self, rng: D.PageRange) -> bool:
        return any(first <= rng.start and rng.end <= first + n
                   for first, n in self.alloc.view.ranges)

    def _balloon(self, pages: int, tid: int) -> None:
        runs = self.alloc.take_highest(pages)
        got = sum(n for _, n in runs)
        self.balloons += 1
        chunks = [runs[i : i + D.MAX_RANGES_PER_MESSAGE]
                  for i in range(0, len(runs), D.MAX_RANGES_PER_MESSAGE)] or [[]]
        for i, chunk in enumerate(chunks):
            rr = tuple(D.PageRange(p, n) for p, n in chunk)
            self._send(D.BalloonResponse(rr, more_pages=i < len(chunks) - 1), tid)
        self.log("balloon", asked=pages, gave=got)
        self._report_now()

    # -- the bursts workload (viridian demo) -------------------------------------------------
    def workload(self, action: str, args: dict[str, Any]) -> str:
        if action == "stop":
            self.burst = None
            self.unmet_pages = 0
            self._free_workload()
            return "stopped"
        if action != "bursts":
            raise ValueError(f"dynmem has workloads bursts and stop, not {action!r}")
        peak = int(args.get("peak_mb", 512))
        step = int(args.get("step_mb", 64))
        period = float(args.get("period_s", 0.5))
        if not 1 <= step <= peak <= 1 << 16 or not 0.05 <= period <= 60:
            raise ValueError("bursts needs 1 <= step_mb <= peak_mb and 0.05 <= period_s <= 60")
        self.burst = {"peak": (peak << 20) // PAGE_SIZE, "step": (step << 20) // PAGE_SIZE,
                      "period": period, "phase": "grow", "hold": 0}
        self._tick(self.burst)
        return f"bursts to {peak} MiB in {step} MiB steps every {period:g} s"

    def _tick(self, b: dict[str, Any]) -> None:
        if self.burst is not b or self.closed:
            return  # stopped, or replaced by a later bursts call (with its own loop)
        held = sum(n for _, n in self.workload_pages)
        if b["phase"] == "grow":
            want = min(b["step"], b["peak"] - held)
            got = self._grab(want)
            self.unmet_pages = want - got
            if held + got >= b["peak"]:
                b["phase"], b["hold"] = "hold", 4
            elif got < want:
                b["hold"] += 1  # memory is short: wait for the balancer to hot-add
                if b["hold"] > GIVE_UP_TICKS:
                    b["phase"], b["hold"] = "hold", 2
            else:
                b["hold"] = 0
        elif b["phase"] == "hold":
            b["hold"] -= 1
            if b["hold"] <= 0:
                b["phase"] = "shrink"
        elif b["phase"] == "shrink":
            self.unmet_pages = 0
            self._drop(b["step"] * 2)
            if not self.workload_pages:
                b["phase"], b["hold"] = "rest", 4
        else:  # rest
            b["hold"] -= 1
            if b["hold"] <= 0:
                b["phase"], b["hold"] = "grow", 0
        self._report_now()
        self.res.call_later(b["period"], lambda: self._tick(b))

    def _grab(self, pages: int) -> int:
        got, chunk = 0, 512  # 2 MiB runs
        while got < pages:
            n = min(chunk, pages - got)
            try:
                pfn = self.alloc.alloc(n)
            except MemoryError:
                break
            mv = self.alloc.view_of(pfn, n)
            for i in range(n):  # touch every page (it becomes resident) with its own mark
                mv[i * PAGE_SIZE : i * PAGE_SIZE + 8] = (pfn + i).to_bytes(8, "little")
            mv.release()
            self.workload_pages.append((pfn, n))
            got += n
        return got

    def _check(self, pfn: int, n: int) -> None:
        """Every page still holds what was written into it (across hot-adds,
        balloons and unballoons of other pages)."""
        mv = self.alloc.view_of(pfn, n)
        for i in range(n):
            if bytes(mv[i * PAGE_SIZE : i * PAGE_SIZE + 8]) != (pfn + i).to_bytes(8, "little"):
                self.corrupt_pages += 1
        mv.release()
        self.verified_pages += n

    def _drop(self, pages: int) -> None:
        freed = 0
        while self.workload_pages and freed < pages:
            pfn, n = self.workload_pages.pop()
            self._check(pfn, n)
            self.alloc.free(pfn)
            freed += n

    def _free_workload(self) -> None:
        while self.workload_pages:
            pfn, n = self.workload_pages.pop()
            if not self.closed:
                self._check(pfn, n)
            self.alloc.free(pfn)

    def on_close(self, reason: str) -> None:
        self.burst = None
        self.unmet_pages = 0
        self._free_workload()

    def stats(self) -> dict[str, Any]:
        a = self.alloc
        return {"state": self.state, "max_pages": self.max_pages, "hot_adds": self.hot_adds,
                "hot_added_pages": self.hot_added_pages, "balloons": self.balloons,
                "ballooned_pages": a.ballooned_pages if a else 0,  # in the balloon now
                "committed_pages": a.used_pages if a else None,
                "free_pages": a.free_pages if a else None,
                "workload_pages": sum(n for _, n in self.workload_pages),
                "verified_pages": self.verified_pages, "corrupt_pages": self.corrupt_pages,
                "last_hot_add_ms": self.last_hot_add_ms}


DYNMEM = register(DeviceClass(
    "dynmem", D.DM_CLASS_ID, DmVsp, DmVsc, send_ring_pages=8, recv_ring_pages=8,
    description="Dynamic Memory (hv_balloon): hot-add, balloon, pressure reports",
    hypercalls=("memory_hot_add", "memory_balloon", "memory_unballoon"),  # the VSP's
))
