"""``viridian demo``'s loop: the workloads it starts on a running cluster
and the live view it keeps.

Layer: partitions.cli (presentation, above hv.control).  ``Demo`` polls
``status`` about four times a second (waiting on the cluster's event stream
in between, so a stop or a crash is seen at once), starts the echo
``stream`` workload on every child whose echo channel is open, and keeps
what the summary needs; it also starts the Dynamic Memory ``bursts``
workload on every child with a DM channel and shows each partition's memory
over time (assigned, visible, demand, a sparkline of the last minute), so
hot-adds and balloons can be watched as they happen.  Every child with a
disk gets a short ``disk`` ``bench`` (random 4 KiB reads) about once a
second, one at a time per child, sized from the child's own timing (its
log's ``disk bench`` records) to take about 80 ms of its loop; the disks
panel shows each child's disk side by side (synthetic SCSI over VMBus,
emulated IDE behind traps) with rates from the root's counters.  The tables
themselves are partitions.cli.views.

Trust: as partitions.cli.views: every value a partition reported is
type-checked and cleaned before use; a child's log is read with capped
lines and only JSON objects are taken.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hv.control import ControlClient, ControlError

from .format import clean, fmt_count, fmt_iec, fmt_size, plural, to_int
from .views import (
    BENCH_PATH,
    DISK_BLOCK,
    DISK_BUDGET_S,
    DISK_OPS_MIN,
    DISKS_LEGEND,
    MEMORY_LEGEND,
    ChannelRates,
    DiskKey,
    DiskRates,
    DiskRecord,
    MemoryHistory,
    ProcKey,
    channel_key,
    channels_of,
    demo_channels_table,
    demo_disks_table,
    device_of,
    disk_bus,
    disk_comparison,
    disk_counters,
    disk_entries,
    disk_progress,
    disk_summary_line,
    memory_of,
    memory_table,
    own_channel,
    partitions_table,
    proc_key,
)

__all__ = [
    "BURSTS_ARGS",
    "DISK_ANSWER_TIMEOUT_S",
    "DISK_EVERY_S",
    "DISK_OPS_START",
    "IDE_GRACE_S",
    "OPEN_TIMEOUT_S",
    "SETTLE_TIMEOUT_S",
    "TICK_S",
    "Demo",
    "DemoOptions",
    "DiskWork",
    "LogTail",
    "StreamRecord",
]

TICK_S = 0.25  # the live view's refresh period (4 per second)
OPEN_TIMEOUT_S = 10.0  # how long the demo waits for the children's echo channels
SETTLE_TIMEOUT_S = 2.0  # after "stop": in-flight echoes come back, reports catch up
# The demo's Dynamic Memory workload: allocate in 96 MiB steps to 480 MiB, hold, free, rest.
BURSTS_ARGS = {"peak_mb": 480, "step_mb": 96, "period_s": 0.25}
DISK_EVERY_S = 1.0  # ... in one short bench per child about every second,
DISK_OPS_START = {"scsi": 256, "ide": 32}  # child's loop (its echoes, its DM) waits meanwhile
DISK_ANSWER_TIMEOUT_S = 3.0  # a bench whose result the child never logged counts as lost
IDE_GRACE_S = 1.0  # an ide disk is benched this long after the child's channels opened


@dataclass
class DiskWork:
    """The demo's disk benches on one child process: at most one at a time."""

    partition: str
    pid: int
    tail: LogTail | None  # the child's log, for its results (None: fire and forget)
    pending: DiskKey | None = None  # the bench sent and not yet answered in the log
    sent: float = -1e9  # when the last one was sent
    turn: int = 0  # round robin over the child's disks
    open_since: float | None = None  # since when all its channels are open


class LogTail:
    """New records of one partition's JSON-lines log (RUN/logs/NAME.jsonl)
    whose ``event`` is one of ``events``, from where the file ended when the
    tail was made.  The file is the partition's own writing: lines are capped
    and anything that is not a JSON object is skipped."""

    MAX_READ = 1 << 20
    MAX_LINE = 1 << 14

    def __init__(self, path: Any, events: Iterable[str]) -> None:
        import os

        self.path = path
        self.events = frozenset(events)
        self._needles = [f'"{e}"'.encode() for e in self.events]
        try:
            self.offset = os.stat(path).st_size
        except OSError:
            self.offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        import json

        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.MAX_READ)
        except OSError:
            return []
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.MAX_LINE:
            self._partial = b""  # (the rest of that line is skipped as not JSON)
        out = []
        for line in lines:
            if len(line) > self.MAX_LINE or not any(n in line for n in self._needles):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("event"), str) \
                    and obj["event"] in self.events:
                out.append(obj)
        return out


