"""Storage two ways (issue 7): the emulated IDE disk behind traps against the
synthetic SCSI disk over VMBus, and the root's own direct read as the ceiling.

One cluster for the module: a root and one child, ``child1``, that has BOTH an
``ide`` disk and a ``scsi`` disk, and both name the same 64 MiB image file.
The benchmark writes the image with random bytes (no holes) and reads it once
before the cluster starts, so it is in the page cache (residency checked with
mincore(2) and shown in the report).  Rows, each for random reads and random
writes of 512 B, 4 KiB and 64 KiB:

* ``ide-pio`` (QD 1): READ/WRITE SECTORS through the 16-bit data port; every
  port access traps (child -> supervisor -> the root's IDE device worker and
  back), 8 + 257 per sector.
* ``ide-dma`` (QD 1): READ/WRITE DMA over a PRD table in the child's memory;
  14 trapped accesses per command, the worker moves the data straight between
  the image and the child's granted pages.
* ``scsi`` (QD 1 and QD 32): storvsc's EXECUTE_SRB as GPA-direct packets over
  the child's SCSI channel; storvsp in the root reads/writes the pool pages in
  place.  No trap, no supervisor.
* ``host`` (QD 1): the benchmark process itself (it stands for the root: a
  process on the host with the image open) with ``os.preadv`` / ``os.pwritev``
  into a preallocated bytearray, same file, same block sizes, the same random
  offsets (the child's generator: ``random.Random(seed).randrange(blocks)``
  per op) and the same loop shape as the child's ``disk bench`` (draw the
  offset, ``perf_counter``, the I/O, ``perf_counter``), so only the path
  differs.

Why the comparison is fair: every guest row runs in the same child process,
against the same image file, in the same page cache, with the same seed (the
same offsets), one workload at a time, driven by the same ``disk bench`` loop
(partitions/devices/storage/guest.py: control op ``workload``, device ``disk``,
action ``bench``; the child logs a ``disk bench`` event with ops/s, p50/p99
and the traps it took).  The only thing that changes between the guest rows is
the way to the disk: traps through the supervisor to a root worker process,
or ring packets to the root's VSP.  Both use the project's best transport
(shared-memory slots/rings, eventfd doorbells, spin-then-block waits).  The
host row is the same loop without any partition boundary.

Per row ``extra_info``: ``path``, ``block_bytes``, ``queue_depth``, ``op``,
``ops_per_s``, ``p50_us``, ``p99_us`` (the median round by ops/s; the other
rounds' ops/s in ``round_ops_per_s``), and per operation over all rounds:
``traps`` (the child's log), ``supervisor_messages`` = (hypercalls of the child
and of the root, ``viridian status``) + the supervisor's forwarded intercepts
(``traps_forwarded`` of the ide disk), and ``context_switches`` (voluntary +
involuntary, summed over every thread of the child, the supervisor, the root
and the IDE worker, read from /proc/PID/task/TID/status before and after; the
host row counts the benchmark process), plus ``cpu_us_per_op`` (CPU time of
those processes, /proc/PID/task/TID/schedstat; a spinning waiter counts, so at
QD 32 child and root each show ~100 % of a CPU) and per-process splits in
``per_op``.  The disk counters of ``viridian status`` are checked against the
ops issued at the end.

Noise (a shared 2-CPU machine): in full mode each round first waits up to
0.5 s for a 30 ms window in which the machine is idle; every round records how
much CPU other processes and the hypervisor took (``machine``, from
benchmarks.harness.CpuWatch); the report lists the rows a busy machine hit.

Waiting: the workload is asynchronous (the control op returns at once); the
benchmark polls the child's log (RUN/logs/child1.jsonl) for its tagged
``disk bench`` event, with a deadline.  Counters are read right before the
request and right after the event.

Targets (reported in quick mode, asserted in full mode): at 4 KiB, QD 1,
storvsc >= 10x emulated PIO and >= 2x emulated DMA in ops/s (reads and
writes); storvsc at QD 32 >= 25 % of the host's direct 4 KiB read rate.

PIO is slow (~2064 traps per 4 KiB op): its op counts are small.  The whole
module takes 35-70 s on the 2-CPU build machine, depending on its load (quick
mode: ~15 s, most of it two 64 KiB PIO ops).  At the end: ``viridian
down``, a leak check (processes, shm, mq, sockets, cgroups), the image and the
run directory removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from . import report
from .bench_cluster import _assert_clean, _cfg, _Cli, _kill_and_sweep
from .harness import CpuWatch, size_label

MiB = 1 << 20
IMAGE_BYTES = 64 * MiB
CHILD = "child1"
SEED = 1
BLOCKS = (512, 4096, 65536)
#: (path, queue depth) in table order
PATHS = report.STORAGE_PATHS
OPS = ("read", "write")

# ops per round (full mode), per round in quick mode, rounds (full mode)
_FULL = {
    "ide-pio": {512: 20, 4096: 10, 65536: 3},
    "ide-dma": {512: 300, 4096: 300, 65536: 150},
    "scsi/1": {512: 3000, 4096: 3000, 65536: 1500},
    "scsi/32": {512: 9600, 4096: 9600, 65536: 3200},
    "host": {512: 150000, 4096: 150000, 65536: 50000},
}
_QUICK = {
    "ide-pio": {512: 2, 4096: 1, 65536: 1},
    "ide-dma": {512: 20, 4096: 20, 65536: 10},
    "scsi/1": {512: 200, 4096: 200, 65536: 100},
    "scsi/32": {512: 320, 4096: 320, 65536: 128},
    "host": {512: 2000, 4096: 2000, 65536: 500},
}
ROUNDS_FULL = 3  # PIO: 1
QUIET_WINDOW_S = 0.03
QUIET_BUDGET_S = 0.5  # per round, full mode: at most this long waiting for a quiet machine


def _key(path: str, qd: int) -> str:
    return path if path in ("ide-pio", "ide-dma", "host") else f"{path}/{qd}"


# ----------------------------------------------------------------------------
# /proc and the page cache


def _ctx_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of ``pid``
    (/proc/PID/status alone holds only the main thread's)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def _cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` in ns (/proc/PID/task/TID/schedstat)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        with contextlib.suppress(OSError, ValueError), \
                open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def _resident(path: Path) -> float | None:
    """The share of ``path``'s pages in the page cache (mincore(2)), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        size = path.stat().st_size
        pages = -(-size // 4096)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = ctypes.create_string_buffer(pages)
                if libc.mincore(addr, size, vec) != 0:
                    return None
                return sum(b & 1 for b in vec.raw[:pages]) / pages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return None


def _make_image(path: Path) -> float | None:
    """Random bytes (no holes), then read once: in the page cache."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for off in range(0, IMAGE_BYTES, MiB):
            os.pwrite(fd, os.urandom(MiB), off)
        buf = bytearray(MiB)
        for off in range(0, IMAGE_BYTES, MiB):
            os.preadv(fd, [buf], off)
    finally:
        os.close(fd)
    return _resident(path)


# ----------------------------------------------------------------------------
# The cluster


class _ChildLog:
    """Tails the child's JSON-lines log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.off = 0
        self.partial = b""

    def new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.off)
                data = f.read()
        except FileNotFoundError:
            return []
        self.off += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out = []
        for ln in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(ln))
        return out

    def skip(self) -> None:
        self.new()

    def wait(self, pred: Any, timeout: float, what: str) -> dict[str, Any]:
        """The first new event ``pred`` accepts; polls with a deadline."""
        end = time.monotonic() + timeout
        while True:
            for e in self.new():
                if e.get("event") == "disk workload failed":
                    raise RuntimeError(f"{what}: {e.get('error')}")
                if pred(e):
                    return e
            if time.monotonic() > end:
                raise AssertionError(f"{what}: nothing in {self.path} within {timeout:.0f} s")
            time.sleep(0.002)


