"""The partition side of the cluster: bootstrap, the hypercall client, the idle loop.

Layer: partitions.  ``python -m partitions.root`` and ``python -m
partitions.child`` both run ``main`` here, each with its *composition root*
(partitions/root/__main__.py, partitions/child/__main__.py): the only code
that knows which features a role has.  This module knows none: features
register the runtime messages they own (``on``), the memory frames they take
(``take_memory``), and what they do at start, on reports, on tracing and at
close.  The supervisor (hv/supervisor/) starts a partition with its link
as fd 3 (hv/link.py)::

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
loop.  SynIC messages go to the message sinks features registered
(``on_message``: the VMBus end), then messages and event flags to
``on_synic`` (a hook's); what nobody takes is counted and dropped.

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
from hv.memwire import MemoryMessage
from hv.partition_memory import GuestMemoryView
from hv.proc import die_with_parent
from hv.synic import SynicGuest, SynicMessage
from hv.wire import Frame, FrameKind, WireError, send_frame

__all__ = ["BOOT_TIMEOUT_S", "REPORT_EVERY_S", "Handler", "HvClient", "PartitionRuntime", "main"]

BOOT_TIMEOUT_S = 15.0
HYPERCALL_TIMEOUT_S = 5.0
REPORT_EVERY_S = 0.25  # channel status reports, while something changes
TRACE_FLUSH_S = 0.05
TRACE_MAX_EVENTS = 150  # per flush (one link frame); the rest are counted as dropped

#: A runtime-message handler: (the decoded message, its frame) -> True when it
#: consumed the message (later handlers of that op are skipped).  A handler
#: that keeps the frame's fds sets ``frame.fds = []`` (adopted).
Handler = Callable[[dict[str, Any], Frame], "bool | None"]


class HvClient(HypercallClient):
    """Hypercalls from this partition over its link: ``post_message``,
    ``signal_event``, ``share_pages``, ``revoke_grant`` (hv.wire), each
    returning the HvStatus the supervisor answered."""


class PartitionRuntime:
    """One partition process: its link, memory, SynIC, hypercall client and loop.

    Attributes:
        memory: the guest memory it was granted (``GuestMemoryView``).
        synic: its SynIC (after boot).
        on_synic: called with (messages, event flags) when the SynIC fires.
        connections: the connection IDs it may use (from the boot message).
        features: what the composition root installed, by name ("vmbus", ...).
    """

    def __init__(self, sock: socket.socket, log: JsonLog, name: str, role: str) -> None:
        self.sock = sock
        self.log = log
        self.name = name
        self.role = role  # for the log and the process; nothing here depends on it
        self.memory = GuestMemoryView()
        self.synic: SynicGuest | None = None
        self.hv = HvClient(sock, timeout=HYPERCALL_TIMEOUT_S)
        self.boot_info: dict[str, Any] = {}
        self.connections: dict[str, Any] = {}
        self.messages = 0
        self.events = 0
        self.on_synic: Callable[[list[SynicMessage], list[int]], None] | None = None
        self._stop = False
        self.handlers: dict[str, list[Handler]] = {}
        for op, h in (("boot", self._on_boot), ("stop", self._on_stop),
                      ("trace", self._on_trace)):
            self.on(op, h)
        self.cluster = ""
        self.features: dict[str, Any] = {}
        self._pumped: set[str] = set()  # runtime ops pump_link takes ahead
        self._memory_takers: dict[int, Callable[[Frame], None]] = {}
        self._memory_listeners: list[Callable[[int, MemoryMessage], None]] = []
        self._message_sinks: list[Callable[[int, int, bytes], None]] = []
        self._starters: list[Callable[[], None]] = []
        self._reporters: list[Callable[[], None]] = []
        self._tracing_listeners: list[Callable[[bool], None]] = []
        self._closers: list[tuple[str, Callable[[], None]]] = []
        self.started = False
        self.sel = selectors.DefaultSelector()
        self._watched: dict[int, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._tseq = itertools.count()
        self._again: list[Callable[[], None]] = []
        self._report_due = False
        self.tracing = False
        self._trace_buf: list[dict[str, Any]] = []
        self._trace_dropped = 0
        self._trace_due = False

    @property
    def vmbus(self) -> Any:
        """This partition's VMBus end (``features["vmbus"]``), or None."""
        return self.features.get("vmbus")

    # -- what features register (the composition root calls these) ---------------------------

    def on(self, op: str, handler: Handler, *, pump: bool = False) -> None:
        """Handle runtime messages ``op`` (after the handlers already there).
        ``pump``: ``pump_link`` takes them ahead of other frames (they were
        sent before what is being handled, e.g. a channel's doorbells)."""
        self.handlers.setdefault(op, []).append(handler)
        if pump:
            self._pumped.add(op)

    def to_feature(self, name: str, call: Callable[[Any, dict[str, Any], Frame], Any]) -> Handler:
        """A handler that passes (``features[name]``, message, frame) to
        ``call`` once that feature is installed; before, the message is
        dropped (what the feature would say to it did not happen yet)."""
        def handler(obj: dict[str, Any], fr: Frame) -> bool | None:
            feature = self.features.get(name)
            return None if feature is None else call(feature, obj, fr)
        return handler

    def take_memory(self, ops: tuple[int, ...], fn: Callable[[Frame], None]) -> None:
        """MEMORY frames of these ``hv.memory.MemoryOp`` go to ``fn`` (which
        owns them) instead of this partition's own memory view."""
        for op in ops:
            self._memory_takers[int(op)] = fn

    def on_memory_change(self, fn: Callable[[int, MemoryMessage], None]) -> None:
        """``fn(op, msg)`` after a MEMORY frame changed this partition's memory."""
        self._memory_listeners.append(fn)

    def on_message(self, fn: Callable[[int, int, bytes], None]) -> None:
        """``fn(origination_id, message_type, payload)`` for each SynIC message."""
        self._message_sinks.append(fn)

    def on_start(self, fn: Callable[[], None]) -> None:
        """``fn()`` once, when the partition starts (its loop, or ``start``)."""
        self._starters.append(fn)

    def on_report(self, fn: Callable[[], None]) -> None:
        """``fn()`` on each status report tick (``report_soon``)."""
        self._reporters.append(fn)

    def on_tracing(self, fn: Callable[[bool], None]) -> None:
        """``fn(on)`` when ``viridian trace`` starts or stops."""
        self._tracing_listeners.append(fn)

    def on_close(self, what: str, fn: Callable[[], None]) -> None:
        """``fn()`` when the partition closes, in the order registered; a
        failure is logged as "``what`` close failed" and closing goes on."""
        self._closers.append((what, fn))

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

    def start(self) -> None:
        """Start the features (after boot, before the loop; the loop calls
        it, and a hook may call it first): each ``on_start`` function, once."""
        if self.started:
            return
        self.started = True
        for fn in self._starters:
            fn()

    def _on_stop(self, obj: dict[str, Any], fr: Frame) -> None:
        self.log("stop requested")
        self._stop = True

    def _on_trace(self, obj: dict[str, Any], fr: Frame) -> None:
        self.tracing = bool(obj.get("on"))
        self._trace_buf.clear()
        self._trace_dropped = 0
        for fn in self._tracing_listeners:
            fn(self.tracing)
        self.log("tracing " + ("on" if self.tracing else "off"))

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
        for fn in self._reporters:
            fn()

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
        """Take in memory frames (grants, hot-added ranges) and the runtime
        messages features registered with ``pump`` (a channel's doorbells)
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
                take = obj.get("op") in self._pumped
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
                taker = self._memory_takers.get(op)
                if taker is not None:
                    taker(fr)  # (the root's grants: a child's shared pages)
                else:
                    msg = self.memory.apply_frame(fr)
                    for listener in self._memory_listeners:
                        listener(op, msg)
                if self.synic is not None and self.memory.visible_bytes != before:
                    self.send({"op": "memory", "guest_visible_bytes": self.memory.visible_bytes})
                return
            obj = decode_runtime(fr)
            op = str(obj.get("op")) if obj is not None else ""
            handlers = self.handlers.get(op) if obj is not None else None
            if obj is None or not handlers:
                self.log("unexpected frame", level="warning", kind=fr.kind)
                return
            for handler in handlers:
                if handler(obj, fr):
                    break
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
        for sink in self._message_sinks:
            for m in msgs:
                sink(m.origination_id, m.message_type, m.payload)
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
        self.start()
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
        for what, fn in self._closers:
            try:
                fn()
            except Exception as e:  # closing must go on
                self.log(f"{what} close failed", level="error", error=repr(e))
        self.sel.close()
        self.hv.close()
        if self.synic is not None:
            self.synic.close()
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


def main(role: str, compose: Callable[[PartitionRuntime], None],
         argv: list[str] | None = None) -> int:
    """Entry point of ``python -m partitions.root`` / ``partitions.child``:
    ``compose(runtime)`` (the role's composition root) installs the role's
    features before boot."""
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
        compose(rt)
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
