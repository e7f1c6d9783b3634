"""The disks in the demo and in ``viridian status`` without processes: rates
from counter deltas, the per-disk record (baseline, resets, bench results),
the child's log tail, the tables, the progress item and the summary, and
the demo's bench scheduling against a fake control connection (hostile
values included)."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from partitions.cli.demo import (
    DISK_ANSWER_TIMEOUT_S,
    DISK_OPS_START,
    IDE_GRACE_S,
    Demo,
    DemoOptions,
    LogTail,
)
from partitions.cli.format import fmt_us, short_path
from partitions.cli.views import (
    DISK_OPS_MAX,
    DISK_OPS_MIN,
    DiskRates,
    DiskRecord,
    demo_disks_table,
    disk_comparison,
    disk_counters,
    disk_progress,
    disk_summary_line,
    disk_tables,
)

GiB = 1 << 30


def disk(bus: str = "scsi", reads: Any = 0, writes: Any = 0, traps: Any = None,
         path: Any = "/data/viridian/demo/child1-disk0.img", **extra: Any) -> dict[str, Any]:
    d = {"bus": bus, "path": path, "size_bytes": GiB, "read_ops": reads, "write_ops": writes,
         "read_bytes": reads * 4096 if isinstance(reads, int) else 0,
         "write_bytes": writes * 4096 if isinstance(writes, int) else 0,
         "flushes": 0, "errors": 0, **extra}
    if bus == "ide":
        d["traps"] = traps if traps is not None else 14 * reads
        d["traps_forwarded"] = d["traps"]
    return d


def child(name: str, disks: Any, pid: Any = 100, chans: Any = None,
          state: str = "running") -> dict[str, Any]:
    return {"name": name, "role": "child", "pid": pid, "state": state, "uptime_s": 5.0,
            "memory": {"assigned_bytes": 256 << 20},
            "channels": chans if chans is not None else [
                {"class": "echo", "end": "vsc", "relid": 1, "state": "open", "device": {}}],
            "disks": disks}


def status(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"partitions": [{"name": "root", "role": "root", "pid": 99, "state": "running",
                            "channels": [], "disks": []}, *parts]}


def render(renderable: Any) -> str:
    c = Console(width=80, record=True, color_system=None, file=io.StringIO())
    c.print(renderable)
    return c.export_text()


# -- formatting helpers -------------------------------------------------------------------------


def test_short_path() -> None:
    home = os.path.expanduser("~")
    # whole trailing components that fit, behind …/
    assert short_path(f"{home}/.local/share/viridian/demo/child1-disk0.img") \
        == "…/demo/child1-disk0.img"
    assert short_path("/srv/images/share/viridian/demo/child1-disk0.img", 40) \
        == "…/share/viridian/demo/child1-disk0.img"
    assert short_path("/a/b/c.img") == "/a/b/c.img"
    assert short_path("/very/long/folder/name/that/goes/on/disk.img", 20) == "…/goes/on/disk.img"
    # a file name longer than the limit: its end
    s = short_path("/x/" + "n" * 50 + ".img", 12)
    assert len(s) == 12 and s.startswith("…") and s.endswith("nnn.img")
    # hostile: control characters go, the result stays short
    s = short_path("/tmp/\x1b[31mred\x07.img", 28)
    assert "\x1b" not in s and "\x07" not in s
    assert short_path(12345) == "12345"


def test_short_path_home() -> None:
    home = os.path.expanduser("~")
    if home in ("", "/"):
        pytest.skip("no home folder")
    assert short_path(f"{home}/d.img") == "~/d.img"
    assert short_path(f"{home}/.local/share/viridian/demo/child1-disk0.img", 60) \
        == "~/.local/share/viridian/demo/child1-disk0.img"
    assert not short_path(f"{home}x/d.img", 200).startswith("~")  # not under home


def test_fmt_us() -> None:
    assert fmt_us(33.2) == "33µs"
    assert fmt_us(999.4) == "999µs"
    assert fmt_us(1480.0) == "1.5ms"
    assert fmt_us(15_000.0) == "15ms"
    assert fmt_us(1_500_000.0) == "1.5s"
    assert fmt_us(None) == "-" and fmt_us(-1.0) == "-"


def test_disk_counters_are_type_checked() -> None:
    c = disk_counters({"read_ops": "7", "write_ops": True, "read_bytes": -5, "traps": 3.5,
                       "errors": 2})
    assert c == {"read_ops": 0, "write_ops": 0, "read_bytes": 0, "write_bytes": 0, "traps": 0,
                 "flushes": 0, "errors": 2}


# -- rates and records ---------------------------------------------------------------------------


def test_rates_from_counter_deltas_and_resets() -> None:
    r = DiskRates(window_s=2.0)
    key = ("child2", 100, 0)
    r.update(status(child("child2", [disk("ide", 0, traps=1)])), 0.0)
    assert r.rate(key) is None  # one sample
    r.update(status(child("child2", [disk("ide", 10, traps=141)])), 0.1)
    assert r.rate(key) is None  # too close together
    r.update(status(child("child2", [disk("ide", 100, 20, traps=1401)])), 1.0)
    got = r.rate(key)
    assert got == {"reads": 100.0, "writes": 20.0, "bytes": 120 * 4096.0, "traps": 1400.0}
    # the window slides: the oldest sample goes once a newer one is older than 2 s
    r.update(status(child("child2", [disk("ide", 300, 20, traps=4201)])), 3.0)
    got = r.rate(key)
    assert got is not None and got["reads"] == pytest.approx(200 / 2.0)
    # counters went back (a new device worker): start again
    r.update(status(child("child2", [disk("ide", 5, traps=70)])), 3.5)
    assert r.rate(key) is None
    # a partition without disks, or gone: forgotten
    r.update(status(child("child2", [])), 4.0)
    assert r.rate(key) is None and not r._hist


def test_record_baseline_reset_and_benches() -> None:
    rec = DiskRecord("child2", 100, 0, "ide", "/x.img", GiB,
                     first=disk_counters(disk("ide", 0, traps=1)), next_ops=32)
    rec.observe(disk_counters(disk("ide", 32, traps=449)))
    assert rec.ops == 32 and rec.total("traps") == 448  # from the baseline on
    rec.observe(disk_counters(disk("ide", 10, traps=140)))  # reset: a new worker
    assert rec.ops == 42 and rec.total("traps") == 588
    assert rec.total("read_bytes") == 42 * 4096
    # bench results size the next bench to about DISK_BUDGET_S (0.08 s), within bounds
    assert rec.add_bench({"ops": 32, "seconds": 0.16, "ops_per_s": 200.0, "p50_us": 4000.0})
    assert rec.next_ops == 16 and rec.ops_benched == 32
    assert rec.add_bench({"ops": 16, "seconds": 0.0001, "ops_per_s": 160000.0, "p50_us": 6.0})
    assert rec.next_ops == 64  # at most 4 times the last
    assert rec.add_bench({"ops": 8, "seconds": 10.0, "ops_per_s": 0.8, "p50_us": 1e6})
    assert rec.next_ops == DISK_OPS_MIN
    big = DiskRecord("c", 1, 0, "scsi", "", GiB, first={}, next_ops=2048)
    assert big.add_bench({"ops": 2048, "seconds": 0.001, "ops_per_s": 2e6, "p50_us": 1.0})
    assert big.next_ops == DISK_OPS_MAX
    assert rec.bench_count == 3 and rec.bench_rate() == (200.0, 4000.0)  # medians
    # malformed results are refused and change nothing
    for bad in ({"ops": "32", "seconds": 0.1, "ops_per_s": 1.0, "p50_us": 1.0},
                {"ops": 32, "seconds": 0, "ops_per_s": 1.0, "p50_us": 1.0},
                {"ops": True, "seconds": 0.1, "ops_per_s": 1.0, "p50_us": 1.0},
                {"ops": 32, "seconds": 0.1, "ops_per_s": None, "p50_us": 1.0},
                {"ops": 1 << 40, "seconds": 0.1, "ops_per_s": 1.0, "p50_us": 1.0}):
        assert not rec.add_bench(bad)
    assert rec.bench_count == 3 and rec.ops_benched == 56


# -- the child's log ----------------------------------------------------------------------------


def test_log_tail_reads_new_matching_records(tmp_path: Path) -> None:
    log = tmp_path / "child1.jsonl"
    old = {"event": "disk bench", "tag": "demo", "pid": 1}
    log.write_text(json.dumps(old) + "\n")
    tail = LogTail(log, ("disk bench", "disk workload failed"))
    assert tail.read() == []  # what was there before the tail: not ours
    new = {"event": "disk bench", "tag": "demo", "pid": 2, "ops": 5}
    with log.open("a") as f:
        f.write(json.dumps({"event": "other"}) + "\n")
        f.write(json.dumps(new) + "\n")
        f.write('{"event": "disk bench", "tag": "de')  # half a line: later
    assert tail.read() == [new]
    with log.open("a") as f:
        f.write('mo", "pid": 3}\n')
        f.write('"disk bench" but not JSON\n')
        f.write('["disk bench"]\n')  # JSON, not an object
        f.write('{"event": ["disk bench"]}\n')  # an event that is no string (unhashable)
        f.write('{"event": "disk bench", "pad": "' + "x" * (LogTail.MAX_LINE + 10) + '"}\n')
        f.write(json.dumps({"event": "disk workload failed", "pid": 3}) + "\n")
    assert tail.read() == [{"event": "disk bench", "tag": "demo", "pid": 3},
                           {"event": "disk workload failed", "pid": 3}]
    assert tail.read() == []
    missing = LogTail(tmp_path / "nope.jsonl", ("disk bench",))
    assert missing.read() == [] and missing.offset == 0


# -- tables, progress, summary -------------------------------------------------------------------


def two_disks(n: int = 100) -> dict[str, Any]:
    return status(child("child1", [disk("scsi", 10 * n)], pid=101),
                  child("child2", [disk("ide", n, path="/tmp/x/child2-disk0.img")], pid=102))


def records_for(st: dict[str, Any]) -> dict[tuple[str, int, int], DiskRecord]:
    recs = {}
    for p in st["partitions"]:
        for i, d in enumerate(p["disks"]):
            recs[(p["name"], p["pid"], i)] = DiskRecord(
                p["name"], p["pid"], i, d["bus"], d["path"], d["size_bytes"],
                first=disk_counters({}))
            recs[(p["name"], p["pid"], i)].observe(disk_counters(d))
    return recs


def test_demo_disks_table_side_by_side() -> None:
    rates = DiskRates()
    rates.update(two_disks(0), 0.0)
    st = two_disks(100)
    rates.update(st, 1.0)
    recs = records_for(st)
    recs[("child1", 101, 0)].add_bench({"ops": 256, "seconds": 0.02, "ops_per_s": 12800.0,
                                        "p50_us": 35.0})
    recs[("child2", 102, 0)].add_bench({"ops": 32, "seconds": 0.06, "ops_per_s": 533.0,
                                        "p50_us": 1480.0})
    text = render(demo_disks_table(st, rates, recs))
    lines = [ln.rstrip() for ln in text.splitlines()]
    assert all(len(ln) <= 80 for ln in lines), text
    assert lines[0].split() == ["Disk", "Bus", "Read/s", "Write/s", "MB/s", "Traps/s",
                                "Bench/s", "p50", "Ops"]
    assert lines[2].split() == ["child1", "disk0", "scsi", "synthetic", "1k", "0", "4.1", "-",
                                "12.8k", "35µs", "1k"], text
    assert lines[3].split() == ["child2", "disk0", "ide", "emulated", "100", "0", "0.4",
                                "1.4k", "533", "1.5ms", "100"], text
    assert disk_comparison(recs.values()) == \
        "4 KiB random reads: scsi 12.8k ops/s, ide-dma 533 ops/s (24x)"
    assert disk_comparison([recs[("child1", 101, 0)]]) is None
    item = disk_progress(st, rates)
    assert item == ("disks: child1 scsi 1k read/s 0 write/s 4.1 MB/s, "
                    "child2 ide 100 read/s 0 write/s 0.4 MB/s 1.4k traps/s")
    assert disk_progress(status(child("c", [])), rates) is None
    # before two samples: a dash per disk
    assert disk_progress(two_disks(1), DiskRates()) == "disks: child1 scsi -, child2 ide -"


def test_summary_lines() -> None:
    recs = records_for(two_disks(100))
    r1, r2 = recs[("child1", 101, 0)], recs[("child2", 102, 0)]
    r2.add_bench({"ops": 32, "seconds": 0.06, "ops_per_s": 533.0, "p50_us": 1480.0})
    r2.failures = 1
    assert disk_summary_line(r1, "child1") == (
        "  child1 disk0 scsi, synthetic: 1,000 ops (1,000 reads, 0 writes), 3.9MiB read, "
        "0B written, no traps")
    assert disk_summary_line(r2, "child2") == (
        "  child2 disk0 ide, emulated: 100 ops (100 reads, 0 writes), 400KiB read, 0B written, "
        "1,400 traps (14.0 per op); 1 bench, median 533 ops/s, p50 1.5ms; 1 failed bench")


def test_status_disk_tables_fit_and_resist_hostile_values() -> None:
    home = os.path.expanduser("~")
    st = status(child("child1", [disk("scsi", 12345, 678, path=f"{home}/.local/share/viridian/"
                                      "default/child1-disk0.img")]),
                child("child2", [disk("ide", 3, traps=1000, errors=2)]),
                child("evil\x1b[31m", [disk("ide\x1b]0;x\x07", "lots", path="\x1b[2J/x.img",
                                            size_bytes="big"), "not a disk", 5]),
                child("none", "nope"),
                child("huge", [disk("ide", 987_654_321, 123_456_789, traps=10**12,
                                    errors=99999, size_bytes=999 * GiB,
                                    path="/" + "/".join(["folder"] * 30) + "/x.img")]))
    tables = disk_tables(st)
    assert len(tables) == 4  # the root and "none" have no disks
    text = "\n".join(render(t) for t in tables)
    assert "\x1b" not in text and "\x07" not in text
    lines = [ln.rstrip() for ln in text.splitlines()]
    assert all(len(ln) <= 80 for ln in lines), text
    assert "  child1: 1 disk" in lines and "  child2: 1 disk" in lines
    row = next(ln for ln in lines if ln.lstrip().startswith("scsi"))
    assert row.split()[:6] == ["scsi", "1.0GiB", "12.3k/678", "48MiB/2.6MiB", "-", "0"], row
    assert row.split()[6].endswith("/child1-disk0.img")
    row = next(ln for ln in lines if ln.lstrip().startswith("ide"))
    assert row.split()[:6] == ["ide", "1.0GiB", "3/0", "12KiB/0B", "1k", "2"], row
    assert any(ln.lstrip().startswith("?") for ln in lines)  # the hostile bus
    row = next(ln for ln in lines if "988M/123M" in ln)  # the widest values: whole
    assert row.split()[1:] == ["999GiB", "988M/123M", "3.7TiB/471GiB", "1T", "100k",
                               "…/folder/folder/folder/x.img"], row


# -- the demo's benches ---------------------------------------------------------------------------


class FakeCtl:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def request(self, op: str, **kw: Any) -> dict[str, Any]:
        self.calls.append({"op": op, **kw})
        return {"ok": True}


def storvsc(ready: bool = True, state: str = "open") -> dict[str, Any]:
    return {"class": "storvsc", "end": "vsc", "relid": 3, "state": state,
            "device": {"ready": ready}}


def make_demo(tmp_path: Path | None) -> tuple[Demo, FakeCtl]:
    d = Demo(None, None, DemoOptions(3, 1024, 8), [],  # type: ignore[arg-type]
             Console(width=80, file=io.StringIO()), logs_dir=tmp_path)
    ctl = FakeCtl()
    d._ctl = ctl  # type: ignore[assignment]
    return d, ctl


def set_status(d: Demo, st: dict[str, Any]) -> None:
    d.status = st
    d.disk_rates.update(st, time.monotonic())
    # what _poll does with it, without a control connection
    for p in st["partitions"]:
        key = (p["name"], p["pid"])
        for i, dd in enumerate(p.get("disks") or []):
            if (*key, i) not in d.disks and p["role"] == "child":
                d.disks[(*key, i)] = DiskRecord(
                    key[0], key[1], i, dd["bus"], dd["path"], dd["size_bytes"],
                    first=disk_counters(dd), next_ops=DISK_OPS_START[dd["bus"]])


def log_result(tmp_path: Path, name: str, **rec: Any) -> None:
    with (tmp_path / f"{name}.jsonl").open("a") as f:
        f.write(json.dumps({"t": time.time(), "partition": name, **rec}) + "\n")


def test_demo_benches_one_at_a_time_once_ready(tmp_path: Path) -> None:
    d, ctl = make_demo(tmp_path)
    echo = {"class": "echo", "end": "vsc", "relid": 1, "state": "open", "device": {}}
    st = status(child("child1", [disk("scsi")], pid=101, chans=[echo, storvsc(ready=False)]),
                child("child2", [disk("ide", traps=1)], pid=102, chans=[echo]))
    set_status(d, st)
    d._run_disks()
    assert ctl.calls == []  # storvsc not ready; ide within its grace period
    st["partitions"][1]["channels"] = [echo, storvsc()]
    d._run_disks()
    assert [c["name"] for c in ctl.calls] == ["child1"]
    assert ctl.calls[0] == {"op": "workload", "name": "child1", "device": "disk",
                            "action": "bench", "args": {"path": "scsi", "block": 4096,
                                                        "ops": 256, "qd": 1, "write": False,
                                                        "tag": "demo"}}
    # the IDE worker gets its grace period after the channels opened
    d.disk_work[("child2", 102)].open_since = time.monotonic() - IDE_GRACE_S
    d._run_disks()
    assert [c["name"] for c in ctl.calls] == ["child1", "child2"]
    assert ctl.calls[1]["args"]["path"] == "ide-dma" and ctl.calls[1]["args"]["ops"] == 32
    # one at a time per child: nothing more until the result is in its log
    for w in d.disk_work.values():
        w.sent -= 2.0  # (as if 2 s ago; a pending bench still waits for its answer)
    d._run_disks()
    assert len(ctl.calls) == 2
    assert not d._settled()  # benches in flight
    log_result(tmp_path, "child1", pid=999, event="disk bench", tag="demo", path="scsi",
               ops=256, seconds=0.01, ops_per_s=25600.0, p50_us=30.0)  # another process
    log_result(tmp_path, "child1", pid=101, event="disk bench", tag="other", path="scsi",
               ops=256, seconds=0.01, ops_per_s=25600.0, p50_us=30.0)  # not the demo's
    d._run_disks()
    assert len(ctl.calls) == 2 and d.disk_work[("child1", 101)].pending is not None
    log_result(tmp_path, "child1", pid=101, event="disk bench", tag="demo", path="scsi",
               ops=256, seconds=0.01, ops_per_s=25600.0, p50_us=30.0)
    log_result(tmp_path, "child2", pid=102, event="disk workload failed", action="bench",
               error="IdeError: device stays busy\x1b[2J")
    d._run_disks()  # both answered; sent again (their last send was long ago)
    rec1, rec2 = d.disks[("child1", 101, 0)], d.disks[("child2", 102, 0)]
    assert rec1.bench_count == 1 and rec1.ops_benched == 256
    assert rec2.failures == 1 and rec2.bench_count == 0
    assert [c["name"] for c in ctl.calls] == ["child1", "child2", "child1", "child2"]
    assert ctl.calls[2]["args"]["ops"] == 1024  # 10 ms for 256: 4 times as many next time
    # a bench the child never answers counts as lost after DISK_ANSWER_TIMEOUT_S
    w1 = d.disk_work[("child1", 101)]
    assert w1.pending is not None
    w1.sent -= DISK_ANSWER_TIMEOUT_S + 0.1
    d._run_disks()
    assert [c["name"] for c in ctl.calls][-1] == "child1" and len(ctl.calls) == 5
    said = d.console.file.getvalue()
    assert "child2: the ide-dma bench failed: IdeError: device stays busy" in said
    assert "\x1b" not in said
    # settled only once the root counted the ops the child reported
    for w in d.disk_work.values():
        w.pending = None
    assert not d._settled()
    st["partitions"][1]["disks"] = [disk("scsi", 256)]
    rec1.observe(disk_counters(st["partitions"][1]["disks"][0]))
    assert d._settled()


def test_demo_without_logs_and_channels_closing() -> None:
    d, ctl = make_demo(None)
    echo = {"class": "echo", "end": "vsc", "relid": 1, "state": "open", "device": {}}
    st = status(child("child2", [disk("ide", traps=1)], pid=102, chans=[echo]))
    set_status(d, st)
    d._run_disks()
    w = d.disk_work[("child2", 102)]
    assert ctl.calls == [] and w.open_since is not None and w.tail is None
    w.open_since -= IDE_GRACE_S
    d._run_disks()
    assert len(ctl.calls) == 1 and w.pending is None  # no log to wait on: every second
    # a closed channel (the root restarting): the grace period starts again
    st["partitions"][1]["channels"] = [{**echo, "state": "closed"}]
    w.sent -= 5.0
    d._run_disks()
    assert len(ctl.calls) == 1 and w.open_since is None
    # an "attached" flag in the disk's entry, when there is one, is followed at once
    st["partitions"][1]["channels"] = [echo]
    st["partitions"][1]["disks"] = [disk("ide", traps=1, attached=True)]
    d._run_disks()
    assert len(ctl.calls) == 2
    # stopped children and processes without a pid get nothing
    st["partitions"][1]["state"] = "stopped"
    w.sent -= 5.0
    d._run_disks()
    assert len(ctl.calls) == 2


def test_demo_render_shows_the_disks_panel() -> None:
    d, _ = make_demo(None)
    st = two_disks(0)
    set_status(d, st)
    text = render(d.render())
    assert "Disk" in text and "scsi synthetic" in text and "ide emulated" in text
    assert "Each child reads random 4 KiB blocks" in text
    # nothing wider than 80 columns (rendered wider, so a long line shows instead of wrapping)
    wide = Console(width=200, record=True, color_system=None, file=io.StringIO())
    wide.print(d.render())
    body = wide.export_text().splitlines()[1:]  # (the header is the demo's, not the disks')
    assert all(len(ln.rstrip()) <= 80 for ln in body), text
    d.disks[("child1", 101, 0)].add_bench({"ops": 256, "seconds": 0.02, "ops_per_s": 12800.0,
                                           "p50_us": 35.0})
    d.disks[("child2", 102, 0)].add_bench({"ops": 32, "seconds": 0.06, "ops_per_s": 533.0,
                                           "p50_us": 1480.0})
    assert "scsi 12.8k ops/s, ide-dma 533 ops/s (24x)" in render(d.render())
    wide.print(d.render())
    assert all(len(ln.rstrip()) <= 80 for ln in wide.export_text().splitlines()[1:])
    lines = d.disk_summary_lines()
    assert lines[0].startswith("  child1 disk0 scsi, synthetic: 0 ops")
    assert lines[1].startswith("  child2 disk0 ide, emulated: 0 ops")
    assert lines[2] == ("  4 KiB random reads: scsi 12.8k ops/s, ide-dma 533 ops/s (24x), "
                        "as each child timed them")
    assert "disks: child1 scsi" in d.progress_line()


def test_a_nameless_child_keeps_its_disk_record_between_poll_and_table() -> None:
    """The demo's records and the views key a partition the same way, also
    one without a name (a hand-built status; the supervisor names all)."""

    class StatusCtl(FakeCtl):
        def request(self, op: str, **kw: Any) -> dict[str, Any]:
            return {"status": st}

    d, _ = make_demo(None)
    nameless = child("x", [disk("scsi", 5)], pid=101)
    del nameless["name"]
    st = status(nameless)
    d._ctl = StatusCtl()  # type: ignore[assignment]
    assert d._poll()
    assert list(d.disks) == [("?", 101, 0)]
    d.disks[("?", 101, 0)].observe(disk_counters(disk("scsi", 12)))  # 7 reads since
    row = render(demo_disks_table(st, d.disk_rates, d.disks)).splitlines()[2].split()
    assert row[:2] == ["?", "disk0"] and row[-1] == "7"