class StorageCluster:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.tmp = Path(tempfile.mkdtemp(prefix="virs-"))
        self.cli = _Cli(self.tmp / "run")
        self.cli.base.mkdir()
        self.image = self.tmp / "disk.img"
        self.name = f"s{uuid.uuid4().hex[:6]}"
        self.pids: dict[str, int] = {}
        self.client: Any = None
        self.log: _ChildLog | None = None
        self.resident: float | None = None
        self.issued = {"ide": {"read": 0, "write": 0}, "scsi": {"read": 0, "write": 0}}
        self.rows: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self.quiet_budget = 0.0 if quick else QUIET_BUDGET_S

    # -- set-up ---------------------------------------------------------------------------
    def up(self) -> None:
        from hv.control import ControlClient
        from hv.rundir import RunDir

        self.resident = _make_image(self.image)
        cfg = self.tmp / "storage.toml"
        disk = f'path = "{self.image}", size = {IMAGE_BYTES}'
        cfg.write_text(
            '[[partition]]\nname = "root"\nrole = "root"\n'
            'memory = { startup = "256M", minimum = "128M", maximum = "1G" }\n\n'
            f'[[partition]]\nname = "{CHILD}"\nrole = "child"\n'
            'memory = { startup = "256M", minimum = "128M", maximum = "1G", dynamic = false }\n'
            f'disks = [ {{ bus = "ide", {disk} }}, {{ bus = "scsi", {disk} }} ]\n')
        self.cli("up", "--detach", "--name", self.name, "--config", str(cfg))
        rd = RunDir(self.name, self.cli.base)
        self.client = ControlClient(rd.control_socket)
        self.client.timeout = 30.0
        self.client.__enter__()
        self.log = _ChildLog(rd.log_file(CHILD))
        seen: set[str] = set()
        self.log.wait(lambda e: (seen.add(str(e.get("event"))) or
                                 {"storvsc ready", "IDE disk attached"} <= seen),
                      30, "the child's disks did not come up")
        st = self.status()
        self.pids["supervisor"] = st["supervisor_pid"]
        for p in st["partitions"]:
            self.pids[p["role"] if p["role"] == "root" else "child"] = p["pid"]
        # Warm-up (not measured): the first op of each path pays for imports and
        # page faults; retried until the root's IDE worker is routed.
        for path, qd, ops in (("ide-pio", 1, 2), ("ide-dma", 1, 50), ("scsi", 1, 500),
                              ("scsi", 32, 640)):
            end = time.monotonic() + 20
            while True:
                try:
                    self.bench(path, 4096, ops, qd, write=False)
                    break
                except RuntimeError:
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.05)
        kids = [c for c in psutil.Process(self.pids["root"]).children()
                if "ide-worker" in " ".join(c.cmdline()) or "ideworker" in " ".join(c.cmdline())]
        assert len(kids) == 1, f"expected one IDE worker under the root, found {kids}"
        self.pids["ide-worker"] = kids[0].pid

    def status(self) -> dict[str, Any]:
        return self.client.request("status")["status"]  # type: ignore[no-any-return]

    def _counters(self, st: dict[str, Any]) -> dict[str, int]:
        parts = {p["name"]: p for p in st["partitions"]}
        child = parts[CHILD]
        ide = next(d for d in child["disks"] if d["bus"] == "ide")
        return {"hc_child": child["hypercalls"], "hc_root": parts["root"]["hypercalls"],
                "traps_forwarded": ide.get("traps_forwarded", 0), "traps": ide.get("traps", 0)}

    def ctx(self) -> dict[str, int]:
        return {name: _ctx_switches(pid) for name, pid in self.pids.items()}

    def cpu(self) -> dict[str, int]:
        return {name: _cpu_ns(pid) for name, pid in self.pids.items()}

    def quiet(self) -> float:
        """Wait (within this row's budget) for a window in which the machine
        does nothing: bursts of other work on the shared machine then hit
        fewer rounds.  Returns the time waited."""
        waited = 0.0
        while waited < self.quiet_budget:
            b0 = CpuWatch.stat()[0]
            time.sleep(QUIET_WINDOW_S)  # a measurement window, not a synchronisation
            if CpuWatch.stat()[0] - b0 <= 1:
                break
            waited += QUIET_WINDOW_S
        return waited

    # -- one workload in the child ---------------------------------------------------------
    def bench(self, path: str, block: int, ops: int, qd: int, write: bool) -> dict[str, Any]:
        assert self.log is not None
        self._seq += 1
        tag = f"{path}-qd{qd}-{'w' if write else 'r'}-{block}-{self._seq}"
        self.log.skip()
        r = self.client.request("workload", name=CHILD, device="disk", action="bench",
                                args={"path": path, "block": block, "ops": ops, "qd": qd,
                                      "write": write, "seed": SEED, "tag": tag})
        assert r.get("ok"), r
        # deadline: generous, from the slowest expected rate (PIO ~2 ops/s at 64 KiB
        # on a busy machine needs ~0.5 s per op)
        budget = 30 + ops * (1.0 if path == "ide-pio" and block > 4096 else
                             0.5 if path == "ide-pio" else 0.02)
        entry = self.log.wait(lambda e: e.get("event") == "disk bench" and e.get("tag") == tag,
                              budget, f"disk bench {tag}")
        bus = "ide" if path.startswith("ide") else "scsi"
        self.issued[bus]["write" if write else "read"] += ops
        return entry

    def measure(self, path: str, block: int, ops: int, qd: int, write: bool) -> dict[str, Any]:
        """One round: counters, the workload, counters."""
        waited = self.quiet()
        before = self._counters(self.status())
        watch = CpuWatch([self.pids["supervisor"]])
        cb, ub = self.ctx(), self.cpu()
        watch.start()
        entry = self.bench(path, block, ops, qd, write)
        machine = watch.stop()
        ca, ua = self.ctx(), self.cpu()
        after = self._counters(self.status())
        return {"entry": entry, "delta": {k: after[k] - before[k] for k in after},
                "ctx": {k: ca[k] - cb[k] for k in ca}, "cpu_ns": {k: ua[k] - ub[k] for k in ua},
                "machine": {**machine, "quiet_wait_s": waited}}

    def host(self, block: int, ops: int, write: bool) -> dict[str, Any]:
        """The ceiling: this process reads/writes the image directly, the child's loop."""
        fd = os.open(self.image, os.O_RDWR | os.O_CLOEXEC)
        try:
            rng = random.Random(SEED)
            blocks = IMAGE_BYTES // block
            buf = [memoryview(bytearray(os.urandom(block) if write else block))]
            lat: list[float] = []
            pc = time.perf_counter
            io = os.pwritev if write else os.preadv
            me = os.getpid()
            waited = self.quiet()
            watch = CpuWatch([])
            watch.start()
            c0, u0 = _ctx_switches(me), _cpu_ns(me)
            t0 = pc()
            for _ in range(ops):
                lba = rng.randrange(blocks) * (block // 512)
                t = pc()
                n = io(fd, buf, lba * 512)
                lat.append(pc() - t)
                assert n == block
            wall = pc() - t0
            c1, u1 = _ctx_switches(me), _cpu_ns(me)
            machine = watch.stop()
        finally:
            os.close(fd)
        lat.sort()
        entry = {"ops": ops, "seconds": wall, "ops_per_s": round(ops / wall, 1),
                 "p50_us": round(statistics.median(lat) * 1e6, 1),
                 "p99_us": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e6, 1),
                 "traps": 0}
        return {"entry": entry, "delta": {"hc_child": 0, "hc_root": 0, "traps_forwarded": 0,
                                          "traps": 0},
                "ctx": {"benchmark": c1 - c0}, "cpu_ns": {"benchmark": u1 - u0},
                "machine": {**machine, "quiet_wait_s": waited}}

    # -- tear-down --------------------------------------------------------------------------
    def check_counters(self, timeout: float = 5.0) -> str | None:
        """The disks' read/write op counters in status equal the ops issued
        (they reach the supervisor through the root's periodic reports)."""
        end = time.monotonic() + timeout
        while True:
            child = next(p for p in self.status()["partitions"] if p["name"] == CHILD)
            got = {d["bus"]: {"read": d["read_ops"], "write": d["write_ops"]}
                   for d in child["disks"]}
            if got == self.issued:
                return None
            if time.monotonic() > end:
                return f"status shows {got}, issued {self.issued}"
            time.sleep(0.05)

    def close(self) -> str:

        problems = ""
        try:
            if self.client is not None:
                with contextlib.suppress(Exception):
                    self.client.__exit__(None, None, None)
            self.cli("down", "--name", self.name, check=False)
            try:
                _assert_clean(self.cli.base, self.name, list(self.pids.values()))
            except AssertionError as e:
                problems = str(e)
            _kill_and_sweep(self.name, self.cli.base)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.tmp.exists():
            problems += f" {self.tmp} not removed"
        return problems.strip()


