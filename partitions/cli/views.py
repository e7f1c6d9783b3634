"""What the CLI shows of a running cluster: the partitions, memory, channel
and disk tables of the live view (``viridian demo``) and of ``viridian
status``, and the lines of ``viridian trace``.

Layer: partitions.cli (presentation, above hv.control).  Everything here
reads the status object (docs/status-schema.md) or trace events and turns
them into rich tables or plain lines; it does no I/O (the demo's loop, which
polls the cluster, is partitions.cli.demo).

Rates are counter deltas over a sliding window of about two seconds:
partitions report their channels at most every 0.25 s, so a shorter window
would jump between zero and twice the rate.

Trust: status entries and trace events carry what partitions reported, and
a partition may be hostile (docs/threat-model.md).  Every value goes through
partitions.cli.format's ``to_int`` / ``to_num`` / ``clean`` before it is
formatted.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .format import (
    clean,
    fmt_count,
    fmt_iec,
    fmt_size,
    fmt_us,
    markup_safe,
    plural,
    short_path,
    to_int,
    to_num,
)

__all__ = [
    "BENCH_PATH",
    "BUS_KIND",
    "CHANNEL_LEGEND",
    "DISKS_LEGEND",
    "DISK_BLOCK",
    "DISK_BUDGET_S",
    "DISK_KEYS",
    "DISK_LEGEND",
    "DISK_OPS_MAX",
    "DISK_OPS_MIN",
    "HISTORY_CELLS",
    "HISTORY_S",
    "MEMORY_LEGEND",
    "RATE_WINDOW_S",
    "SPARK",
    "ChannelKey",
    "ChannelRates",
    "DiskKey",
    "DiskRates",
    "DiskRecord",
    "MemoryHistory",
    "ProcKey",
    "channel_key",
    "channel_name",
    "channel_tables",
    "channels_of",
    "demo_channels_table",
    "demo_disks_table",
    "device_of",
    "disk_bus",
    "disk_comparison",
    "disk_counters",
    "disk_entries",
    "disk_progress",
    "disk_summary_line",
    "disk_tables",
    "echoes_of",
    "memory_of",
    "memory_table",
    "own_channel",
    "partitions_table",
    "proc_key",
    "state_text",
    "trace_line",
]

RATE_WINDOW_S = 2.0
HISTORY_S = 60.0  # the memory sparkline's span ...
HISTORY_CELLS = 30  # ... in this many characters (2 s each)
SPARK = "▁▂▃▄▅▆▇█"


def _fill(c: dict[str, Any]) -> str:
    """Ring fill in percent, outgoing/incoming (fractions in the status)."""
    parts = []
    for key in ("out_ring_fill", "in_ring_fill"):
        v = to_num(c.get(key))
        parts.append("-" if v is None else f"{min(max(v, 0.0), 1.0) * 100:.0f}")
    return "/".join(parts)


def device_of(c: dict[str, Any]) -> dict[str, Any]:
    d = c.get("device")
    return d if isinstance(d, dict) else {}


def echoes_of(c: dict[str, Any]) -> int:
    """Echoes checked by the child, or echoed by the root."""
    d = device_of(c)
    return to_int(d.get("echoes")) if "echoes" in d else to_int(d.get("echoed"))


def memory_of(p: dict[str, Any]) -> dict[str, Any]:
    m = p.get("memory")
    return m if isinstance(m, dict) else {}


def channels_of(p: dict[str, Any]) -> list[dict[str, Any]]:
    chans = p.get("channels")
    return [c for c in chans if isinstance(c, dict)] if isinstance(chans, list) else []


def channel_name(p: dict[str, Any], c: dict[str, Any]) -> str:
    """``child1`` for a child's end, ``root→child1`` for the root's end of that channel."""
    name = clean(p.get("name", "?"), 16)
    return f"{name}→{clean(c['child'], 16)}" if "child" in c else name


def own_channel(p: dict[str, Any], cls: str) -> dict[str, Any] | None:
    """A child's own end of its channel of class ``cls`` (``echo``, ``dynmem``)."""
    for c in channels_of(p):
        if c.get("class") == cls and c.get("end", "vsc") == "vsc" and "child" not in c:
            return c
    return None


ProcKey = tuple[str, int]  # a partition's process: its name, its pid (0: none)


def proc_key(p: dict[str, Any]) -> ProcKey:
    """The key of ``p``'s process row: its name ("?" without one), its pid; the
    same in the views and in the demo's records, which look each other up."""
    return clean(p.get("name", "?")), to_int(p.get("pid"))