# -- the demo -----------------------------------------------------------------------------------


@dataclass
class DemoOptions:
    seconds: float  # 0: until Ctrl+C
    size_bytes: int
    window: int


@dataclass
class StreamRecord:
    """One child's echo stream or memory bursts (a restarted child starts a new one)."""

    partition: str
    pid: int
    started: float
    stopped: float | None = None
    last: dict[str, Any] = field(default_factory=dict)  # its channel entry, last seen
    startup: int = 0  # (bursts) the partition's startup memory
    seen: float = 0.0  # when it was last seen (the end of a stream whose process is gone)


def _wants_echo(p: dict[str, Any]) -> bool:
    devs = p.get("devices")
    return isinstance(devs, list) and any(
        d == "echo" or (isinstance(d, dict) and d.get("type") == "echo") for d in devs)


class Demo:
    """Streams echo requests on every child and shows it until the time is up.

    Args:
        control_path: the cluster's control socket.
        events: a connection that already follows the cluster's events
            (``watch``); the loop waits on it between refreshes.
        opts: duration, payload size, window.
        hits: the CLI's Ctrl+C / SIGTERM counter (a list its signal handler
            appends to): the loop ends when it grows.
        console: rich console; a live view when it is a terminal, else one
            plain progress line per second.
        logs_dir: the cluster's log folder (RUN/logs): the children's ``disk
            bench`` results, to size the next bench and show the child's own
            timing; None: benches of the starting size, no timing.
    """

    def __init__(self, control_path: Any, events: ControlClient, opts: DemoOptions,
                 hits: list[int], console: Any, logs_dir: Any = None) -> None:
        self.control_path = control_path
        self.events = events
        self.opts = opts
        self.hits = hits
        self.console = console
        self.rates = ChannelRates()
        self.streams: dict[ProcKey, StreamRecord] = {}
        self.bursts: dict[ProcKey, StreamRecord] = {}  # the DM workload per child
        self.logs_dir = logs_dir
        self.disk_rates = DiskRates()
        self.disks: dict[DiskKey, DiskRecord] = {}  # every child disk seen, per process
        self.disk_work: dict[ProcKey, DiskWork] = {}  # the benches, per child process
        self.notes: deque[str] = deque(maxlen=4)
        self.status: dict[str, Any] = {}
        self.t0 = time.monotonic()
        self.memory = MemoryHistory(self.t0)
        self.stream_t0: float | None = None
        self.outcome = "done"  # or "interrupted", "stopped" (the cluster went away)
        self._ctl: ControlClient | None = None

    # -- helpers ---------------------------------------------------------------------
    def _note(self, text: str) -> None:
        stamp = f"{time.monotonic() - self.t0:6.1f} s"
        if self.console.is_terminal:
            self.notes.append(f"{stamp}  {text}")
        else:
            self.console.print(f"[{stamp}] {text}", markup=False, soft_wrap=True)

    def _wait_events(self, until: float) -> bool:
        """Follow the event stream until ``until``; False once the cluster is going away."""
        while not self.hits:
            left = until - time.monotonic()
            if left <= 0:
                return True
            try:
                ev = next(self.events.events(left), None)
            except TimeoutError:
                return True
            except (ControlError, OSError):
                return False
            if ev is None or ev.get("event") == "stopped":
                return False
            if ev.get("event") == "state":
                st, name = clean(ev.get("state")), clean(ev.get("name"))
                if st in ("crashed", "restarting", "stopped") or (
                        st == "running" and to_int(ev.get("restarts"))):
                    from .launcher import exit_text

                    extra = f" ({exit_text(ev)})" if st == "crashed" else ""
                    self._note(f"{name} {st}{extra}")
        return True

    def _poll(self) -> bool:
        assert self._ctl is not None
        try:
            st = self._ctl.request("status")["status"]
        except (ControlError, OSError, TimeoutError):
            return False
        if not isinstance(st, dict):
            return False
        now = time.monotonic()
        self.status = st
        self.rates.update(st, now)
        self.memory.update(st, now)
        self.disk_rates.update(st, now)
        for p in st.get("partitions", []):
            key = proc_key(p)
            for recs, cls in ((self.streams, "echo"), (self.bursts, "dynmem")):
                c = own_channel(p, cls)
                rec = recs.get(key)
                if rec is not None and c is not None:
                    rec.last, rec.seen = c, now
            if p.get("role") != "child" or not key[1]:
                continue
            for i, d in enumerate(disk_entries(p)):
                counters = disk_counters(d)
                drec = self.disks.get((*key, i))
                if drec is None:
                    bus = disk_bus(d)
                    self.disks[(*key, i)] = DiskRecord(
                        key[0], key[1], i, bus, clean(d.get("path", "?"), 4096),
                        to_int(d.get("size_bytes")), first=counters,
                        next_ops=DISK_OPS_START.get(bus, DISK_OPS_MIN))
                else:
                    drec.observe(counters)
        return True

    def _running_children(self) -> Iterator[tuple[dict[str, Any], ProcKey]]:
        """The running children of the last status, each with its key."""
        for p in self.status.get("partitions", []):
            if p.get("role") == "child" and p.get("state") == "running":
                yield p, proc_key(p)

    # -- the disk benches ------------------------------------------------------------------
    def _disk_ready(self, p: dict[str, Any], d: dict[str, Any], work: DiskWork,
                    now: float) -> bool:
        """Its channels are open and the disk answers: the storvsc channel
        ready (scsi); the root's device worker attached (ide).  Before the
        worker is attached the supervisor answers the child's port accesses
        with all ones, and a bench would poll a busy status for seconds; the
        status says nothing of the worker (an ``attached`` flag, should the
        disk entry gain one, is followed), so the demo waits ``IDE_GRACE_S``
        after the channels open (the root starts the worker as the child
        boots: it is ready well before)."""
        if work.open_since is None:
            return False
        if disk_bus(d) == "scsi":
            return any(c.get("class") == "storvsc" and device_of(c).get("ready") is True
                       for c in channels_of(p))
        if disk_bus(d) != "ide":
            return False
        if isinstance(d.get("attached"), bool):
            return d["attached"] is True
        return now - work.open_since >= IDE_GRACE_S

    def _take_bench_results(self, work: DiskWork) -> None:
        if work.tail is None or work.pending is None:
            return
        for r in work.tail.read():
            if r.get("pid") != work.pid or work.pending is None:
                continue
            rec = self.disks.get(work.pending)
            if r.get("event") == "disk bench" and r.get("tag") == "demo":
                if rec is not None and r.get("path") == BENCH_PATH.get(rec.bus):
                    rec.add_bench(r)
                work.pending = None
            elif r.get("event") == "disk workload failed" and r.get("action") == "bench":
                if rec is not None:
                    rec.failures += 1
                    if rec.failures == 1:
                        self._note(f"{rec.partition}: the {BENCH_PATH.get(rec.bus)} bench "
                                   f"failed: {clean(r.get('error'), 120)}")
                work.pending = None

    def _run_disks(self) -> None:
        """One short ``disk`` ``bench`` (random 4 KiB reads) per child about
        every second, once its disks answer; at most one in flight per child."""
        assert self._ctl is not None
        now = time.monotonic()
        for p, key in self._running_children():
            disks = disk_entries(p)
            if not key[1] or not disks:
                continue
            work = self.disk_work.get(key)
            if work is None:
                tail = (LogTail(self.logs_dir / f"{key[0]}.jsonl",
                                ("disk bench", "disk workload failed"))
                        if self.logs_dir is not None else None)
                work = self.disk_work[key] = DiskWork(key[0], key[1], tail)
            self._take_bench_results(work)
            chans = channels_of(p)
            if not chans or any(c.get("state") != "open" for c in chans):
                work.open_since = None  # (the root may be restarting: its worker too)
            elif work.open_since is None:
                work.open_since = now
            if work.pending is not None and now - work.sent > DISK_ANSWER_TIMEOUT_S:
                work.pending = None  # never answered: sent again below
            if work.pending is not None or now - work.sent < DISK_EVERY_S:
                continue
            # the first disk of each bus: the child's block API benches one per bus
            ready = [i for i, d in enumerate(disks)
                     if disk_bus(d) in BENCH_PATH and self._disk_ready(p, d, work, now)
                     and not any(disk_bus(e) == disk_bus(d) for e in disks[:i])]
            if not ready:
                continue
            dkey = (*key, ready[work.turn % len(ready)])
            rec = self.disks.get(dkey)
            if rec is None:
                continue
            work.turn += 1
            args = {"path": BENCH_PATH[rec.bus], "block": DISK_BLOCK, "ops": rec.next_ops,
                    "qd": 1, "write": False, "tag": "demo"}
            try:
                self._ctl.request("workload", name=key[0], device="disk", action="bench",
                                  args=args)
            except (ControlError, TimeoutError) as e:
                self._note(f"{key[0]}: the disk bench did not start: {e}")
                work.sent = now
                continue
            work.sent = now
            work.pending = dkey if work.tail is not None else None

    def _start_bursts(self) -> None:
        """The DM ``bursts`` workload on every running child whose DM channel is ready."""
        assert self._ctl is not None
        for p, key in self._running_children():
            c = own_channel(p, "dynmem")
            if (c is None or c.get("state") != "open" or device_of(c).get("state") != "ready"
                    or key in self.bursts):
                continue
            now = time.monotonic()
            self.bursts[key] = StreamRecord(key[0], key[1], now, last=c, seen=now,
                                            startup=to_int(memory_of(p).get("startup_bytes")))
            try:
                self._ctl.request("workload", name=key[0], device="dynmem", action="bursts",
                                  args=BURSTS_ARGS)
            except (ControlError, TimeoutError) as e:
                del self.bursts[key]
                self._note(f"{key[0]}: the memory bursts did not start: {e}")

    def _start_streams(self) -> None:
        assert self._ctl is not None
        for p, key in self._running_children():
            c = own_channel(p, "echo")
            if c is None or c.get("state") != "open" or key in self.streams:
                continue
            args = {"size": self.opts.size_bytes, "window": self.opts.window, "seconds": 0}
            try:
                self._ctl.request("workload", name=key[0], device="echo", action="stream",
                                  args=args)
            except (ControlError, TimeoutError) as e:
                self._note(f"{key[0]}: the stream did not start: {e}")
                continue
            now = time.monotonic()
            self.streams[key] = StreamRecord(key[0], key[1], now, last=c, seen=now)
            if self.stream_t0 is None:
                self.stream_t0 = now
        if self.stream_t0 is None:
            waiting = [p for p in self.status.get("partitions", [])
                       if p.get("role") == "child" and _wants_echo(p)]
            if not waiting or time.monotonic() - self.t0 > OPEN_TIMEOUT_S:
                self.stream_t0 = time.monotonic()
                if waiting:
                    self._note("no echo channel opened within "
                               f"{OPEN_TIMEOUT_S:.0f} s; showing the cluster as it is")

    def _elapsed(self) -> float:
        return 0.0 if self.stream_t0 is None else time.monotonic() - self.stream_t0

    # -- views -------------------------------------------------------------------------
    def header(self) -> str:
        secs = self.opts.seconds
        if self.stream_t0 is None:
            when = "waiting for the echo channels"
        else:
            when = f"{self._elapsed():.0f} s" + (f" of {secs:g} s" if secs else "")
        return (f"[bold]viridian demo[/] · {when} · {fmt_size(self.opts.size_bytes)} echoes, "
                f"window {self.opts.window} · [bold]Ctrl+C[/] ends it")

    def render(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = [self.header(), "", partitions_table(self.status), "",
                            memory_table(self.status, self.memory, time.monotonic()),
                            Text(("Each child allocates in bursts (to "
                                  f"{BURSTS_ARGS['peak_mb']} MiB): the balancer hot-adds, "
                                  "balloons\n" if self.bursts else "") + MEMORY_LEGEND,
                                 style="dim"), "",
                            demo_channels_table(self.status, self.rates),
                            Text("pkt/s, MB/s, Pkts: in + out · Fill %: out/in ring · "
                                 "Signals: sent/suppressed\nEchoes: checked by the "
                                 "child, echoed by the root · Bad: mismatched echoes",
                                 style="dim")]
        if any(disk_entries(p) for p in self.status.get("partitions", [])
               if isinstance(p, dict)):
            cmp = disk_comparison(self.disks.values())
            parts += ["", demo_disks_table(self.status, self.disk_rates, self.disks),
                      Text(f"Each child reads random {fmt_size(DISK_BLOCK)} blocks for "
                           f"~{DISK_BUDGET_S * 1000:.0f} ms each {DISK_EVERY_S:g} s (its loop "
                           "waits)", style="dim")]
            if cmp:
                parts.append(Text(cmp, style="bold"))
            parts.append(Text(DISKS_LEGEND, style="dim"))
        parts += [Text(n) for n in self.notes]
        return Group(*parts)

    def progress_line(self) -> str:
        items = []
        for p in self.status.get("partitions", []):
            c = own_channel(p, "echo")
            if c is None:
                continue
            r = self.rates.rate(channel_key(p, c))
            d = device_of(c)
            rate = f"{fmt_count(r[0])} pkt/s {r[1] / 1e6:.1f} MB/s" if r else "- pkt/s"
            items.append(f"{clean(p.get('name'), 16)} relid {to_int(c.get('relid'))} "
                         f"{clean(c.get('state'), 12)}: {rate} "
                         f"echoes {to_int(d.get('echoes'))} "
                         f"mismatches {to_int(d.get('mismatches'))}")
        mem = [f"{clean(p.get('name'), 16)} {fmt_iec(to_int(memory_of(p).get('assigned_bytes')))}"
               for p in self.status.get("partitions", [])
               if p.get("role") == "child" and to_int(p.get("pid"))]
        disks = disk_progress(self.status, self.disk_rates)
        if disks:
            items.append(disks)
        if mem:
            items.append("assigned: " + ", ".join(mem))
        return f"[{self._elapsed():6.1f} s] " + (" | ".join(items) or "no echo channels")

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> str:
        """Stream and show until the time is up, Ctrl+C, or the cluster goes away.

        Returns:
            "done", "interrupted" or "stopped" (also in ``outcome``).
        """
        import contextlib

        try:
            self._ctl = ControlClient(self.control_path, timeout=5.0)
        except ControlError:
            self.outcome = "stopped"
            return self.outcome
        live: Any = None
        if self.console.is_terminal:
            from rich.live import Live

            live = Live(console=self.console, auto_refresh=False, transient=False,
                        redirect_stdout=False, redirect_stderr=False)
        with live if live is not None else contextlib.nullcontext():
            tick = time.monotonic()
            next_line = tick + 1.0
            while True:
                if self.hits:
                    self.outcome = "interrupted"
                    break
                if not self._wait_events(tick) or not self._poll():
                    self.outcome = "interrupted" if self.hits else "stopped"
                    break
                self._start_streams()
                self._start_bursts()
                self._run_disks()
                now = time.monotonic()
                tick = max(tick + TICK_S, now + 0.05)
                if live is not None:
                    live.update(self.render(), refresh=True)
                elif now >= next_line and self.stream_t0 is not None:
                    next_line = max(next_line + 1.0, now + 0.5)
                    self.console.print(self.progress_line(), markup=False, highlight=False,
                                       soft_wrap=True)
                if self.opts.seconds and self._elapsed() >= self.opts.seconds:
                    break
        return self.outcome

    def finish(self) -> None:
        """Stop the streams and wait (briefly) for the last echoes and reports."""
        if self._ctl is None:
            return
        hits = len(self.hits)
        try:
            if self.outcome != "stopped":
                running = dict(proc_key(p) for p in self.status.get("partitions", [])
                               if p.get("state") == "running")
                for device, recs in (("echo", self.streams), ("dynmem", self.bursts)):
                    for (name, pid), rec in recs.items():
                        if running.get(name) != pid:
                            continue
                        try:
                            self._ctl.request("workload", name=name, device=device,
                                              action="stop")
                        except (ControlError, TimeoutError):
                            continue
                        rec.stopped = time.monotonic()
                deadline = time.monotonic() + SETTLE_TIMEOUT_S
                while time.monotonic() < deadline and len(self.hits) == hits:
                    if not self._wait_events(time.monotonic() + 0.05) or not self._poll():
                        break
                    for work in self.disk_work.values():
                        self._take_bench_results(work)
                    if self._settled():
                        break
        finally:
            self._ctl.close()
            self._ctl = None
        now = time.monotonic()
        for rec in [*self.streams.values(), *self.bursts.values()]:
            if rec.stopped is None:  # its process went away (or the cluster did)
                rec.stopped = rec.seen if self.outcome != "stopped" else now

    def _settled(self) -> bool:
        for p in self.status.get("partitions", []):
            rec = self.streams.get(proc_key(p))
            if rec is None:
                continue
            c = own_channel(p, "echo")
            d = device_of(c) if c else {}
            if d.get("streaming") or to_int(d.get("in_flight")):
                return False
        for p in self.status.get("partitions", []):
            rec = self.bursts.get(proc_key(p))
            if rec is None or rec.stopped is None:
                continue
            c = own_channel(p, "dynmem")
            if c is not None and to_int(device_of(c).get("workload_pages")):
                return False  # its pages are freed (and checked) at stop: not reported yet
        running = {proc_key(p) for p in self.status.get("partitions", [])
                   if p.get("state") == "running"}
        for work in self.disk_work.values():
            if (work.partition, work.pid) in running and work.pending is not None:
                return False  # its last bench runs (the child logs its result at the end)
        for rec in self.disks.values():
            if (rec.partition, rec.pid) in running and rec.ops < rec.ops_benched:
                return False  # the root has not reported all of its ops yet
        return True

    # -- the summary ----------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        """One line per stream: packets, bytes, mean rate, echoes, mismatches."""
        lines = []
        names = [r.partition for r in self.streams.values()]
        for rec in sorted(self.streams.values(), key=lambda r: (r.partition, r.started)):
            c = rec.last
            who = rec.partition + (f" (pid {rec.pid})" if names.count(rec.partition) > 1 else "")
            d = device_of(c)
            pkts = to_int(c.get("packets_in")) + to_int(c.get("packets_out"))
            nbytes = to_int(c.get("bytes_in")) + to_int(c.get("bytes_out"))
            secs = max((rec.stopped or time.monotonic()) - rec.started, 1e-3)
            lines.append(f"  {who} relid {to_int(c.get('relid'))} "
                         f"{clean(c.get('class', 'echo'), 12)}: {pkts:,} packets, "
                         f"{fmt_iec(nbytes)} in {secs:.1f} s = {fmt_count(pkts / secs)} "
                         f"packets/s, {nbytes / secs / 1e6:.1f} MB/s; "
                         f"{to_int(d.get('echoes')):,} echoes, "
                         f"{to_int(d.get('mismatches'))} mismatches")
        return lines

    def memory_summary_lines(self) -> list[str]:
        """One line per child's memory bursts: hot-adds, balloons, corrupt pages
        (its DM channel's counters), and the least and most memory it was assigned."""
        lines = []
        names = [r.partition for r in self.bursts.values()]
        for rec in sorted(self.bursts.values(), key=lambda r: (r.partition, r.started)):
            d = device_of(rec.last)
            who = rec.partition + (f" (pid {rec.pid})" if names.count(rec.partition) > 1 else "")
            lo, hi = self.memory.seen.get((rec.partition, rec.pid), (0, 0))
            lines.append(f"  {who} relid {to_int(rec.last.get('relid'))} dynmem: "
                         f"{plural(to_int(d.get('hot_adds')), 'hot-add')}, "
                         f"{plural(to_int(d.get('balloons')), 'balloon')}, "
                         f"{plural(to_int(d.get('corrupt_pages')), 'corrupt page')}; assigned "
                         f"{fmt_iec(lo)} to {fmt_iec(hi)} (startup {fmt_iec(rec.startup)})")
        return lines

    def disk_summary_lines(self) -> list[str]:
        """One line per child disk the demo saw: ops, bytes, traps (as the root
        counted them since the demo first saw the disk), the benches' timing;
        then the scsi/ide comparison."""
        lines = []
        recs = sorted(self.disks.values(), key=lambda r: (r.partition, r.pid, r.index))
        pids: dict[str, set[int]] = {}
        for r in recs:
            pids.setdefault(r.partition, set()).add(r.pid)
        for rec in recs:
            who = rec.partition + (f" (pid {rec.pid})" if len(pids[rec.partition]) > 1 else "")
            lines.append(disk_summary_line(rec, who))
        cmp = disk_comparison(recs)
        if cmp:
            lines.append(f"  {cmp}, as each child timed them")
        return lines

    def corrupt_pages(self) -> int:
        return sum(to_int(device_of(r.last).get("corrupt_pages")) for r in self.bursts.values())

    def mismatches(self) -> int:
        return sum(to_int(device_of(r.last).get("mismatches")) for r in self.streams.values())
