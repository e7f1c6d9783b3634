"""What the CLI shows of a running cluster: the ``viridian demo`` loop and
live view, the channel and disk tables of ``viridian status``, the lines of
``viridian trace``.

Layer: partitions (presentation, above hv.control).  Everything here reads
the status object (docs/status-schema.md) or trace events and turns them
into rich tables or plain lines; ``Demo`` is the one piece with I/O: it
polls ``status`` about four times a second (waiting on the cluster's event
stream in between, so a stop or a crash is seen at once), starts the echo
``stream`` workload on every child whose echo channel is open, and keeps
what the summary needs; it also starts the Dynamic Memory ``bursts``
workload on every child with a DM channel and shows each partition's
memory over time (assigned, visible, demand, a sparkline of the last
minute), so hot-adds and balloons can be watched as they happen.  Every
child with a disk gets a short ``disk`` ``bench`` (random 4 KiB reads) about
once a second, one at a time per child, sized from the child's own timing
(its log's ``disk bench`` records) to take about 80 ms of its loop; the
disks panel shows each child's disk side by side (synthetic SCSI over
VMBus, emulated IDE behind traps) with rates from the root's counters.

Rates are counter deltas over a sliding window of about two seconds:
partitions report their channels at most every 0.25 s, so a shorter window
would jump between zero and twice the rate.

Trust: status entries and trace events carry what partitions reported, and
a partition may be hostile (docs/threat-model.md).  Every value is
type-checked before it is formatted (a wrong type shows as ``?`` or 0), and
strings lose control characters and are cut short, so nothing a partition
writes can move the cursor or recolour the terminal.
"""

from __future__ import annotations

import datetime
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hv.control import ControlClient, ControlError

__all__ = [
    "Demo",
    "DemoOptions",
    "DiskRates",
    "DiskRecord",
    "LogTail",
    "MemoryHistory",
    "channel_tables",
    "disk_tables",
    "fmt_count",
    "fmt_iec",
    "fmt_size",
    "fmt_us",
    "short_path",
    "trace_line",
]

TICK_S = 0.25  # the live view's refresh period (4 per second)
RATE_WINDOW_S = 2.0
OPEN_TIMEOUT_S = 10.0  # how long the demo waits for the children's echo channels
SETTLE_TIMEOUT_S = 2.0  # after "stop": in-flight echoes come back, reports catch up
HISTORY_S = 60.0  # the memory sparkline's span ...
HISTORY_CELLS = 30  # ... in this many characters (2 s each)
SPARK = "▁▂▃▄▅▆▇█"
# The demo's Dynamic Memory workload: allocate in 96 MiB steps to 480 MiB, hold, free, rest.
BURSTS_ARGS = {"peak_mb": 480, "step_mb": 96, "period_s": 0.25}