# -- rates -----------------------------------------------------------------------------------

ChannelKey = tuple[str, int, str, int]  # partition, its pid, child (root's end), relid


def channel_key(p: dict[str, Any], c: dict[str, Any]) -> ChannelKey:
    return (*proc_key(p), clean(c.get("child", "")), to_int(c.get("relid")))


class ChannelRates:
    """Packets/s and bytes/s per channel (both rings), from counter deltas over a window."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._hist: dict[ChannelKey, deque[tuple[float, int, int]]] = {}

    def update(self, st: dict[str, Any], now: float) -> None:
        seen = set()
        for p in st.get("partitions", []):
            for c in channels_of(p):
                key = channel_key(p, c)
                seen.add(key)
                pkts = to_int(c.get("packets_in")) + to_int(c.get("packets_out"))
                nbytes = to_int(c.get("bytes_in")) + to_int(c.get("bytes_out"))
                h = self._hist.setdefault(key, deque())
                if h and pkts < h[-1][1]:  # counters went back: a new channel end
                    h.clear()
                h.append((now, pkts, nbytes))
                while len(h) > 2 and h[1][0] <= now - self.window_s:
                    h.popleft()
        for key in set(self._hist) - seen:
            del self._hist[key]

    def rate(self, key: ChannelKey) -> tuple[float, float] | None:
        """(packets/s, bytes/s), or None until there are two samples 0.2 s apart."""
        h = self._hist.get(key)
        if not h or len(h) < 2 or h[-1][0] - h[0][0] < 0.2:
            return None
        dt = h[-1][0] - h[0][0]
        return (h[-1][1] - h[0][1]) / dt, (h[-1][2] - h[0][2]) / dt


# -- tables -----------------------------------------------------------------------------------

_COLOURS = {"running": "green", "open": "green", "starting": "yellow", "restarting": "yellow",
            "stopping": "yellow", "opening": "yellow", "offered": "yellow", "gpadl": "yellow",
            "crashed": "red", "failed": "red", "revoked": "red", "rescinded": "red",
            "stopped": "dim", "closed": "dim"}


def state_text(s: object) -> str:
    text = clean(s, 12)
    c = _COLOURS.get(text)
    return f"[{c}]{markup_safe(text)}[/]" if c else markup_safe(text)


def _table(title: str | None = None) -> Any:
    from rich import box
    from rich.table import Table

    # One space between columns (rich's SIMPLE_HEAD divider, no padding).
    return Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), show_edge=False,
                 title=title, title_justify="left", title_style="", expand=False)


def _columns(table: Any, spec: Iterable[tuple[str, str, int]]) -> None:
    for col, just, width in spec:
        table.add_column(col, justify=just, no_wrap=True, max_width=width, overflow="ellipsis")


def channel_tables(st: dict[str, Any]) -> list[Any]:
    """One compact table per partition that has channels (``viridian status``).

    Columns: relid, the child (the root's entries), class, state, packets and
    bytes in/out as that partition sees them, ring fill % (outgoing/incoming),
    signals sent/suppressed.  Each fits 80 columns (indented by 2).
    """
    from rich.padding import Padding

    out = []
    for p in st.get("partitions", []):
        chans = channels_of(p)
        if not chans:
            continue
        root = any("child" in c for c in chans)
        n = len(chans)
        t = _table(f"{markup_safe(clean(p.get('name', '?'), 16))}: {n} channel"
                   f"{'' if n == 1 else 's'}")
        spec = [("Relid", "right", 5)]
        if root:
            spec.append(("Child", "left", 8))
        spec += [("Class", "left", 6), ("State", "left", 9), ("Packets in/out", "right", 14),
                 ("Bytes in/out", "right", 13), ("Fill %", "right", 7),
                 ("Signals", "right", 11)]
        _columns(t, spec)
        for c in sorted(chans, key=lambda c: (clean(c.get("child", "")), to_int(c.get("relid")))):
            row = [str(to_int(c.get("relid")))]
            if root:
                row.append(markup_safe(clean(c.get("child", "-"), 16)))
            row += [
                markup_safe(clean(c.get("class", "?"), 12)), state_text(c.get("state", "?")),
                f"{fmt_count(to_int(c.get('packets_in')))}/{fmt_count(to_int(c.get('packets_out')))}",
                f"{fmt_iec(to_int(c.get('bytes_in')))}/{fmt_iec(to_int(c.get('bytes_out')))}",
                _fill(c),
                f"{fmt_count(to_int(c.get('signals_sent')))}/"
                f"{fmt_count(to_int(c.get('signals_suppressed')))}",
            ]
            t.add_row(*row)
        out.append(Padding(t, (0, 0, 0, 2), expand=False))  # under its partition
    return out


CHANNEL_LEGEND = "Fill %: outgoing/incoming ring · Signals: sent/suppressed"


def partitions_table(st: dict[str, Any]) -> Any:
    """Name, role, state, PID, CPU % (the live view's top; memory has its own table)."""
    t = _table()
    _columns(t, (("Name", "left", 12), ("Role", "left", 5), ("State", "left", 10),
                 ("PID", "right", 7), ("CPU %", "right", 6)))
    for p in st.get("partitions", []):
        pid = to_int(p.get("pid"))
        cpu = p.get("cpu") if isinstance(p.get("cpu"), dict) else {}
        usage = to_num(cpu.get("usage_percent"))
        t.add_row(markup_safe(clean(p.get("name", "?"), 16)), clean(p.get("role", "?"), 5),
                  state_text(p.get("state", "?")), str(pid) if pid else "-",
                  f"{usage:.1f}" if pid and usage is not None else "-")
    return t


# -- memory over time ---------------------------------------------------------------------------


class MemoryHistory:
    """Each partition's assigned memory over the last ``span_s`` seconds, in
    ``cells`` fixed time cells (the most assigned in each), for a sparkline;
    and the least and most each process (name, pid) was seen with."""

    def __init__(self, t0: float, span_s: float = HISTORY_S, cells: int = HISTORY_CELLS) -> None:
        self.t0 = t0
        self.cells = cells
        self.cell_s = span_s / cells
        self._hist: dict[str, deque[tuple[int, int]]] = {}  # name -> (cell, most assigned)
        self.seen: dict[ProcKey, tuple[int, int]] = {}  # (name, pid) -> (least, most)

    def _cell(self, now: float) -> int:
        return int((now - self.t0) // self.cell_s)

    def update(self, st: dict[str, Any], now: float) -> None:
        cell = self._cell(now)
        for p in st.get("partitions", []):
            name, pid = proc_key(p)
            a = to_int(memory_of(p).get("assigned_bytes"))
            if not pid or a <= 0:  # no process: a gap in its line
                continue
            h = self._hist.setdefault(name, deque())
            if h and h[-1][0] == cell:
                h[-1] = (cell, max(h[-1][1], a))
            else:
                h.append((cell, a))
            while h[0][0] <= cell - self.cells:
                h.popleft()
            lo, hi = self.seen.get((name, pid), (a, a))
            self.seen[(name, pid)] = (min(lo, a), max(hi, a))

    def sparkline(self, name: str, top: int, now: float) -> str:
        """``cells`` characters, oldest first: ▁ (little) to █ (``top``), blank without data."""
        cell = self._cell(now)
        h = dict(self._hist.get(name, ()))
        if top <= 0:
            top = max(h.values(), default=1)
        out = []
        for i in range(cell - self.cells + 1, cell + 1):
            v = h.get(i)
            out.append(" " if v is None else
                       SPARK[min(len(SPARK) - 1, max(0, -(-v * len(SPARK) // top) - 1))])
        return "".join(out)


def memory_table(st: dict[str, Any], history: MemoryHistory, now: float) -> Any:
    """Per partition: assigned, visible, demand, the DM channel's hot-adds and
    balloons, and a sparkline of assigned memory over the last minute."""
    from rich.text import Text

    t = _table()
    secs = history.cell_s * history.cells
    _columns(t, (("Name", "left", 10), ("Assigned", "right", 8), ("Visible", "right", 7),
                 ("Demand", "right", 7), ("Add/Bal", "right", 7),
                 (f"Assigned, last {secs:.0f} s", "left", history.cells)))
    for p in st.get("partitions", []):
        m = memory_of(p)
        who, pid = proc_key(p)  # (as the history keys it)
        a, vis, dem = (to_int(m.get(k)) for k in ("assigned_bytes", "guest_visible_bytes",
                                                 "demand_bytes"))
        dm = own_channel(p, "dynmem")
        d = device_of(dm) if dm else {}
        name = clean(p.get("name", "?"), 16)
        t.add_row(markup_safe(name), fmt_iec(a) if pid and a else "-",
                  fmt_iec(vis) if pid and vis else "-", fmt_iec(dem) if pid and dem else "-",
                  f"{fmt_count(to_int(d.get('hot_adds')))}/{fmt_count(to_int(d.get('balloons')))}"
                  if d else "-",
                  Text(history.sparkline(who, to_int(m.get("maximum_bytes")), now),
                       style="green" if m.get("dynamic") is True else "dim"))
    return t


MEMORY_LEGEND = ("Visible: as the partition reports · Demand: its last pressure report\n"
                 "Add/Bal: hot-adds/balloons on its DM channel · "
                 f"{SPARK[0]} to {SPARK[-1]}: 0 to its maximum")


def _mbps(bytes_per_s: float) -> str:
    v = bytes_per_s / 1e6
    return f"{v:.1f}" if v < 9.95 else f"{v:.0f}"


def demo_channels_table(st: dict[str, Any], rates: ChannelRates) -> Any:
    """Every channel end with its rates and the echo device's counters."""
    t = _table()
    # At most 80 columns: 11 columns of at most 70 characters, one space apart.
    _columns(t, (("Partition", "left", 11), ("Relid", "right", 5), ("Class", "left", 6),
                 ("State", "left", 7), ("pkt/s", "right", 5), ("MB/s", "right", 4),
                 ("Pkts", "right", 5), ("Fill %", "right", 7), ("Signals", "right", 11),
                 ("Echoes", "right", 6), ("Bad", "right", 3)))
    for p in st.get("partitions", []):
        for c in channels_of(p):
            r = rates.rate(channel_key(p, c))
            d = device_of(c)
            t.add_row(
                markup_safe(channel_name(p, c)), str(to_int(c.get("relid"))),
                markup_safe(clean(c.get("class", "?"), 12)), state_text(c.get("state", "?")),
                fmt_count(r[0]) if r else "-", _mbps(r[1]) if r else "-",
                fmt_count(to_int(c.get("packets_in")) + to_int(c.get("packets_out"))),
                _fill(c),
                f"{fmt_count(to_int(c.get('signals_sent')))}/"
                f"{fmt_count(to_int(c.get('signals_suppressed')))}",
                fmt_count(echoes_of(c)) if "echoes" in d or "echoed" in d else "-",
                (f"[red]{to_int(d['mismatches'])}[/]" if to_int(d["mismatches"])
                 else "0") if "mismatches" in d else "-")
    return t


# -- disks ---------------------------------------------------------------------------------------

DISK_BLOCK = 4096  # the demo reads random 4 KiB blocks (its disk benches and summary)
DISK_KEYS = ("read_ops", "write_ops", "read_bytes", "write_bytes", "traps", "flushes", "errors")
BUS_KIND = {"scsi": "synthetic", "ide": "emulated"}  # over VMBus / behind traps
BENCH_PATH = {"scsi": "scsi", "ide": "ide-dma"}  # the child's block path the demo benches
DISK_BUDGET_S = 0.08  # sized (from the child's own timing) to take about this long: the
DISK_OPS_MIN, DISK_OPS_MAX = 8, 2048
DiskKey = tuple[str, int, int]  # partition, its pid, the disk's index


def disk_entries(p: dict[str, Any]) -> list[dict[str, Any]]:
    """A partition's ``disks`` (docs/status-schema.md); entries that are not objects dropped."""
    disks = p.get("disks")
    return [d for d in disks if isinstance(d, dict)][:16] if isinstance(disks, list) else []


def disk_counters(d: dict[str, Any]) -> dict[str, int]:
    """The disk's counters as integers (0 for a missing or mistyped one)."""
    return {k: max(0, to_int(d.get(k))) for k in DISK_KEYS}


def disk_bus(d: dict[str, Any]) -> str:
    bus = clean(d.get("bus", "?"), 8)
    return bus if bus in BUS_KIND else "?"


class DiskRates:
    """Reads/s, writes/s, bytes/s and traps/s per disk, from counter deltas
    over a window (as ``ChannelRates``: the root reports at most every 0.25 s)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._hist: dict[DiskKey, deque[tuple[float, tuple[int, ...]]]] = {}

    def update(self, st: dict[str, Any], now: float) -> None:
        seen = set()
        for p in st.get("partitions", []):
            if not isinstance(p, dict):
                continue
            for i, d in enumerate(disk_entries(p)):
                key = (*proc_key(p), i)
                seen.add(key)
                c = disk_counters(d)
                v = (c["read_ops"], c["write_ops"], c["read_bytes"] + c["write_bytes"],
                     c["traps"])
                h = self._hist.setdefault(key, deque())
                if h and any(a < b for a, b in zip(v, h[-1][1], strict=True)):
                    h.clear()  # counters went back: a new worker (the root restarted)
                h.append((now, v))
                while len(h) > 2 and h[1][0] <= now - self.window_s:
                    h.popleft()
        for key in set(self._hist) - seen:
            del self._hist[key]

    def rate(self, key: DiskKey) -> dict[str, float] | None:
        """``reads``, ``writes``, ``bytes``, ``traps`` per second, or None until
        there are two samples 0.2 s apart."""
        h = self._hist.get(key)
        if not h or len(h) < 2 or h[-1][0] - h[0][0] < 0.2:
            return None
        dt = h[-1][0] - h[0][0]
        return {k: (b - a) / dt for k, a, b in zip(("reads", "writes", "bytes", "traps"),
                                                    h[0][1], h[-1][1], strict=True)}


@dataclass
class DiskRecord:
    """One disk of one child process during the demo: its counters since the
    demo first saw it, and the benches the demo ran on it."""

    partition: str
    pid: int
    index: int
    bus: str
    path: str
    size: int
    first: dict[str, int]  # the counters when first seen (the baseline)
    last: dict[str, int] = field(default_factory=dict)
    carried: dict[str, int] = field(default_factory=dict)  # what counted before a reset
    benches: deque[tuple[float, float]] = field(  # the last results: (ops/s, p50 µs)
        default_factory=lambda: deque(maxlen=8))
    bench_count: int = 0
    ops_benched: int = 0  # ops in the benches the child reported
    next_ops: int = 0  # the size of the next bench
    failures: int = 0

    def observe(self, counters: dict[str, int]) -> None:
        last = self.last or self.first
        for k, v in counters.items():
            if v < last.get(k, 0):  # a reset (a new device worker): keep what it counted
                self.carried[k] = self.carried.get(k, 0) + last.get(k, 0) - self.first.get(k, 0)
                self.first[k] = 0
        self.last = dict(counters)

    def total(self, key: str) -> int:
        last = self.last or self.first
        return self.carried.get(key, 0) + max(0, last.get(key, 0) - self.first.get(key, 0))

    @property
    def ops(self) -> int:
        return self.total("read_ops") + self.total("write_ops")

    def bench_rate(self) -> tuple[float, float] | None:
        """The median ops/s and p50 latency (µs) of the last benches."""
        if not self.benches:
            return None
        import statistics

        return (statistics.median(b[0] for b in self.benches),
                statistics.median(b[1] for b in self.benches))

    def add_bench(self, r: dict[str, Any]) -> bool:
        """Take one ``disk bench`` result the child logged; size the next bench
        so it takes about ``DISK_BUDGET_S``.  False for a malformed result."""
        ops, secs = r.get("ops"), to_num(r.get("seconds"))
        rate, p50 = to_num(r.get("ops_per_s")), to_num(r.get("p50_us"))
        if (not isinstance(ops, int) or isinstance(ops, bool) or not 0 < ops <= 1 << 20
                or secs is None or secs <= 0 or rate is None or rate < 0 or p50 is None):
            return False
        self.benches.append((rate, max(p50, 0.0)))
        self.bench_count += 1
        self.ops_benched += ops
        want = ops * DISK_BUDGET_S / secs
        self.next_ops = int(min(max(want, ops / 4, DISK_OPS_MIN), ops * 4, DISK_OPS_MAX))
        return True


def _rate_cell(r: dict[str, float] | None, key: str) -> str:
    return fmt_count(r[key]) if r else "-"


def demo_disks_table(st: dict[str, Any], rates: DiskRates,
                     records: dict[DiskKey, DiskRecord]) -> Any:
    """Every child's disks side by side: bus, rates from counter deltas (reads,
    writes, MB/s, traps), the child's own timing of the demo's benches, and
    the ops the demo did."""
    t = _table()
    # At most 80 columns: 9 columns of at most 72 characters, one space apart.
    _columns(t, (("Disk", "left", 12), ("Bus", "left", 14), ("Read/s", "right", 6),
                 ("Write/s", "right", 7), ("MB/s", "right", 5), ("Traps/s", "right", 7),
                 ("Bench/s", "right", 7), ("p50", "right", 6), ("Ops", "right", 5)))
    for p in st.get("partitions", []):
        if not isinstance(p, dict):
            continue
        name, pid = proc_key(p)
        for i, d in enumerate(disk_entries(p)):
            key = (name, pid, i)
            r = rates.rate(key) if pid else None
            bus = disk_bus(d)
            rec = records.get(key)
            br = rec.bench_rate() if rec else None
            t.add_row(markup_safe(f"{clean(name, 16)} disk{i}"),
                      f"{bus} {BUS_KIND.get(bus, '')}".strip(),
                      _rate_cell(r, "reads"), _rate_cell(r, "writes"),
                      _mbps(r["bytes"]) if r else "-",
                      _rate_cell(r, "traps") if bus == "ide" else "-",
                      fmt_count(br[0]) if br else "-", fmt_us(br[1]) if br else "-",
                      fmt_count(rec.ops) if rec else "-")
    return t


DISKS_LEGEND = ("synthetic: storvsc → storvsp over VMBus · emulated: every port access "
                "traps\nBench/s, p50: as the child timed its last benches · Ops: the "
                "demo's, in all")


def disk_comparison(records: Iterable[DiskRecord]) -> str | None:
    """``4 KiB random reads: scsi 17.8k ops/s, ide-dma 650 ops/s (27x)`` once
    both kinds of disk have bench results (the best of each kind)."""
    best: dict[str, float] = {}
    for rec in records:
        br = rec.bench_rate()
        if br is not None and rec.bus in BENCH_PATH:
            best[rec.bus] = max(best.get(rec.bus, 0.0), br[0])
    if "scsi" not in best or "ide" not in best:
        return None
    ratio = f" ({best['scsi'] / best['ide']:.0f}x)" if best["ide"] > 0 else ""
    return (f"{fmt_size(DISK_BLOCK)} random reads: scsi {fmt_count(best['scsi'])} ops/s, "
            f"{BENCH_PATH['ide']} {fmt_count(best['ide'])} ops/s{ratio}")


def disk_progress(st: dict[str, Any], rates: DiskRates) -> str | None:
    """The progress line's item: ``disks: child1 scsi 1.7k read/s 0 write/s 7.0 MB/s, ...``."""
    items = []
    for p in st.get("partitions", []):
        if not isinstance(p, dict) or p.get("role") != "child":
            continue
        disks = disk_entries(p)
        key, name = proc_key(p), clean(p.get("name", "?"), 16)
        for i, d in enumerate(disks):
            bus = disk_bus(d)
            who = f"{name} {bus}" + (f"#{i}" if len(disks) > 1 else "")
            r = rates.rate((*key, i)) if key[1] else None
            if r is None:
                items.append(f"{who} -")
                continue
            items.append(f"{who} {fmt_count(r['reads'])} read/s {fmt_count(r['writes'])} "
                         f"write/s {_mbps(r['bytes'])} MB/s"
                         + (f" {fmt_count(r['traps'])} traps/s" if bus == "ide" else ""))
    return "disks: " + ", ".join(items) if items else None


def disk_summary_line(rec: DiskRecord, who: str) -> str:
    """``  child2 disk0 ide, emulated: 320 ops (320 reads, 0 writes), 1.2MiB read,
    0B written, 4,480 traps (14.0 per op); 3 benches, median 650 ops/s, p50 1.2ms``."""
    reads, writes = rec.total("read_ops"), rec.total("write_ops")
    benches = f"{rec.bench_count:,} bench" + ("" if rec.bench_count == 1 else "es")
    line = (f"  {who} disk{rec.index} {rec.bus}, {BUS_KIND.get(rec.bus, '?')}: "
            f"{rec.ops:,} ops ({reads:,} reads, {writes:,} writes), "
            f"{fmt_iec(rec.total('read_bytes'))} read, {fmt_iec(rec.total('write_bytes'))} "
            "written, ")
    if rec.bus == "ide":
        traps = rec.total("traps")
        line += plural(traps, "trap") + (f" ({traps / rec.ops:.1f} per op)" if rec.ops else "")
    else:
        line += "no traps"
    br = rec.bench_rate()
    if br is not None:
        line += (f"; {benches}, median {fmt_count(br[0])} ops/s, "
                 f"p50 {fmt_us(br[1])}")
    if rec.failures:
        line += f"; {plural(rec.failures, 'failed bench')}"
    return line


def disk_tables(st: dict[str, Any]) -> list[Any]:
    """One compact table per partition that has disks (``viridian status``):
    bus, size, ops and bytes read/written, traps (ide), errors, the image
    file (shortened).  Each fits 80 columns (indented by 2)."""
    from rich.padding import Padding

    out = []
    for p in st.get("partitions", []):
        if not isinstance(p, dict):
            continue
        disks = disk_entries(p)
        if not disks:
            continue
        n = len(disks)
        t = _table(f"{markup_safe(clean(p.get('name', '?'), 16))}: {n} disk"
                   f"{'' if n == 1 else 's'}")
        # 7 columns of at most 72 characters, one space apart, indented by 2: 80.
        _columns(t, (("Bus", "left", 4), ("Size", "right", 6), ("Ops r/w", "right", 11),
                     ("Bytes r/w", "right", 13), ("Traps", "right", 5), ("Err", "right", 5),
                     ("Image", "left", 28)))
        for d in disks:
            c = disk_counters(d)
            bus = disk_bus(d)
            t.add_row(bus, fmt_iec(to_int(d.get("size_bytes"))),
                      f"{fmt_count(c['read_ops'])}/{fmt_count(c['write_ops'])}",
                      f"{fmt_iec(c['read_bytes'])}/{fmt_iec(c['write_bytes'])}",
                      fmt_count(c["traps"]) if bus == "ide" else "-",
                      f"[red]{fmt_count(c['errors'])}[/]" if c["errors"] else "0",
                      markup_safe(short_path(d.get("path", "?"), 28)))
        out.append(Padding(t, (0, 0, 0, 2), expand=False))
    return out


DISK_LEGEND = ("Bus: scsi synthetic (VMBus), ide emulated (trapped) · Ops, Bytes: read/written"
               "\nTraps: the child's trapped port accesses · images stay after `down`")


# -- trace lines ------------------------------------------------------------------------------

_HEX_KEYS = ("gpadl", "gpadlhandle", "flags", "_requested", "connection_id", "conn_id",
             "interrupt_page_or_sint")
_SHOWN_ELSEWHERE = {"t", "dir", "peer", "child", "what", "relid", "fields"}


def _kv(k: object, v: object) -> str:
    key = clean(k, 40)
    if isinstance(v, int) and not isinstance(v, bool) and key.endswith(_HEX_KEYS):
        return f"{key}={v:#x}"
    text = clean(v, 80)
    if isinstance(v, str) and (" " in text or not text):
        return f'{key}="{text}"'
    return f"{key}={text}"


def trace_line(partition: str, ev: dict[str, Any]) -> str:
    """One trace event as a tcpdump-like line::

        16:20:01.123456 child1 > root   OPENCHANNEL child_relid=1 openid=1 ...
        16:20:01.124001 root   < child1 relid 1 packet type=0x6 flags=0x1 trans_id=42 len=1024

    ``>`` is a message or packet ``partition`` sent to its peer, ``<`` one it
    received, ``-`` something that happened at ``partition`` (a channel opened).
    """
    t = to_num(ev.get("t"))
    try:
        ts = datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f") if t else "?"
    except (OverflowError, OSError, ValueError):
        ts = "?"
    d = ev.get("dir")  # (a partition's value: anything, even unhashable)
    arrow = {"out": ">", "in": "<"}.get(d, "-") if isinstance(d, str) else "-"
    peer = ev.get("peer", ev.get("child", "?"))
    head = f"{ts} {clean(partition, 16):<6} {arrow} {clean(peer, 16):<6}"
    what = clean(ev.get("what", "?"), 40)
    relid = ev.get("relid")
    where = f" relid {to_int(relid)}" if isinstance(relid, int) else ""
    if what == "packet":
        return (f"{head}{where} packet type={to_int(ev.get('type')):#x} "
                f"flags={to_int(ev.get('flags')):#x} trans_id={to_int(ev.get('trans_id'))} "
                f"len={to_int(ev.get('len'))}")
    fields = ev.get("fields")
    if isinstance(fields, dict):  # a decoded control message
        return " ".join([f"{head} {what}", *(_kv(k, v) for k, v in list(fields.items())[:24])])
    rest = [_kv(k, v) for k, v in list(ev.items())[:24] if k not in _SHOWN_ELSEWHERE]
    return " ".join([f"{head}{where} {what}", *rest])
