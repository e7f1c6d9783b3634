"""The partition side of the cluster: bootstrap, the hypercall client, the idle loop.

Layer: partitions.  ``python -m partitions.root`` and ``python -m
partitions.child`` both run ``main`` here; the supervisor (hv/supervisor/)
starts them with their partition link as fd 3 (hv/link.py)::

    python -m partitions.child --cluster NAME --partition child1 --id 1 --fd 3 \\
        --log RUN/logs/child1.jsonl

Bootstrap, in order: die with the supervisor (PR_SET_PDEATHSIG, so kill -9 of
the supervisor ends every partition), ignore SIGINT (only the supervisor stops
a partition), set the process title ``viridian[CLUSTER]: NAME``, wait for the
supervisor's ``boot`` message (with the SynIC's three fds) and the MEMORY
frame that maps its guest memory (memfds), answer ``hello`` with the bytes it
can see, then sleep in a selector on its link and its SynIC interrupt until
something arrives: an idle partition uses no CPU.  A ``stop`` message, or the
link closing, ends it with exit status 0.

The wire is hv/link.py's (frames of hv/wire.py).  ``HvClient`` makes
hypercalls; frames that arrive while it waits for a reply are kept for the
loop.  SynIC messages and event flags are handed to ``on_synic`` (the VMBus
layer plugs in there); until something does, they are counted and dropped.

``VIRIDIAN_PARTITION_HOOK=module:function`` (inherited from ``viridian up``)
makes every partition call ``function(runtime)`` after boot, before its loop:
the way to put code into a partition without a device model (tests use it).

Trust: the partition trusts its supervisor (the hypervisor); it validates
only what it needs to run (message shapes, fd counts).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from hv.client import HypercallClient
from hv.jsonlog import JsonLog
from hv.link import decode_runtime, runtime_frame
from hv.memwire import MemoryMessage, MemoryOp
from hv.partition_memory import GrantTable, GuestMemoryView
from hv.proc import die_with_parent
from hv.synic import SynicGuest, SynicMessage
from hv.wire import Frame, FrameKind, WireError, send_frame

__all__ = ["BOOT_TIMEOUT_S", "HvClient", "PartitionRuntime", "main"]

BOOT_TIMEOUT_S = 15.0
HYPERCALL_TIMEOUT_S = 5.0
REPORT_EVERY_S = 0.25  # channel status reports, while something changes
TRACE_FLUSH_S = 0.05
TRACE_MAX_EVENTS = 150  # per flush (one link frame); the rest are counted as dropped


class HvClient(HypercallClient):
    """Hypercalls from this partition over its link: ``post_message``,
    ``signal_event``, ``share_pages``, ``revoke_grant`` (hv.client), each
    returning the HvStatus the supervisor answered."""


class PartitionRuntime:
    """One partition process: its link, memory, SynIC, hypercall client and loop.

    Attributes:
        memory: the guest memory it was granted (``GuestMemoryView``).
        grants: the root's table of pages children shared with it (root only).
        synic: its SynIC (after boot).
        on_synic: called with (messages, event flags) when the SynIC fires.
        connections: the connection IDs it may use (from the boot message).
    """

    def __init__(self, sock: socket.socket, log: JsonLog, name: str, role: str) -> None:
        self.sock = sock
        self.log = log
        self.name = name
        self.role = role
        self.memory = GuestMemoryView()
        self.grants = GrantTable() if role == "root" else None
        self.synic: SynicGuest | None = None
        self.hv = HvClient(sock, timeout=HYPERCALL_TIMEOUT_S)
        self.boot_info: dict[str, Any] = {}
        self.connections: dict[str, Any] = {}
        self.messages = 0
        self.events = 0
        self.on_synic: Callable[[list[SynicMessage], list[int]], None] | None = None
        self._stop = False
        self.handlers: dict[str, Callable[[dict[str, Any], Frame], None]] = {
            "boot": self._on_boot,
            "stop": self._on_stop,
            "trace": self._on_trace,
            "doorbells": self._on_doorbells,
            "root": self._on_root,
            "partition": self._on_partition,
            "rescind": self._on_rescind,
            "workload": self._on_workload,
            "dm": self._on_dm,
            "dm.settings": self._on_dm,
            "intercept": self._on_intercept_link,
            "intercept.stop": self._on_intercept_link,
        }
        self.cluster = ""
        self.vmbus: Any = None  # VmbusHost (root) or VmbusGuest (child), after boot
        self.storage: Any = None  # StorageHost (root) or StorageGuest (child), after boot
        self.sel = selectors.DefaultSelector()
        self._watched: dict[int, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._tseq = itertools.count()
        self._again: list[Callable[[], None]] = []
        self._report_due = False
        self._last_report: Any = None
        self._last_errors: Any = None  # the root's last vmbus.errors report
        self.tracing = False
        self._trace_buf: list[dict[str, Any]] = []
        self._trace_dropped = 0
        self._trace_due = False
        self._early_intercept: list[Frame] = []

    # -- boot ------------------------------------------------------------------------------

    def boot(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Wait for ``boot`` and the memory map, then say ``hello``.

        Raises:
            TimeoutError, ConnectionError, WireError: no usable boot.
        """
        deadline = time.monotonic() + timeout
        while self.synic is None or not self.memory.ranges:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no boot message from the supervisor")
            for fr in self.hv.poll(left):
                self._dispatch(fr)
        self.send({"op": "hello", "guest_visible_bytes": self.memory.visible_bytes})
        self.log("booted", role=self.role, guest_visible_bytes=self.memory.visible_bytes,
                 ranges=len(self.memory.ranges))

    def _on_boot(self, obj: dict[str, Any], fr: Frame) -> None:
        if self.synic is not None or len(fr.fds) != 3:
            raise WireError("a second boot, or a boot without the three SynIC fds")
        self.synic = SynicGuest(*fr.fds)
        fr.fds = []  # adopted
        self.boot_info = obj
        conns = obj.get("connections")
        self.connections = conns if isinstance(conns, dict) else {}
        self.cluster = str(obj.get("cluster", ""))

    def start_vmbus(self) -> None:
        """Make this partition's VMBus end (after boot, before the loop)."""
        if self.vmbus is not None:
            return
        if self.role == "root":
            from .root.storage import StorageHost
            from .vmbus_host import VmbusHost

            kids = self.boot_info.get("children")
            self.vmbus = VmbusHost(self, kids if isinstance(kids, list) else [])
            self.storage = StorageHost(self, kids if isinstance(kids, list) else [])
        else:
            from .child.storage import StorageGuest
            from .vmbus_guest import VmbusGuest

            devs = list(self.boot_info.get("devices") or [])
            disks = self.boot_info.get("disks")
            if any(isinstance(d, dict) and d.get("bus") == "scsi" for d in disks or []):
                devs.append("storvsc")  # the root offers a SCSI controller for it
            self.vmbus = VmbusGuest(self, devs)
            self.storage = StorageGuest(self, disks if isinstance(disks, list) else [])
            early, self._early_intercept = self._early_intercept, []
            for fr in early:
                try:
                    self._on_intercept_link(decode_runtime(fr) or {}, fr)
                finally:
                    fr.close_fds()
            if self.boot_info.get("root_up"):
                self.vmbus.connect()

    def _on_stop(self, obj: dict[str, Any], fr: Frame) -> None:
        self.log("stop requested")
        self._stop = True

    def _on_trace(self, obj: dict[str, Any], fr: Frame) -> None:
        self.tracing = bool(obj.get("on"))
        self._trace_buf.clear()
        self._trace_dropped = 0
        if self.vmbus is not None:
            self.vmbus.set_tracing(self.tracing)
        self.log("tracing " + ("on" if self.tracing else "off"))

    def _on_doorbells(self, obj: dict[str, Any], fr: Frame) -> None:
        if self.role == "child" and self.vmbus is not None and self.vmbus.on_doorbells(obj,
                                                                                       fr.fds):
            fr.fds = []  # adopted

    def _on_root(self, obj: dict[str, Any], fr: Frame) -> None:
        if self.role == "child" and self.vmbus is not None:
            self.vmbus.on_root(obj)
        if self.role == "child" and self.storage is not None and obj.get("state") == "up":
            self.storage.share_dma()  # a new root: its worker needs our DMA pages again

    def _on_partition(self, obj: dict[str, Any], fr: Frame) -> None:
        if self.role == "root" and self.vmbus is not None:
            self.vmbus.on_partition(obj)

    def _on_rescind(self, obj: dict[str, Any], fr: Frame) -> None:
        child, relid = obj.get("child"), obj.get("relid")
        if self.role == "root" and self.vmbus is not None and isinstance(child, int) \
                and isinstance(relid, int):
            self.vmbus.rescind(child, relid)

    def _on_dm(self, obj: dict[str, Any], fr: Frame) -> None:
        if self.role == "root" and self.vmbus is not None:
            try:
                if obj.get("op") == "dm":
                    self.vmbus.memory.on_request(obj)
                else:
                    self.vmbus.memory.on_settings(obj)
            except (ConnectionError, TimeoutError):
                raise  # the supervisor link failed: main's business
            except Exception as e:  # a bug a child's state hit: never the root's exit
                self.log("dynamic memory request failed", level="error",
                         op=obj.get("op"), error=f"{type(e).__name__}: {e}"[:300])

    def _on_intercept_link(self, obj: dict[str, Any], fr: Frame) -> None:
        """The emulated disk's intercept link: the child's end (it traps
        through it), or, in the root, the worker's end (the root starts the
        device worker with it)."""
        if self.role == "child":
            if self.storage is None:  # before the loop: keep it for start_vmbus
                self._early_intercept.append(Frame(fr.kind, fr.seq, fr.body, fr.fds))
                fr.fds = []
            elif self.storage.on_intercept(fr.fds):
                fr.fds = []  # adopted
        elif self.storage is not None:
            if obj.get("op") == "intercept":
                self.storage.start_worker(obj, fr.fds)  # passed on; ours close below
            elif isinstance(obj.get("child"), int):
                self.storage.stop_worker(obj["child"])

    def _on_workload(self, obj: dict[str, Any], fr: Frame) -> None:
        if self.role == "child" and obj.get("device") == "disk" and self.storage is not None:
            args = obj.get("args")
            self.storage.workload(str(obj.get("action")), args if isinstance(args, dict) else {})
        elif self.role == "child" and self.vmbus is not None:
            self.vmbus.workload(obj)

    # -- the loop's services: fds, timers, reports, traces --------------------------------

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is readable (a channel's doorbell)."""
        self._watched[fd] = callback
        self.sel.register(fd, selectors.EVENT_READ, ("fd", fd))

    def unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._tseq), fn))

    def again(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` before the loop sleeps again (more work is waiting)."""
        self._again.append(fn)

    def report_soon(self) -> None:
        """Something changed: send a channel report within REPORT_EVERY_S."""
        if not self._report_due:
            self._report_due = True
            self.call_later(REPORT_EVERY_S, self._send_report)

    def _send_report(self) -> None:
        self._report_due = False
        if self.vmbus is None:
            return
        chans = self.vmbus.report()
        if chans != self._last_report:
            self._last_report = chans
            self.send({"op": "report", "channels": chans})
        if self.role == "root":
            errors = self.vmbus.error_counts()
            if errors != self._last_errors:
                self._last_errors = errors
                self.send({"op": "vmbus.errors", "errors": errors})
            if self.storage is not None:
                self.storage.send_report()

    def trace(self, ev: dict[str, Any]) -> None:
        """One trace event (decoded message, packet header) for ``viridian trace``."""
        if not self.tracing:
            return
        if len(self._trace_buf) >= TRACE_MAX_EVENTS:
            self._trace_dropped += 1
            return
        ev["t"] = round(time.time(), 6)
        self._trace_buf.append(ev)
        if not self._trace_due:
            self._trace_due = True
            self.call_later(TRACE_FLUSH_S, self._flush_trace)

    def _flush_trace(self) -> None:
        self._trace_due = False
        if self._trace_buf or self._trace_dropped:
            self.send({"op": "trace", "events": self._trace_buf,
                       "dropped": self._trace_dropped})
            self._trace_buf = []
            self._trace_dropped = 0

    def pump_link(self) -> None:
        """Take in memory frames (grants, hot-added ranges) and doorbells
        already waiting on the link (they were sent before the message being
        handled); other frames keep their turn."""
        try:
            self.hv.read_available()  # what is there, into hv.unsolicited (in order)
        except ConnectionError:
            return
        keep = []
        for fr in list(self.hv.unsolicited):
            take = False
            if fr.kind == FrameKind.MEMORY:
                take = True  # grants, new ranges, balloon state: in their order
            elif (obj := decode_runtime(fr)) is not None:
                take = obj.get("op") == "doorbells"
            if take:
                self._dispatch(fr)
            else:
                keep.append(fr)
        self.hv.unsolicited.clear()
        self.hv.unsolicited.extend(keep)

    # -- messages from the supervisor --------------------------------------------------------

    def send(self, obj: dict[str, Any]) -> None:
        send_frame(self.sock, runtime_frame(obj))

    def _dispatch(self, fr: Frame) -> None:
        try:
            if fr.kind == FrameKind.MEMORY:
                before = self.memory.visible_bytes
                op = int.from_bytes(fr.body[:4], "little")
                if self.grants is not None and op in (MemoryOp.GRANT, MemoryOp.REVOKE):
                    msg = MemoryMessage.from_frame(fr)  # a child's shared pages
                    try:
                        if op == MemoryOp.REVOKE and self.vmbus is not None:
                            self.vmbus.on_revoke(msg.grant_id)
                        if self.storage is not None:
                            self.storage.on_memory(msg)  # the IDE worker's DMA reach
                        self.grants.apply(msg)
                    finally:
                        msg.close_fds()
                    self.log("grant" if op == MemoryOp.GRANT else "revoke",
                             grant_id=msg.grant_id, owner=msg.owner,
                             pages=sum(seg.npages for seg in msg.segments))
                    if op == MemoryOp.GRANT and self.vmbus is not None:
                        self.vmbus.on_grant()
                else:
                    msg = self.memory.apply_frame(fr)
                    # (a child's bus, VmbusGuest, owns the page allocator)
                    if op == MemoryOp.BALLOON and self.vmbus is not None \
                            and self.role != "root":
                        lost = sum(self.vmbus.alloc.withdraw(seg.gpa_pfn, seg.npages)
                                   for seg in msg.segments)
                        if lost:
                            self.log("the host took pages in use", level="error", pages=lost)
                if self.synic is not None and self.memory.visible_bytes != before:
                    self.send({"op": "memory", "guest_visible_bytes": self.memory.visible_bytes})
                return
            obj = decode_runtime(fr)
            handler = self.handlers.get(str(obj.get("op"))) if obj is not None else None
            if obj is None or handler is None:
                self.log("unexpected frame", level="warning", kind=fr.kind)
                return
            handler(obj, fr)
        finally:
            fr.close_fds()

    def _on_interrupt(self) -> None:
        assert self.synic is not None
        self.synic.interrupt.clear()
        # Frames the supervisor sent before these messages (grants, doorbells)
        # come first.
        self._drain_link()
        msgs = self.synic.read_messages()
        flags = self.synic.take_events()
        self.messages += len(msgs)
        self.events += len(flags)
        if self.vmbus is not None:
            for m in msgs:
                self.vmbus.on_message(m.origination_id, m.message_type, m.payload)
        if self.on_synic is not None and (msgs or flags):
            self.on_synic(msgs, flags)

    def _drain_link(self) -> None:
        try:
            frames = self.hv.poll(0.0)
        except ConnectionError:
            return
        for fr in frames:
            self._dispatch(fr)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until ``stop`` or the link closes; returns the exit status."""
        assert self.synic is not None
        sel = self.sel
        sel.register(self.sock, selectors.EVENT_READ, "link")
        sel.register(self.synic.fileno(), selectors.EVENT_READ, "synic")
        self.start_vmbus()
        timers = self._timers
        while not self._stop:
            # Frames that arrived while a hypercall waited for its reply come first.
            while self.hv.unsolicited and not self._stop:
                self._dispatch(self.hv.unsolicited.popleft())
            if self._stop:
                break
            if self._again:
                work, self._again = self._again, []
                for fn in work:
                    fn()
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                heapq.heappop(timers)[2]()
            if self._again or self.hv.unsolicited:
                timeout: float | None = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            else:
                timeout = None  # idle costs nothing
            for key, _ in sel.select(timeout):
                if key.data == "synic":
                    self._on_interrupt()
                elif key.data == "link":
                    try:
                        frames = self.hv.poll(1e-3)  # poll(0) would not read
                    except ConnectionError:
                        self.log("supervisor closed the link")
                        return 0
                    for fr in frames:
                        self._dispatch(fr)
                else:
                    cb = self._watched.get(key.data[1])
                    if cb is not None:
                        cb()
        return 0

    def close(self) -> None:
        if self.vmbus is not None:
            try:
                self.vmbus.close() if self.role == "root" else self.vmbus.close_all()
            except Exception as e:  # closing must go on
                self.log("vmbus close failed", level="error", error=repr(e))
        if self.storage is not None:
            try:
                self.storage.close()
            except Exception as e:
                self.log("storage close failed", level="error", error=repr(e))
        self.sel.close()
        self.hv.close()
        if self.synic is not None:
            self.synic.close()
        if self.grants is not None:
            self.grants.close()
        self.memory.close()
        self.sock.close()
        self.log.close()


def parse_args(argv: list[str] | None, role: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m partitions.{role}",
                                 description=f"A Viridian {role} partition (started by the "
                                 "supervisor with its link as --fd).")
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--partition", required=True, help="this partition's name")
    ap.add_argument("--id", type=int, default=0)
    ap.add_argument("--fd", type=int, default=3, help="the partition link (SOCK_SEQPACKET)")
    ap.add_argument("--log", default=None, help="the JSON-lines log file")
    return ap.parse_args(argv)


def main(role: str, argv: list[str] | None = None) -> int:
    """Entry point of ``python -m partitions.root`` / ``partitions.child``."""
    args = parse_args(argv, role)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from setproctitle import setproctitle

        setproctitle(f"viridian[{args.cluster}]: {args.partition}")
    except ImportError:  # pragma: no cover - a dependency
        pass
    log = JsonLog(args.log, partition=args.partition, pid=os.getpid())
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=args.fd)
    except OSError as e:
        log("no partition link", level="error", error=str(e))
        return 2
    rt = PartitionRuntime(sock, log, args.partition, role)
    try:
        rt.boot()
        hook = os.environ.get("VIRIDIAN_PARTITION_HOOK")
        if hook:
            import importlib

            module, _, func = hook.partition(":")
            getattr(importlib.import_module(module), func)(rt)
        return rt.run()
    except (OSError, ValueError, TimeoutError, WireError) as e:
        log("failed", level="error", error=f"{type(e).__name__}: {e}")
        print(f"partition {args.partition}: {e}", file=sys.stderr)
        return 1
    finally:
        log("exit")
        rt.close()