# -- safe formatting ---------------------------------------------------------------------------


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _num(v: object) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def clean(v: object, limit: int = 40) -> str:
    """``v`` as printable text: control characters dropped, at most ``limit`` characters."""
    s = v if isinstance(v, str) else str(v)
    s = "".join(ch for ch in s if ch.isprintable())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _markup_safe(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def fmt_count(n: float) -> str:
    """A count in at most 5 characters: 987, 12.3k, 456k, 1.23M, 4.56G."""
    v, unit = float(n), ""
    for u in ("k", "M", "G", "T"):
        if abs(v) < 999.5:
            break
        v, unit = v / 1000, u
    return f"{v:.3g}{unit}" if unit else f"{v:.0f}"


def fmt_size(n: int) -> str:
    """An exact size for messages: 64 B, 1 KiB, 1536 B, 64 KiB."""
    for unit, div in (("MiB", 1 << 20), ("KiB", 1024)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def fmt_iec(n: int) -> str:
    """Bytes in IEC units without a space, at most 6 characters: 512B, 9.5KiB, 148MiB."""
    v, unit = float(n), "B"
    for u in ("KiB", "MiB", "GiB", "TiB"):
        if v < 999.5:
            break
        v, unit = v / 1024, u
    if unit == "B":
        return f"{n}B"
    return (f"{v:.1f}" if v < 9.95 else f"{v:.0f}") + unit


def _fill(c: dict[str, Any]) -> str:
    """Ring fill in percent, outgoing/incoming (fractions in the status)."""
    parts = []
    for key in ("out_ring_fill", "in_ring_fill"):
        v = _num(c.get(key))
        parts.append("-" if v is None else f"{min(max(v, 0.0), 1.0) * 100:.0f}")
    return "/".join(parts)


def _device(c: dict[str, Any]) -> dict[str, Any]:
    d = c.get("device")
    return d if isinstance(d, dict) else {}


def _echoes(c: dict[str, Any]) -> int:
    """Echoes checked by the child, or echoed by the root."""
    d = _device(c)
    return _int(d.get("echoes")) if "echoes" in d else _int(d.get("echoed"))


def _plural(n: int, what: str) -> str:
    return f"{n:,} {what}" + ("" if n == 1 else "s")


def _mem(p: dict[str, Any]) -> dict[str, Any]:
    m = p.get("memory")
    return m if isinstance(m, dict) else {}


def _channels(p: dict[str, Any]) -> list[dict[str, Any]]:
    chans = p.get("channels")
    return [c for c in chans if isinstance(c, dict)] if isinstance(chans, list) else []


def _chan_name(p: dict[str, Any], c: dict[str, Any]) -> str:
    """``child1`` for a child's end, ``root→child1`` for the root's end of that channel."""
    name = clean(p.get("name", "?"), 16)
    return f"{name}→{clean(c['child'], 16)}" if "child" in c else name


def _own_channel(p: dict[str, Any], cls: str) -> dict[str, Any] | None:
    """A child's own end of its channel of class ``cls`` (``echo``, ``dynmem``)."""
    for c in _channels(p):
        if c.get("class") == cls and c.get("end", "vsc") == "vsc" and "child" not in c:
            return c
    return None


ProcKey = tuple[str, int]  # a partition's process: its name, its pid (0: none)


def _proc_key(p: dict[str, Any]) -> ProcKey:
    """The key of ``p``'s process row: its name ("?" without one), its pid; the
    same in the views and in the demo's records, which look each other up."""
    return clean(p.get("name", "?")), _int(p.get("pid"))


# -- rates -----------------------------------------------------------------------------------

ChannelKey = tuple[str, int, str, int]  # partition, its pid, child (root's end), relid


def channel_key(p: dict[str, Any], c: dict[str, Any]) -> ChannelKey:
    return (*_proc_key(p), clean(c.get("child", "")), _int(c.get("relid")))


class ChannelRates:
    """Packets/s and bytes/s per channel (both rings), from counter deltas over a window."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._hist: dict[ChannelKey, deque[tuple[float, int, int]]] = {}

    def update(self, st: dict[str, Any], now: float) -> None:
        seen = set()
        for p in st.get("partitions", []):
            for c in _channels(p):
                key = channel_key(p, c)
                seen.add(key)
                pkts = _int(c.get("packets_in")) + _int(c.get("packets_out"))
                nbytes = _int(c.get("bytes_in")) + _int(c.get("bytes_out"))
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


def _state(s: object) -> str:
    text = clean(s, 12)
    c = _COLOURS.get(text)
    return f"[{c}]{_markup_safe(text)}[/]" if c else _markup_safe(text)


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
        chans = _channels(p)
        if not chans:
            continue
        root = any("child" in c for c in chans)
        n = len(chans)
        t = _table(f"{_markup_safe(clean(p.get('name', '?'), 16))}: {n} channel"
                   f"{'' if n == 1 else 's'}")
        spec = [("Relid", "right", 5)]
        if root:
            spec.append(("Child", "left", 8))
        spec += [("Class", "left", 6), ("State", "left", 9), ("Packets in/out", "right", 14),
                 ("Bytes in/out", "right", 13), ("Fill %", "right", 7),
                 ("Signals", "right", 11)]
        _columns(t, spec)
        for c in sorted(chans, key=lambda c: (clean(c.get("child", "")), _int(c.get("relid")))):
            row = [str(_int(c.get("relid")))]
            if root:
                row.append(_markup_safe(clean(c.get("child", "-"), 16)))
            row += [
                _markup_safe(clean(c.get("class", "?"), 12)), _state(c.get("state", "?")),
                f"{fmt_count(_int(c.get('packets_in')))}/{fmt_count(_int(c.get('packets_out')))}",
                f"{fmt_iec(_int(c.get('bytes_in')))}/{fmt_iec(_int(c.get('bytes_out')))}",
                _fill(c),
                f"{fmt_count(_int(c.get('signals_sent')))}/"
                f"{fmt_count(_int(c.get('signals_suppressed')))}",
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
        pid = _int(p.get("pid"))
        cpu = p.get("cpu") if isinstance(p.get("cpu"), dict) else {}
        usage = _num(cpu.get("usage_percent"))
        t.add_row(_markup_safe(clean(p.get("name", "?"), 16)), clean(p.get("role", "?"), 5),
                  _state(p.get("state", "?")), str(pid) if pid else "-",
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
            name, pid = _proc_key(p)
            a = _int(_mem(p).get("assigned_bytes"))
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
        m = _mem(p)
        who, pid = _proc_key(p)  # (as the history keys it)
        a, vis, dem = (_int(m.get(k)) for k in ("assigned_bytes", "guest_visible_bytes",
                                                 "demand_bytes"))
        dm = _own_channel(p, "dynmem")
        d = _device(dm) if dm else {}
        name = clean(p.get("name", "?"), 16)
        t.add_row(_markup_safe(name), fmt_iec(a) if pid and a else "-",
                  fmt_iec(vis) if pid and vis else "-", fmt_iec(dem) if pid and dem else "-",
                  f"{fmt_count(_int(d.get('hot_adds')))}/{fmt_count(_int(d.get('balloons')))}"
                  if d else "-",
                  Text(history.sparkline(who, _int(m.get("maximum_bytes")), now),
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
        for c in _channels(p):
            r = rates.rate(channel_key(p, c))
            d = _device(c)
            t.add_row(
                _markup_safe(_chan_name(p, c)), str(_int(c.get("relid"))),
                _markup_safe(clean(c.get("class", "?"), 12)), _state(c.get("state", "?")),
                fmt_count(r[0]) if r else "-", _mbps(r[1]) if r else "-",
                fmt_count(_int(c.get("packets_in")) + _int(c.get("packets_out"))),
                _fill(c),
                f"{fmt_count(_int(c.get('signals_sent')))}/"
                f"{fmt_count(_int(c.get('signals_suppressed')))}",
                fmt_count(_echoes(c)) if "echoes" in d or "echoed" in d else "-",
                (f"[red]{_int(d['mismatches'])}[/]" if _int(d["mismatches"])
                 else "0") if "mismatches" in d else "-")
    return t


# -- disks ---------------------------------------------------------------------------------------

DISK_KEYS = ("read_ops", "write_ops", "read_bytes", "write_bytes", "traps", "flushes", "errors")
BUS_KIND = {"scsi": "synthetic", "ide": "emulated"}  # over VMBus / behind traps
BENCH_PATH = {"scsi": "scsi", "ide": "ide-dma"}  # the child's block path the demo benches
DISK_BLOCK = 4096  # the demo reads random 4 KiB blocks ...
DISK_EVERY_S = 1.0  # ... in one short bench per child about every second,
DISK_BUDGET_S = 0.08  # sized (from the child's own timing) to take about this long: the
DISK_OPS_START = {"scsi": 256, "ide": 32}  # child's loop (its echoes, its DM) waits meanwhile
DISK_OPS_MIN, DISK_OPS_MAX = 8, 2048
DISK_ANSWER_TIMEOUT_S = 3.0  # a bench whose result the child never logged counts as lost
IDE_GRACE_S = 1.0  # an ide disk is benched this long after the child's channels opened
DiskKey = tuple[str, int, int]  # partition, its pid, the disk's index


def disk_entries(p: dict[str, Any]) -> list[dict[str, Any]]:
    """A partition's ``disks`` (docs/status-schema.md); entries that are not objects dropped."""
    disks = p.get("disks")
    return [d for d in disks if isinstance(d, dict)][:16] if isinstance(disks, list) else []


def disk_counters(d: dict[str, Any]) -> dict[str, int]:
    """The disk's counters as integers (0 for a missing or mistyped one)."""
    return {k: max(0, _int(d.get(k))) for k in DISK_KEYS}


def disk_bus(d: dict[str, Any]) -> str:
    bus = clean(d.get("bus", "?"), 8)
    return bus if bus in BUS_KIND else "?"


def short_path(path: object, limit: int = 28) -> str:
    """A file path in at most ``limit`` characters: the home directory as ``~``,
    then, if still too long, ``…`` and as many whole trailing components as fit
    (the file name itself cut from the left when it alone is too long)."""
    import os

    s = clean(path, 4096)
    home = os.path.expanduser("~")
    if home not in ("", "/", "~") and (s == home or s.startswith(home + "/")):
        s = "~" + s[len(home):]
    if len(s) <= limit:
        return s
    parts = s.split("/")
    tail = parts[-1]
    for comp in reversed(parts[:-1]):
        if len(comp) + 1 + len(tail) + 2 > limit:
            break
        tail = f"{comp}/{tail}"
    out = "…/" + tail
    return out if len(out) <= limit else "…" + s[-(limit - 1):]


def fmt_us(us: float | None) -> str:
    """A latency: 33µs, 850µs, 1.2ms, 15ms, 1.5s."""
    if us is None or us < 0:
        return "-"
    if us < 999.5:
        return f"{us:.0f}µs"
    ms = us / 1000
    if ms < 999.5:
        return f"{ms:.1f}ms" if ms < 9.95 else f"{ms:.0f}ms"
    return f"{ms / 1000:.1f}s"


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
                key = (*_proc_key(p), i)
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
        ops, secs = r.get("ops"), _num(r.get("seconds"))
        rate, p50 = _num(r.get("ops_per_s")), _num(r.get("p50_us"))
        if (not isinstance(ops, int) or isinstance(ops, bool) or not 0 < ops <= 1 << 20
                or secs is None or secs <= 0 or rate is None or rate < 0 or p50 is None):
            return False
        self.benches.append((rate, max(p50, 0.0)))
        self.bench_count += 1
        self.ops_benched += ops
        want = ops * DISK_BUDGET_S / secs
        self.next_ops = int(min(max(want, ops / 4, DISK_OPS_MIN), ops * 4, DISK_OPS_MAX))
        return True


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
        name, pid = _proc_key(p)
        for i, d in enumerate(disk_entries(p)):
            key = (name, pid, i)
            r = rates.rate(key) if pid else None
            bus = disk_bus(d)
            rec = records.get(key)
            br = rec.bench_rate() if rec else None
            t.add_row(_markup_safe(f"{clean(name, 16)} disk{i}"),
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
        key, name = _proc_key(p), clean(p.get("name", "?"), 16)
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
        line += _plural(traps, "trap") + (f" ({traps / rec.ops:.1f} per op)" if rec.ops else "")
    else:
        line += "no traps"
    br = rec.bench_rate()
    if br is not None:
        line += (f"; {benches}, median {fmt_count(br[0])} ops/s, "
                 f"p50 {fmt_us(br[1])}")
    if rec.failures:
        line += f"; {_plural(rec.failures, 'failed bench')}"
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
        t = _table(f"{_markup_safe(clean(p.get('name', '?'), 16))}: {n} disk"
                   f"{'' if n == 1 else 's'}")
        # 7 columns of at most 72 characters, one space apart, indented by 2: 80.
        _columns(t, (("Bus", "left", 4), ("Size", "right", 6), ("Ops r/w", "right", 11),
                     ("Bytes r/w", "right", 13), ("Traps", "right", 5), ("Err", "right", 5),
                     ("Image", "left", 28)))
        for d in disks:
            c = disk_counters(d)
            bus = disk_bus(d)
            t.add_row(bus, fmt_iec(_int(d.get("size_bytes"))),
                      f"{fmt_count(c['read_ops'])}/{fmt_count(c['write_ops'])}",
                      f"{fmt_iec(c['read_bytes'])}/{fmt_iec(c['write_bytes'])}",
                      fmt_count(c["traps"]) if bus == "ide" else "-",
                      f"[red]{fmt_count(c['errors'])}[/]" if c["errors"] else "0",
                      _markup_safe(short_path(d.get("path", "?"), 28)))
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
    t = _num(ev.get("t"))
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
    where = f" relid {_int(relid)}" if isinstance(relid, int) else ""
    if what == "packet":
        return (f"{head}{where} packet type={_int(ev.get('type')):#x} "
                f"flags={_int(ev.get('flags')):#x} trans_id={_int(ev.get('trans_id'))} "
                f"len={_int(ev.get('len'))}")
    fields = ev.get("fields")
    if isinstance(fields, dict):  # a decoded control message
        return " ".join([f"{head} {what}", *(_kv(k, v) for k, v in list(fields.items())[:24])])
    rest = [_kv(k, v) for k, v in list(ev.items())[:24] if k not in _SHOWN_ELSEWHERE]
    return " ".join([f"{head}{where} {what}", *rest])


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
                        st == "running" and _int(ev.get("restarts"))):
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
            key = _proc_key(p)
            for recs, cls in ((self.streams, "echo"), (self.bursts, "dynmem")):
                c = _own_channel(p, cls)
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
                        _int(d.get("size_bytes")), first=counters,
                        next_ops=DISK_OPS_START.get(bus, DISK_OPS_MIN))
                else:
                    drec.observe(counters)
        return True

    def _running_children(self) -> Iterator[tuple[dict[str, Any], ProcKey]]:
        """The running children of the last status, each with its key."""
        for p in self.status.get("partitions", []):
            if p.get("role") == "child" and p.get("state") == "running":
                yield p, _proc_key(p)

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
            return any(c.get("class") == "storvsc" and _device(c).get("ready") is True
                       for c in _channels(p))
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
            chans = _channels(p)
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
            c = _own_channel(p, "dynmem")
            if (c is None or c.get("state") != "open" or _device(c).get("state") != "ready"
                    or key in self.bursts):
                continue
            now = time.monotonic()
            self.bursts[key] = StreamRecord(key[0], key[1], now, last=c, seen=now,
                                            startup=_int(_mem(p).get("startup_bytes")))
            try:
                self._ctl.request("workload", name=key[0], device="dynmem", action="bursts",
                                  args=BURSTS_ARGS)
            except (ControlError, TimeoutError) as e:
                del self.bursts[key]
                self._note(f"{key[0]}: the memory bursts did not start: {e}")

    def _start_streams(self) -> None:
        assert self._ctl is not None
        for p, key in self._running_children():
            c = _own_channel(p, "echo")
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
            c = _own_channel(p, "echo")
            if c is None:
                continue
            r = self.rates.rate(channel_key(p, c))
            d = _device(c)
            rate = f"{fmt_count(r[0])} pkt/s {r[1] / 1e6:.1f} MB/s" if r else "- pkt/s"
            items.append(f"{clean(p.get('name'), 16)} relid {_int(c.get('relid'))} "
                         f"{clean(c.get('state'), 12)}: {rate} "
                         f"echoes {_int(d.get('echoes'))} "
                         f"mismatches {_int(d.get('mismatches'))}")
        mem = [f"{clean(p.get('name'), 16)} {fmt_iec(_int(_mem(p).get('assigned_bytes')))}"
               for p in self.status.get("partitions", [])
               if p.get("role") == "child" and _int(p.get("pid"))]
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
                running = dict(_proc_key(p) for p in self.status.get("partitions", [])
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
            rec = self.streams.get(_proc_key(p))
            if rec is None:
                continue
            c = _own_channel(p, "echo")
            d = _device(c) if c else {}
            if d.get("streaming") or _int(d.get("in_flight")):
                return False
        for p in self.status.get("partitions", []):
            rec = self.bursts.get(_proc_key(p))
            if rec is None or rec.stopped is None:
                continue
            c = _own_channel(p, "dynmem")
            if c is not None and _int(_device(c).get("workload_pages")):
                return False  # its pages are freed (and checked) at stop: not reported yet
        running = {_proc_key(p) for p in self.status.get("partitions", [])
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
            d = _device(c)
            pkts = _int(c.get("packets_in")) + _int(c.get("packets_out"))
            nbytes = _int(c.get("bytes_in")) + _int(c.get("bytes_out"))
            secs = max((rec.stopped or time.monotonic()) - rec.started, 1e-3)
            lines.append(f"  {who} relid {_int(c.get('relid'))} "
                         f"{clean(c.get('class', 'echo'), 12)}: {pkts:,} packets, "
                         f"{fmt_iec(nbytes)} in {secs:.1f} s = {fmt_count(pkts / secs)} "
                         f"packets/s, {nbytes / secs / 1e6:.1f} MB/s; "
                         f"{_int(d.get('echoes')):,} echoes, "
                         f"{_int(d.get('mismatches'))} mismatches")
        return lines

    def memory_summary_lines(self) -> list[str]:
        """One line per child's memory bursts: hot-adds, balloons, corrupt pages
        (its DM channel's counters), and the least and most memory it was assigned."""
        lines = []
        names = [r.partition for r in self.bursts.values()]
        for rec in sorted(self.bursts.values(), key=lambda r: (r.partition, r.started)):
            d = _device(rec.last)
            who = rec.partition + (f" (pid {rec.pid})" if names.count(rec.partition) > 1 else "")
            lo, hi = self.memory.seen.get((rec.partition, rec.pid), (0, 0))
            lines.append(f"  {who} relid {_int(rec.last.get('relid'))} dynmem: "
                         f"{_plural(_int(d.get('hot_adds')), 'hot-add')}, "
                         f"{_plural(_int(d.get('balloons')), 'balloon')}, "
                         f"{_plural(_int(d.get('corrupt_pages')), 'corrupt page')}; assigned "
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
        return sum(_int(_device(r.last).get("corrupt_pages")) for r in self.bursts.values())

    def mismatches(self) -> int:
        return sum(_int(_device(r.last).get("mismatches")) for r in self.streams.values())