@pytest.fixture(scope="module")
def storage(pytestconfig: pytest.Config, bench_store: dict[str, Any]) -> Iterator[StorageCluster]:
    cfg = _cfg(pytestconfig)
    c = StorageCluster(cfg.quick)
    st = bench_store.setdefault("storage", {})
    problems = "not started"
    try:
        c.up()
        st.update({"image_bytes": IMAGE_BYTES, "resident": c.resident, "quick": cfg.quick,
                   "rows": c.rows})
        yield c
    finally:
        problems = c.close()
        st["leftovers"] = problems or "none"
    assert not problems, problems


# ----------------------------------------------------------------------------
# The rows


def _ops_rounds(path: str, qd: int, block: int, quick: bool) -> tuple[int, int]:
    table = _QUICK if quick else _FULL
    ops = table[_key(path, qd)][block]
    rounds = 1 if quick or path == "ide-pio" else ROUNDS_FULL
    return ops, rounds


def _summarise(path: str, qd: int, block: int, op: str,
               runs: list[dict[str, Any]]) -> dict[str, Any]:
    entries = [r["entry"] for r in runs]
    mid = sorted(entries, key=lambda e: e["ops_per_s"])[len(entries) // 2]
    n = sum(e["ops"] for e in entries)
    delta = {k: sum(r["delta"][k] for r in runs) for k in runs[0]["delta"]}
    ctx = {k: sum(r["ctx"][k] for r in runs) for k in runs[0]["ctx"]}
    cpu = {k: sum(r["cpu_ns"][k] for r in runs) for k in runs[0]["cpu_ns"]}
    machine = [r["machine"] for r in runs]
    traps = sum(e.get("traps", 0) for e in entries)
    msgs = delta["hc_child"] + delta["hc_root"] + delta["traps_forwarded"]
    return {
        "path": path, "block_bytes": block, "queue_depth": qd, "op": op,
        "ops_per_s": mid["ops_per_s"], "p50_us": mid["p50_us"], "p99_us": mid["p99_us"],
        "traps": traps / n,
        "supervisor_messages": msgs / n,
        "context_switches": sum(ctx.values()) / n,
        "ops": n, "rounds": len(entries),
        "round_ops_per_s": [e["ops_per_s"] for e in entries],
        "seconds": sum(float(e["seconds"]) for e in entries),
        "per_op": {
            "hypercalls_child": delta["hc_child"] / n, "hypercalls_root": delta["hc_root"] / n,
            "traps_forwarded": delta["traps_forwarded"] / n,
            "traps_status": delta["traps"] / n,
            "context_switches_by_process": {k: v / n for k, v in ctx.items()},
            "cpu_us_by_process": {k: v / n / 1e3 for k, v in cpu.items()},
        },
        "cpu_us_per_op": sum(cpu.values()) / n / 1e3,
        # (CpuWatch counts clock ticks: only rounds of 0.2 s or more say anything)
        "machine": {
            "max_foreign_cpu_pct": max((m["foreign_cpu_pct"] for m in machine
                                        if m["wall_s"] >= 0.2), default=None),
            "max_steal_pct": max((m["steal_pct"] for m in machine if m["wall_s"] >= 0.2),
                                 default=None),
            "quiet_wait_s": round(sum(m["quiet_wait_s"] for m in machine), 2),
            "rounds": machine,
        },
        "measured_by": ("the benchmark process: os.pwritev/os.preadv on the image" if
                        path == "host"
                        else "the child's disk bench (partitions/devices/storage/guest.py)"),
    }


_PARAMS = [pytest.param(path, qd, op, block, id=f"{path}-qd{qd}-{op}-{size_label(block)}"
                        .replace(" ", ""))
           for op in OPS for block in BLOCKS for path, qd in PATHS]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("path", "qd", "op", "block"), _PARAMS)
