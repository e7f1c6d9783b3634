"""The demo's memory view without processes: the sparkline history, the
memory table and the summary, from status objects (hostile values included)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from partitions.cli.demo import Demo, DemoOptions, StreamRecord
from partitions.cli.views import HISTORY_CELLS, SPARK, MemoryHistory, memory_table

MiB = 1 << 20


def part(name: str, assigned: Any, pid: Any = 100, maximum: Any = 1024 * MiB,
         **dm: Any) -> dict[str, Any]:
    chans = [{"class": "dynmem", "end": "vsc", "relid": 2, "state": "open",
              "device": {"state": "ready", **dm}}] if dm else []
    return {"name": name, "role": "child", "pid": pid, "state": "running",
            "memory": {"assigned_bytes": assigned, "guest_visible_bytes": assigned,
                       "demand_bytes": 10 * MiB, "maximum_bytes": maximum,
                       "startup_bytes": 256 * MiB, "dynamic": True},
            "channels": chans}


def render(renderable: Any) -> str:
    c = Console(width=80, record=True, color_system=None, file=io.StringIO())
    c.print(renderable)
    return c.export_text()


def test_sparkline_levels_gaps_and_window() -> None:
    h = MemoryHistory(t0=0.0, span_s=10.0, cells=5)  # 2 s per cell
    for t, a in ((0.1, 128 * MiB), (1.0, 1024 * MiB), (2.5, 64 * MiB), (6.5, 512 * MiB)):
        h.update({"partitions": [part("c", a)]}, t)
    # cells -1..3, oldest first: the most in each (1 GiB in cell 0), none in cells -1 and 2
    assert h.sparkline("c", 1024 * MiB, 6.5) == f" {SPARK[-1]}{SPARK[0]} {SPARK[3]}"
    assert h.seen[("c", 100)] == (64 * MiB, 1024 * MiB)
    # 20 s later the old cells have scrolled out
    h.update({"partitions": [part("c", 256 * MiB)]}, 26.5)
    assert h.sparkline("c", 1024 * MiB, 26.5) == f"    {SPARK[1]}"
    assert h.sparkline("nobody", 0, 26.5) == " " * 5


def test_hostile_values_do_not_break_the_table() -> None:
    h = MemoryHistory(t0=0.0)
    st = {"partitions": [part("a\x1b[31m", "lots", pid="x", maximum=None),
                         part("b", 640 * MiB, hot_adds="2", balloons=3),
                         {"name": 5, "memory": [], "channels": "no"}]}
    h.update(st, 1.0)
    text = render(memory_table(st, h, 1.0))
    assert "\x1b" not in text
    assert "640MiB" in text and "0/3" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    assert len(h.sparkline("b", 0, 1.0)) == HISTORY_CELLS


def test_a_long_name_keeps_its_sparkline() -> None:
    name = "child-with-a-long-name-0123456"  # (names may have up to 32 characters)
    h = MemoryHistory(t0=0.0, cells=5)
    h.update({"partitions": [part(name, 512 * MiB)]}, 1.0)
    text = render(memory_table({"partitions": [part(name, 512 * MiB)]}, h, 1.0))
    assert any(c in text for c in SPARK)


def test_demo_render_and_memory_summary() -> None:
    d = Demo(None, None, DemoOptions(3, 1024, 8), [],  # type: ignore[arg-type]
             Console(width=80, file=io.StringIO()))
    st = {"partitions": [part("child1", 256 * MiB, hot_adds=0, balloons=0, corrupt_pages=0)]}
    d.status = st
    d.memory.update(st, d.t0 + 0.1)
    c = st["partitions"][0]["channels"][0]
    d.bursts[("child1", 100)] = StreamRecord("child1", 100, d.t0, last=c, startup=256 * MiB)
    st2 = {"partitions": [part("child1", 640 * MiB, hot_adds=1, balloons=2, corrupt_pages=0)]}
    d.status = st2
    d.memory.update(st2, d.t0 + 3.0)
    d.bursts[("child1", 100)].last = st2["partitions"][0]["channels"][0]
    text = render(d.render())
    assert "Assigned, last 60 s" in text and "bursts (to 480 MiB)" in text
    assert d.memory_summary_lines() == [
        "  child1 relid 2 dynmem: 1 hot-add, 2 balloons, 0 corrupt pages; assigned 256MiB "
        "to 640MiB (startup 256MiB)"]
    assert d.corrupt_pages() == 0
    assert d.progress_line().endswith(" assigned: child1 640MiB")
