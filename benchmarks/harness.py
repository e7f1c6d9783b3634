"""Parent-side machinery: configuration, worker pairs, rounds, calibration.

A *pair* is two worker processes pinned to two CPUs (producer/pinger on the
first, consumer/ponger on the second), started once per benchmark and driven
round by round:

* ``PyPair``: two Python workers (multiprocessing "spawn"; benchmarks/transports.py),
  driven over two multiprocessing Pipes;
* ``CPair``: benchmarks/c/ring_bench (the C ceiling and the eventfd floor),
  driven over its stdin/stdout.

Both offer ``check(n)``, ``round(n)`` (the measured op: "send n messages and
wait for the consumer's count"), ``pings(k, w)`` and ``close()``.  ``close()``
always ends and reaps both processes (quit, then terminate, then kill), and
every wait in the parent has a deadline.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import select
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from . import transports as tr

MiB = 1 << 20
SIZES = (64, 1024, 16384, 65536)
READ_INTO_MIN = 65536  # the per-packet Viridian consumer uses read_into from this size on
READY_S = 60.0  # worker start-up (spawn + imports) deadline


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v not in (None, "") else default


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


@dataclass(frozen=True)
class BenchConfig:
    """Durations and sizes; every field can be set with an environment variable
    (VIRIDIAN_BENCH_<FIELD>, e.g. VIRIDIAN_BENCH_ROUND_S=0.2)."""

    quick: bool
    round_s: float  # target length of one streaming round (one measured op)
    rounds: int  # measured rounds per streaming benchmark
    warmup: int  # warm-up rounds (pytest-benchmark's warmup_rounds)
    lat_rounds: int  # measured ping-pong rounds
    lat_pings: int  # timed round trips per ping-pong round
    lat_skip: int  # unrecorded round trips at the start of each ping-pong round
    lat_gap_s: float  # least time between two ping-pong rounds (spreads a row over time)
    idle_s: float  # how long the idle reader is watched
    ring_data: int  # data bytes of every byte ring (control page not counted)
    round_deadline_s: float  # a round that takes longer fails (workers killed)
    quiet_budget_s: float  # per benchmark: most time spent waiting for a quiet machine
    placement_budget_s: float  # per run: most time spent waiting for the vCPUs to share an L3
    cpus: tuple[int, int]  # (producer/pinger CPU, consumer/ponger CPU)

    @classmethod
    def from_env(cls, benchmark_disabled: bool = False) -> BenchConfig:
        quick = os.environ.get("VIRIDIAN_BENCH_QUICK", "") not in ("", "0") or benchmark_disabled
        cpus_env = os.environ.get("VIRIDIAN_BENCH_CPUS", "")
        if cpus_env:
            a, b = (int(x) for x in cpus_env.split(","))
            cpus = (a, b)
        else:
            avail = sorted(os.sched_getaffinity(0))
            cpus = (0, 1) if {0, 1} <= set(avail) else (avail[0], avail[-1])
        return cls(
            quick=quick,
            round_s=_env_float("VIRIDIAN_BENCH_ROUND_S", 0.005 if quick else 0.1),
            rounds=_env_int("VIRIDIAN_BENCH_ROUNDS", 1 if quick else 25),
            warmup=_env_int("VIRIDIAN_BENCH_WARMUP", 0 if quick else 2),
            lat_rounds=_env_int("VIRIDIAN_BENCH_LAT_ROUNDS", 1 if quick else 10),
            lat_pings=_env_int("VIRIDIAN_BENCH_LAT_PINGS", 200 if quick else 2000),
            lat_skip=_env_int("VIRIDIAN_BENCH_LAT_SKIP", 20 if quick else 50),
            lat_gap_s=_env_float("VIRIDIAN_BENCH_LAT_GAP_S", 0.0 if quick else 0.5),
            idle_s=_env_float("VIRIDIAN_BENCH_IDLE_S", 0.3 if quick else 2.0),
            ring_data=_env_int("VIRIDIAN_BENCH_RING_BYTES", MiB),
            round_deadline_s=_env_float("VIRIDIAN_BENCH_DEADLINE_S", 60.0),
            quiet_budget_s=_env_float("VIRIDIAN_BENCH_QUIET_S", 5.0),
            placement_budget_s=_env_float("VIRIDIAN_BENCH_PLACEMENT_S", 240.0),
            cpus=cpus,
        )

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class WorkerError(RuntimeError):
    pass


# ----------------------------------------------------------------------------
# Python worker pairs


class PyPair:
    """Two spawned Python workers.  Roles: ("producer", "consumer"),
    ("pinger", "ponger") or ("idle", None)."""

    def __init__(self, key: str, size: int, cfg: BenchConfig, setup: tr.Setup,
                 roles: tuple[str, str | None], opts: dict[str, Any]) -> None:
        self.key, self.size, self.cfg = key, size, cfg
        self.setup = setup
        self.timings: list[float] = []
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.roles: list[str] = []
        self.ready: dict[str, Any] = {}
        self.bye: dict[str, Any] = {}
        self._rid = 0
        self._closed = False
        ctx = mp.get_context("spawn")
        opts = {k: v for k, v in opts.items() if k != "ctx"}
        try:
            # The b side (consumer / ponger) starts first (zmq binds there),
            # unless the transport says otherwise (iceoryx2).
            plan = [(roles[1], setup.b_args, cfg.cpus[1]), (roles[0], setup.a_args, cfg.cpus[0])]
            if roles[0] == "idle":  # a reader: it sits where consumers sit
                plan = [(roles[0], setup.a_args, cfg.cpus[1])]
            t = tr.TRANSPORTS.get(key)
            if t is not None and t.producer_first:
                plan.reverse()
            for role, args, cpu in plan:
                if role is None:
                    continue
                parent_end, child_end = ctx.Pipe()
                p = ctx.Process(
                    target=tr.worker_main,
                    args=(role, key, size, cpu, child_end, args, opts),
                    name=f"bench-{role}-{key}-{size}",
                    daemon=True,
                )
                p.start()
                child_end.close()
                self.procs.append(p)
                self.conns.append(parent_end)
                self.roles.append(role)
                self.ready[role] = self._expect(len(self.conns) - 1, "ready", READY_S)
            self.a = self.roles.index(roles[0])
            self.b = self.roles.index(roles[1]) if roles[1] is not None else None
            setup.after_ready()
        except BaseException:
            self.close()
            raise

    # -- messaging ---------------------------------------------------------------
    def _expect(self, i: int, tag: str, timeout: float) -> Any:
        conn = self.conns[i]
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.key} {self.size} B: no {tag!r} from worker {i} "
                                   f"within {timeout:.0f} s; {self._pending()}")
            ready = mpc.wait([conn] + [p.sentinel for p in self.procs], remaining)
            if conn in ready or conn.poll(0):
                try:
                    got, payload = conn.recv()
                except EOFError as e:
                    raise WorkerError(f"{self.key}: worker {i} closed its pipe") from e
                if got == "error":
                    raise WorkerError(f"{payload}\n{self._pending()}")
                if got != tag:
                    raise WorkerError(f"{self.key}: expected {tag!r}, got {got!r}")
                return payload
            for p in self.procs:
                if p.exitcode is not None:
                    # It may have sent an error just before it exited.
                    for c in self.conns:
                        if c.poll(0):
                            got, payload = c.recv()
                            if got == "error":
                                raise WorkerError(payload)
                    raise WorkerError(f"{self.key}: worker {p.name} exited with {p.exitcode}; "
                                      f"{self._pending()}")

    def _pending(self) -> str:
        """What the workers said that nobody read yet (for error messages)."""
        out = []
        for role, c in zip(self.roles, self.conns, strict=True):
            with contextlib.suppress(Exception):
                while c.poll(0):
                    out.append(f"{role}: {c.recv()!r}"[:2000])
        return "pending replies: " + ("; ".join(out) if out else "none")

    # -- operations --------------------------------------------------------------
    def check(self, n: int) -> dict[str, Any]:
        """n messages, message i carrying i; the consumer checks each one."""
        self.conns[self.b].send(("check", n))
        self.conns[self.a].send(("check", n))
        res = self._expect(self.b, "checked", self.cfg.round_deadline_s)
        self._expect(self.a, "sent", self.cfg.round_deadline_s)
        if res["n"] != n or res["bad"]:
            raise WorkerError(f"{self.key} {self.size} B: check round failed: {res}")
        return res

    def round(self, n: int) -> dict[str, Any]:
        """The measured op: send n messages, wait until the consumer has them."""
        self._rid += 1
        rid = self._rid
        t0 = time.perf_counter()
        self.conns[self.b].send(("round", n, rid))
        self.conns[self.a].send(("round", n, rid))
        done = self._expect(self.b, "done", self.cfg.round_deadline_s)
        self._expect(self.a, "sent", self.cfg.round_deadline_s)
        self.timings.append(time.perf_counter() - t0)
        if done["n"] != n or done["marker"] != rid:
            raise WorkerError(f"{self.key} {self.size} B: round {rid}: consumer reported {done}")
        return done

    def pings(self, k: int, w: int) -> list[int]:
        self.conns[self.a].send(("pings", k, w))
        return self._expect(self.a, "lat", self.cfg.round_deadline_s)

    def idle(self, op: str, secs: float) -> tuple[float, float]:
        """Tell the idle reader to wait; returns (monotonic, psutil pid) after
        it reported that it is about to block."""
        self.conns[self.a].send((op, secs))
        self._expect(self.a, "waiting", self.cfg.round_deadline_s)
        return time.monotonic(), self.procs[self.a].pid

    def idle_done(self, op: str, secs: float) -> dict[str, Any]:
        return self._expect(self.a, op + "_done", secs + self.cfg.round_deadline_s)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # The a side first: a pinger's quit also stops its ponger, which
            # reads no commands.
            for i in reversed(range(len(self.conns))):
                if self.roles[i] == "ponger":
                    continue
                with contextlib.suppress(Exception):
                    c = self.conns[i]
                    c.send(("quit",))
                    if self.procs[i].is_alive() and c.poll(5):
                        tag, payload = c.recv()
                        if tag == "bye":
                            self.bye[self.roles[i]] = payload
            for p in self.procs:
                p.join(5)
            for p in self.procs:
                if p.exitcode is None:
                    p.terminate()
                    p.join(3)
                if p.exitcode is None:
                    p.kill()
                    p.join(3)
        finally:
            for c in self.conns:
                c.close()
            for p in self.procs:
                with contextlib.suppress(ValueError):
                    p.close()
            self.setup.cleanup()


# ----------------------------------------------------------------------------
# The C program


class CPair:
    """benchmarks/c/ring_bench: main process (producer / pinger) + a forked child."""

    def __init__(self, binary: str, argv: list[str], cfg: BenchConfig, label: str) -> None:
        self.cfg, self.label = cfg, label
        self.timings: list[float] = []
        self.ready: dict[str, Any] = {}
        self.bye: dict[str, Any] = {}
        self._buf = b""
        self._rid = 0
        self._closed = False
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.p = subprocess.Popen([binary, *argv], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._err)
        try:
            for _ in range(2):
                words = self._line(READY_S).split()
                if words[0] != "ready":
                    raise WorkerError(f"{label}: {words}")
                self.ready[words[1]] = {"cpu": int(words[2].split("=")[1])}
        except BaseException:
            self.close()
            raise

    def _stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace").strip()

    def _line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.label}: no reply within {timeout:.0f} s")
            r, _, _ = select.select([fd], [], [], remaining)
            if not r:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self.p.wait(5)
                raise WorkerError(f"{self.label}: exited ({self.p.returncode}): {self._stderr()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _send(self, line: str) -> None:
        self.p.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        self.p.stdin.flush()  # type: ignore[union-attr]

    def _collect(self, tags: set[str]) -> dict[str, list[str]]:
        got: dict[str, list[str]] = {}
        while tags - got.keys():
            words = self._line(self.cfg.round_deadline_s).split()
            got[words[0]] = words[1:]
        return got

    def check(self, n: int) -> dict[str, Any]:
        self._send(f"c {n}")
        got = self._collect({"sent", "checked"})
        cn, bad = (int(x) for x in got["checked"])
        if cn != n or bad:
            raise WorkerError(f"{self.label}: check round failed: {cn} packets, {bad} bad")
        return {"n": cn, "bad": bad}

    def round(self, n: int) -> dict[str, Any]:
        self._rid += 1
        t0 = time.perf_counter()
        self._send(f"r {n} {self._rid}")
        got = self._collect({"sent", "done"})
        self.timings.append(time.perf_counter() - t0)
        d = got["done"]
        res = {"n": int(d[0]), "marker": int(d[1]), "consumer_sleeps": int(d[2]),
               "consumer_signals": int(d[3]), "secs": int(d[4]) / 1e9,
               "producer_sleeps": int(got["sent"][1]), "producer_signals": int(got["sent"][2])}
        if res["n"] != n or res["marker"] != self._rid:
            raise WorkerError(f"{self.label}: round {self._rid}: consumer reported {d}")
        return res

    def pings(self, k: int, w: int) -> list[int]:
        self._send(f"p {k} {w}")
        words = self._line(self.cfg.round_deadline_s).split()
        if words[0] != "lat" or len(words) != k + 1:
            raise WorkerError(f"{self.label}: bad reply {words[:3]}...")
        return [int(x) for x in words[1:]]

    @property
    def pids(self) -> list[int]:
        return [self.p.pid]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(Exception):
                self._send("q")
                self.p.stdin.close()  # type: ignore[union-attr]
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        finally:
            for f in (self.p.stdin, self.p.stdout):
                with contextlib.suppress(Exception):
                    f.close()  # type: ignore[union-attr]
            self._err.close()


# ----------------------------------------------------------------------------
# Opening pairs for the benchmarks


C_ROWS = {
    "c-ring": ("write", "read", "C ring from C (vmbr_write / vmbr_read)"),
    "c-ring-batch": ("batch", "drain", "C ring from C, batch (vmbr_write_batch / vmbr_drain)"),
}


def skip_unless_available(key: str, size: int, ring_bench: str | None) -> None:
    """pytest.skip a row this machine cannot run: an optional package missing,
    a size the transport refuses, or the C program not built."""
    t = tr.TRANSPORTS.get(key)
    if t is not None and t.needs:
        pytest.importorskip(t.needs, reason=f"{t.needs} is not installed (the 'bench' extra)")
    if t is not None and t.max_size and size > t.max_size:
        pytest.skip(f"{t.label}: messages above {t.max_size} B are refused here (msgsize_max)")
    if key in C_ROWS and ring_bench is None:
        pytest.skip("gcc could not build benchmarks/c/ring_bench.c")


def stream_k(key: str, size: int, cfg: BenchConfig) -> int:
    """Messages per call of a batch row (1 for the per-message rows)."""
    return tr.batch_k(size, cfg.ring_data) if key in ("viridian-batch", "c-ring-batch") else 1


def stream_opts(key: str, size: int, cfg: BenchConfig) -> dict[str, Any]:
    return {
        "batch_k": tr.batch_k(size, cfg.ring_data),
        "read_into": key in ("viridian-packet", "viridian-batch") and size >= READ_INTO_MIN,
        "packet_objects": key == "viridian-packet-obj",
    }


@contextlib.contextmanager
def open_stream_pair(key: str, size: int, cfg: BenchConfig, ring_bench: str | None,
                     notes: list[str] | None = None) -> Iterator[Any]:
    if key in C_ROWS:
        wmode, rmode, _ = C_ROWS[key]
        from vmbus.ring import DEFAULT_SPIN_NS

        assert ring_bench is not None
        pair: Any = CPair(ring_bench, [
            "stream", str(size), str(cfg.ring_data), str(cfg.cpus[0]), str(cfg.cpus[1]),
            wmode, rmode, str(DEFAULT_SPIN_NS), str(tr.batch_k(size, cfg.ring_data)),
        ], cfg, f"{key} {size} B")
    else:
        t = tr.TRANSPORTS[key]
        opts = stream_opts(key, size, cfg)
        opts["ctx"] = mp.get_context("spawn")
        for attempt in (1, 2):
            setup = t.setup(size, cfg.ring_data, opts)
            try:
                pair = PyPair(key, size, cfg, setup, ("producer", "consumer"), opts)
                break
            except (WorkerError, TimeoutError) as e:
                # The machine is shared: another program's cleanup can take a
                # name from under a starting worker.  Start afresh once.
                setup.cleanup()
                if attempt == 2 or notes is None:
                    raise
                notes.append(f"{key} {size} B: worker start failed, retried: "
                             f"{str(e).strip().splitlines()[-1][:200]}")
            except BaseException:
                setup.cleanup()
                raise
    try:
        yield pair
    finally:
        pair.close()


def initial_n(size: int, k: int, quick: bool) -> int:
    n = min(2000 if quick else 5000, (2 if quick else 4) * MiB // size)
    return align(max(n, 8), k)


def align(n: int, k: int) -> int:
    return max(k, math.ceil(n / k) * k)


def calibrate(pair: Any, size: int, k: int, cfg: BenchConfig) -> int:
    """Messages per round such that a round lasts about cfg.round_s."""
    n = initial_n(size, k, cfg.quick)
    if cfg.quick:
        return n
    for _ in range(8):
        t0 = time.perf_counter()
        pair.round(n)
        t = time.perf_counter() - t0
        if t >= 0.85 * cfg.round_s:
            break
        n = align(int(n * min(20.0, 1.1 * cfg.round_s / max(t, 1e-5))), k)
    return n


def check_n(size: int) -> int:
    return max(64, min(2000, 8 * MiB // size))


class CpuWatch:
    """How busy the machine was with *other* work while a benchmark ran.

    From /proc/stat (all CPUs) minus the CPU time of the benchmark's own
    processes (psutil) and of this process; plus the hypervisor's steal time.
    Resolution is one clock tick (10 ms) per process: read it as a flag for a
    noisy run, not as a measurement.
    """

    def __init__(self, pids: list[int]) -> None:
        import psutil

        self.procs = [psutil.Process()]
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                self.procs.append(p)
                self.procs.extend(p.children(recursive=True))
        self.tick = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1
        self.result: dict[str, float] = {}

    @staticmethod
    def stat() -> tuple[int, int]:
        """(busy, steal) clock ticks summed over all CPUs."""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        return v[0] + v[1] + v[2] + v[5] + v[6], (v[7] if len(v) > 7 else 0)

    def _own(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(Exception):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.stat0 = self.stat()
        self.own0 = self._own()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        busy1, steal1 = self.stat()
        own = self._own() - self.own0
        busy = (busy1 - self.stat0[0]) / self.tick
        steal = (steal1 - self.stat0[1]) / self.tick
        cap = max(wall * self.ncpu, 1e-9)
        self.result = {
            "wall_s": round(wall, 3),
            "own_cpu_pct": round(100 * own / cap, 1),
            "foreign_cpu_pct": round(max(0.0, 100 * (busy - own) / cap), 1),
            "steal_pct": round(100 * steal / cap, 1),
        }
        return self.result

    def __enter__(self) -> CpuWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Placement:
    """Where the host runs our two vCPUs, and waiting for the usual placement.

    This VM's two vCPUs usually share an L3: a cache line crosses from one to
    the other and back in ~70-140 ns (``ring_bench cacheline``; the baselines
    in shared/perf measured this placement).  For seconds to minutes at a time
    the host runs them on different L3s instead: ~400 ns, and every hand-off
    between the producer and the consumer costs that much more (measured: the
    C ring's own 64 B round trip 0.15 -> 0.56-0.73 us, its 64 KiB stream 57 ->
    32 GB/s, Viridian's round trip 0.65 -> 1.35 us).  No code can win that
    back, and no transport escapes it, so a round measured then measures the
    host, not the transports.

    ``wait_shared`` probes (a few ms) and, while the vCPUs are apart, waits
    and probes again, within a budget for the whole run
    (VIRIDIAN_BENCH_PLACEMENT_S, 240 s; none in quick mode).  Every probe is
    recorded with its round; the report says how many rounds ran split.
    """

    SPLIT_NS = 250.0  # above: the two vCPUs do not share an L3
    POLL_S = 0.5
    PROBE_TRIPS = 5000

    def __init__(self, binary: str | None, cfg: BenchConfig, *,
                 probe: Callable[[], float | None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.binary, self.cpus = binary, cfg.cpus
        self.budget = 0.0 if cfg.quick else cfg.placement_budget_s
        self.waited = 0.0
        self._probe = probe if probe is not None else self._run_probe
        self._sleep = sleep

    def _run_probe(self) -> float | None:
        if self.binary is None:
            return None
        try:
            r = subprocess.run([self.binary, "cacheline", str(self.cpus[0]), str(self.cpus[1]),
                                str(self.PROBE_TRIPS)], capture_output=True, text=True,
                               timeout=30)
            word, value = r.stdout.split()
            return float(value) if word == "cacheline" and r.returncode == 0 else None
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def probe(self) -> float | None:
        """The cache-line round trip between the two CPUs now, in ns (None:
        no probe: gcc missing)."""
        return self._probe()

    def split(self, ns: float | None) -> bool:
        return ns is not None and ns > self.SPLIT_NS

    def wait_shared(self) -> float | None:
        """Probe; while the vCPUs are apart and budget is left, wait and probe
        again.  Returns the last probe."""
        ns = self.probe()
        while self.split(ns) and self.budget > 0:
            step = min(self.POLL_S, self.budget)
            self._sleep(step)
            self.budget -= step
            self.waited += step
            ns = self.probe()
        return ns


class QuietGate:
    """pytest-benchmark setup/teardown hooks (both untimed) around each round.

    ``setup`` waits until the machine looks idle between rounds (no more than
    one clock tick of CPU use in a short window, while our own workers are
    blocked on their control pipes), within a time budget per benchmark, so
    that bursts of other work on this shared machine hit fewer rounds; with a
    ``Placement``, it then waits for the two vCPUs to share an L3 (see there)
    and probes the placement again after the round.
    ``teardown`` records how busy other processes kept the CPUs during the
    round.  No round is ever dropped: the noise is reported, not hidden.
    ``min_gap_s`` spreads the rounds over time: the ping-pong rows' rounds
    last ~2 ms, so a whole row would otherwise fit in one of the host's
    moods, which change from second to second (the same 64 B round trip:
    0.62-0.91 us from one second to the next, placement unchanged).
    """

    WINDOW_S = 0.03

    def __init__(self, cfg: BenchConfig, pids: list[int],
                 placement: Placement | None = None, min_gap_s: float = 0.0) -> None:
        self.budget = 0.0 if cfg.quick else cfg.quiet_budget_s
        self.min_gap_s = min_gap_s
        self._ended: float | None = None  # when the last round ended
        self.waited = 0.0
        self.watch = CpuWatch(pids)
        self.rounds: list[dict[str, float]] = []
        self.placement = placement
        self.probes: list[tuple[float | None, float | None]] = []  # (before, after) per round
        self._before: float | None = None
        self._waited0 = placement.waited if placement is not None else 0.0

    def setup(self) -> None:
        if self._ended is not None:  # rounds spread over time (min_gap_s)
            time.sleep(max(0.0, self._ended + self.min_gap_s - time.monotonic()))
        while self.budget > 0:
            b0 = CpuWatch.stat()[0]
            time.sleep(self.WINDOW_S)
            if CpuWatch.stat()[0] - b0 <= 1:
                break
            self.budget -= self.WINDOW_S
            self.waited += self.WINDOW_S
        if self.placement is not None:
            self._before = self.placement.wait_shared()
        self.watch.start()

    def teardown(self, *args: object, **kwargs: object) -> None:
        self.rounds.append(self.watch.stop())
        self._ended = time.monotonic()
        if self.placement is not None:
            self.probes.append((self._before, self.placement.probe()))

    #: Rounds shorter than this many clock ticks are not judged: /proc's CPU
    #: times move in whole ticks, so over a few ms (a latency round is 2000
    #: round trips) "other processes" reads as 0 % or as several CPUs at random.
    #: A streaming round (~100 ms, 10 ticks) is judged.
    MIN_JUDGED_TICKS = 5

    def summary(self, last: int) -> dict[str, Any]:
        every = self.rounds[-last:] if last else self.rounds
        tick = self.watch.tick
        r = [x for x in every if x["wall_s"] * tick >= self.MIN_JUDGED_TICKS]
        noisy = [x for x in r if x["foreign_cpu_pct"] > 10 or x["steal_pct"] > 10]
        return {
            "rounds_watched": len(r),
            "rounds_too_short_to_judge": len(every) - len(r),
            "noisy_rounds": len(noisy),
            "median_foreign_cpu_pct": statistics.median([x["foreign_cpu_pct"] for x in r])
            if r else None,
            "max_foreign_cpu_pct": max((x["foreign_cpu_pct"] for x in r), default=None),
            "max_steal_pct": max((x["steal_pct"] for x in r), default=None),
            "quiet_wait_s": round(self.waited, 2),
            **self._placement(last),
        }

    def _placement(self, last: int) -> dict[str, Any]:
        if self.placement is None:
            return {}
        probes = self.probes[-last:] if last else self.probes
        seen = [x for pr in probes for x in pr if x is not None]
        split = self.placement.split
        return {
            "cacheline_ns_median": round(statistics.median(seen), 1) if seen else None,
            "cacheline_ns_max": round(max(seen), 1) if seen else None,
            # a round is split when the probe before or after it says so
            "split_rounds": sum(1 for pr in probes if split(pr[0]) or split(pr[1])),
            "placement_wait_s": round(self.placement.waited - self._waited0, 2),
        }


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    n = len(s)

    def q(p: float) -> float:
        return s[min(n - 1, int(p * n))] / 1e3

    return {"p50_us": q(0.50), "p99_us": q(0.99), "p999_us": q(0.999), "max_us": s[-1] / 1e3,
            "min_us": s[0] / 1e3, "mean_us": statistics.fmean(s) / 1e3, "samples": n}