def test_storage_path(benchmark, storage, path, qd, op, block):
    ops, rounds = _ops_rounds(path, qd, block, storage.quick)
    runs: list[dict[str, Any]] = []

    def one() -> None:
        if path == "host":
            runs.append(storage.host(block, ops, op == "write"))
        else:
            runs.append(storage.measure(path, block, ops, qd, op == "write"))

    benchmark.group = f"storage {op} {size_label(block)}"
    benchmark.pedantic(one, rounds=rounds, warmup_rounds=0, iterations=1)
    row = _summarise(path, qd, block, op, runs)
    benchmark.extra_info.update(row)
    storage.rows[report.storage_row_key(path, qd, op, block)] = row
    print(f"\n{path} QD{qd} {op} {size_label(block)}: {row['ops_per_s']:.0f} ops/s, "
          f"p50 {row['p50_us']:.1f} us, p99 {row['p99_us']:.1f} us, "
          f"{row['traps']:.0f} traps/op, {row['supervisor_messages']:.2f} supervisor msgs/op, "
          f"{row['context_switches']:.2f} context switches/op ({row['ops']} ops)")
    if path == "ide-pio":  # 8 + 257 per sector, the driver's accounting
        assert row["traps"] == 8 + 257 * (block // 512), row["traps"]
    if path == "scsi":
        assert row["traps"] == 0


@pytest.mark.multiprocess
def test_storage_report(storage, bench_store):
    """The table with ratios and the targets (asserted in full mode)."""
    key = report.storage_row_key
    missing = [key(p, q, o, b) for o in OPS for b in BLOCKS for p, q in PATHS
               if key(p, q, o, b) not in storage.rows]
    problem = storage.check_counters()
    st = bench_store["storage"]
    st["counters_check"] = problem or "ok"
    lines = report.storage_lines(st)
    tg = report.storage_targets(st)
    lines += report.target_lines(tg, storage.quick, "Issue 7 targets")
    print("\n" + "\n".join(lines))
    assert problem is None, problem
    if missing:
        pytest.skip(f"rows not measured (deselected?): {', '.join(missing)}")
    if not storage.quick:
        failed = [t for t in tg if not t["pass"]]
        assert not failed, "; ".join(f"{t['target']}: {t['detail']}" for t in failed)
