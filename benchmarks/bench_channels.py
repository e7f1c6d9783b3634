"""VMBus channels between real partitions, next to the bare ring (issue 4).

One real cluster per module: ``viridian up --detach --config <tmp toml>``
starts a supervisor, the root and two children (child1: an echo channel in
echo mode; child2: an echo channel in sink mode with a ring of
VIRIDIAN_BENCH_RING_BYTES, 1 MiB, towards the root); ``viridian down`` stops
it at the end, with a leak check.  Every partition runs
benchmarks/channel_hook.py (VIRIDIAN_PARTITION_HOOK): the children write
(pinned to the producer CPU), the root reads (pinned to the consumer CPU);
each child connects to this process over a Unix socket once its channel is
open and runs the commands below from its own loop.

* ``test_channel_setup``: offer -> first packet.  child1 is restarted
  (``viridian partition restart``) N times; each new child records when it
  processed OFFERCHANNEL and when the first echo completion came back over
  the new channel (ring pages allocated and shared, GPADL, open, doorbells,
  one round trip), and reports it.  p50/p99 in ms.
* ``test_channel_echo[64B|1KiB]``: closed-loop ``EchoVsc.echo(payload)`` in
  child1; the root's echo VSP answers from its event loop.  Next to it, in
  the same test with rounds interleaved: the bare ring ping-pong between two
  plain processes (bench_latency's workers), with the default spin-then-block
  wait and blocking only.  p50/p99 in us and the ratios.
* ``test_channel_stream[64B|1KiB|16KiB]``: child2 streams with the bare ring's
  own producer (``write_many`` of k, ``wait_writable`` on the channel's
  doorbell) into the root, whose echo VSP in sink mode counts and drops
  (``Endpoint.service``: ``drain(256)`` from the loop).  One op = n messages
  and the ring read empty by the root.  Next to it, rounds interleaved: the
  bare ring between two plain processes, same ring size, same calls
  (``viridian-batch``: write_many(k) / drain(256)).  At the end the root's
  own counters (``viridian status --json``: the channel's packets_in and
  bytes_in) must match what the child wrote.  Target: channel >= 90 % of the
  bare ring's msgs/s.

Settings: the harness's (VIRIDIAN_BENCH_ROUNDS, _ROUND_S, _LAT_ROUNDS,
_LAT_PINGS, _RING_BYTES, _CPUS ...) and VIRIDIAN_BENCH_CHANNEL_RESTARTS
(set-up samples; 20, quick mode 2).  Quick mode runs one tiny round of each.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import transports as tr
from .bench_cluster import IDLE_TARGET_PERCENT, _assert_clean, _cpu_percent, _kill_and_sweep
from .channel_hook import ENV_CPUS, ENV_SOCK
from .harness import (
    BenchConfig,
    PyPair,
    QuietGate,
    WorkerError,
    calibrate,
    open_stream_pair,
    percentiles,
    size_label,
)
from .report import NOISE_PCT

# A failure before the measurement would add a second, misleading error.
NOT_USED_OK = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
pytestmark = [pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parent.parent
STREAM_SIZES = (64, 1024, 16384)
ECHO_SIZES = (64, 1024)
TARGET_RATIO = 0.9  # channel streaming within 10 % of the bare ring
ECHO_CHILD, SINK_CHILD = "child1", "child2"
RECV_RING_PAGES = 17  # the sink channel's root->child ring (unused by sink mode)
CLI_TIMEOUT_S = 60.0
HELLO_TIMEOUT_S = 30.0


def _restarts(cfg: BenchConfig) -> int:
    v = os.environ.get("VIRIDIAN_BENCH_CHANNEL_RESTARTS", "")
    return int(v) if v else (2 if cfg.quick else 20)


# ----------------------------------------------------------------------------
# The cluster and the children's connections


class ChildConn:
    """One child's connection (benchmarks/channel_hook.py on the other end)."""

    def __init__(self, sock: socket.socket, hello: dict[str, Any], buf: bytes) -> None:
        self.sock, self.hello, self._buf = sock, hello, buf
        self.name, self.pid = hello["name"], hello["pid"]

    def _line(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer within {timeout:.0f} s")
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise WorkerError(f"{self.name} (pid {self.pid}) closed its connection")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, op: str, timeout: float, **args: Any) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        ans = self._line(timeout)
        if ans.get("op") == "error":
            raise WorkerError(f"{self.name}: {ans['error']}\n{ans.get('trace', '')}")
        return ans

    def close(self) -> dict[str, Any]:
        bye: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            self.sock.sendall(b'{"op": "quit"}\n')
            bye = self._line(5.0)
        self.sock.close()
        return bye


class ChannelCluster:
    """A supervisor, the root and two children with echo channels, through the CLI."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.base = Path(tempfile.mkdtemp(prefix="virc-"))  # AF_UNIX paths: short
        self.name = f"c{uuid.uuid4().hex[:6]}"
        self.ring_data = cfg.ring_data
        if self.ring_data % 4096:
            raise ValueError("VIRIDIAN_BENCH_RING_BYTES must be whole pages for a channel")
        self.send_ring_pages = self.ring_data // 4096 + 1  # + the control page
        self.config = self.base / "cluster.toml"
        self.config.write_text(
            '[[partition]]\nname = "root"\nrole = "root"\n'
            'memory = { startup = "256M", minimum = "64M", maximum = "1G" }\n\n'
            f'[[partition]]\nname = "{ECHO_CHILD}"\nrestart = "never"\n'
            'devices = [{ type = "echo", mode = "echo" }]\n'
            'memory = { startup = "64M", minimum = "64M", maximum = "512M" }\n\n'
            f'[[partition]]\nname = "{SINK_CHILD}"\nrestart = "never"\n'
            f'devices = [{{ type = "echo", mode = "sink", send_ring_pages = '
            f'{self.send_ring_pages}, recv_ring_pages = {RECV_RING_PAGES} }}]\n'
            'memory = { startup = "64M", minimum = "64M", maximum = "512M" }\n')
        self.sock_path = self.base / "bench.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.sock_path))
        self.listener.listen(16)
        pp = os.environ.get("PYTHONPATH")
        self.env = {**os.environ, "VIRIDIAN_RUNTIME_DIR": str(self.base), "NO_COLOR": "1",
                    "VIRIDIAN_PARTITION_HOOK": "benchmarks.channel_hook:run",
                    "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), pp) if x),
                    ENV_SOCK: str(self.sock_path), ENV_CPUS: f"{cfg.cpus[0]},{cfg.cpus[1]}"}
        self.conns: dict[str, ChildConn] = {}
        self.byes: list[dict[str, Any]] = []
        self.pids: set[int] = set()
        self.started = False

    # -- the CLI -------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "partitions.cli", *args, "--name", self.name],
                           env=self.env, capture_output=True, text=True,
                           timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if check and r.returncode:
            raise AssertionError(f"viridian {' '.join(args)}: {r.stdout}{r.stderr}")
        return r

    def up(self) -> None:
        self.started = True
        self.cli("up", "--detach", "--config", str(self.config))
        for name in (ECHO_CHILD, SINK_CHILD):
            self.wait_hello(name)
        st = self.status()
        self.pids |= {st["supervisor_pid"], *(p["pid"] for p in st["partitions"] if p["pid"])}

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)

    def part(self, name: str) -> dict[str, Any]:
        return next(p for p in self.status()["partitions"] if p["name"] == name)

    def restart(self, name: str) -> ChildConn:
        old = self.conns.pop(name, None)
        if old is not None:
            self.byes.append(old.close())
        self.cli("partition", "restart", name)
        return self.wait_hello(name, not_pid=old.pid if old else None)

    # -- the children's connections ----------------------------------------------
    def wait_hello(self, name: str, not_pid: int | None = None) -> ChildConn:
        """Accept connections until ``name`` (a new incarnation) says hello."""
        deadline = time.monotonic() + HELLO_TIMEOUT_S
        while True:
            c = self.conns.get(name)
            if c is not None and c.pid != not_pid:
                return c
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{name}: no hello within {HELLO_TIMEOUT_S:.0f} s; "
                                   f"{self._log_tail(name)}")
            r, _, _ = select.select([self.listener], [], [], min(left, 0.5))
            if not r:
                continue
            s, _ = self.listener.accept()
            probe = ChildConn(s, {"name": "?", "pid": 0}, b"")
            hello = probe._line(10.0)
            conn = ChildConn(s, hello, probe._buf)
            self.pids.add(conn.pid)
            prev = self.conns.get(conn.name)
            if prev is not None:
                self.byes.append(prev.close())
            self.conns[conn.name] = conn

    def _log_tail(self, name: str) -> str:
        from hv.rundir import RunDir

        with contextlib.suppress(OSError):
            lines = RunDir(self.name, self.base).log_file(name).read_text().splitlines()
            return "log: " + " | ".join(lines[-5:])
        return "no log"

    def root_channel(self, child: str) -> dict[str, Any]:
        root = next(p for p in self.status()["partitions"] if p["role"] == "root")
        return next(c for c in root["channels"] if c["child"] == child)

    # -- the end -------------------------------------------------------------------
    def close(self) -> str:
        """Stop everything; returns what was left behind ('' when nothing)."""

        for c in list(self.conns.values()):
            self.byes.append(c.close())
        self.conns.clear()
        self.listener.close()
        problems = ""
        try:
            if self.started:
                r = self.cli("down", check=False)
                if r.returncode:
                    problems = f"down failed: {r.stdout}{r.stderr}"
                try:
                    _assert_clean(self.base, self.name, list(self.pids))
                except AssertionError as e:
                    problems += f" {e}"
        finally:
            if self.started:  # whatever happened: nothing of this cluster survives
                _kill_and_sweep(self.name, self.base)
            shutil.rmtree(self.base, ignore_errors=True)
        return problems.strip()


@pytest.fixture(scope="module")
def cluster(bench_cfg: BenchConfig, bench_store: dict[str, Any]) -> Iterator[ChannelCluster]:
    c = ChannelCluster(bench_cfg)
    try:
        c.up()
        yield c
    finally:
        problems = c.close()  # always: down, kill stragglers, sweep, remove the run dir
        bench_store["channels"]["leftovers"] = problems or "none"
    assert not problems, problems  # (not reached when the module already failed)


def _root_pid(cluster: ChannelCluster) -> int:
    return next(p["pid"] for p in cluster.status()["partitions"] if p["role"] == "root")


# ----------------------------------------------------------------------------
# Set-up latency


@NOT_USED_OK
def test_channel_setup(benchmark, cluster, bench_cfg, bench_store):
    cfg = bench_cfg
    n = _restarts(cfg)
    samples: list[dict[str, Any]] = []
    first = cluster.conns[ECHO_CHILD].hello["setup"]

    def restart() -> None:
        samples.append(cluster.restart(ECHO_CHILD).hello["setup"])

    benchmark.group = "channel set-up"
    benchmark.extra_info.update(kind="channel-setup", restarts=n,
                                measured_op="viridian partition restart child1, until the "
                                "new child's channel has done its first echo")
    benchmark.pedantic(restart, rounds=n, warmup_rounds=0, iterations=1)
    samples = samples[-n:]
    ns = [int(s["offer_to_first_echo_ms"] * 1e6) for s in samples]
    pct = {k.replace("_us", "_ms"): v / 1e3 if k.endswith("_us") else v
           for k, v in percentiles(ns).items()}
    parts = {key: statistics.median(s[key] for s in samples)
             for key in ("offer_to_gpadl_sent_ms", "gpadl_sent_to_created_ms",
                         "gpadl_created_to_open_ms", "offer_to_open_ms",
                         "open_to_first_echo_ms") if all(key in s for s in samples)}
    res = {"kind": "channel-setup", **pct, "median_parts_ms": parts,
           "first_boot_ms": first["offer_to_first_echo_ms"],
           "samples_ms": [s["offer_to_first_echo_ms"] for s in samples]}
    benchmark.extra_info.update(res)
    bench_store["channels"]["setup"] = res


# ----------------------------------------------------------------------------
# Echo round trips


class _ChannelPings:
    def __init__(self, conn: ChildConn, size: int, cfg: BenchConfig) -> None:
        self.conn, self.size, self.cfg = conn, size, cfg

    def pings(self, k: int, w: int) -> list[int]:
        return self.conn.request("pings", self.cfg.round_deadline_s, size=self.size, k=k,
                                 w=w)["lat"]


def _ping_pair(size: int, spin: int | None, cfg: BenchConfig) -> PyPair:
    setup = tr.viridian_pingpong_setup(cfg.ring_data)
    try:
        return PyPair("viridian-ping", size, cfg, setup, ("pinger", "ponger"),
                      {"spin_ns": spin})
    except BaseException:
        setup.cleanup()
        raise


@NOT_USED_OK
@pytest.mark.parametrize("size", ECHO_SIZES, ids=[size_label(s).replace(" ", "")
                                                  for s in ECHO_SIZES])
def test_channel_echo(benchmark, cluster, bench_cfg, bench_store, size, placement):
    from vmbus.ring import DEFAULT_SPIN_NS

    cfg = bench_cfg
    conn = cluster.conns[ECHO_CHILD]
    chan = _ChannelPings(conn, size, cfg)
    bare = {"spin": _ping_pair(size, None, cfg)}
    try:
        bare["block"] = _ping_pair(size, 0, cfg)
        got: dict[str, list[list[int]]] = {"channel": [], "spin": [], "block": []}
        pids = [conn.pid, _root_pid(cluster)]
        gate = QuietGate(cfg, pids, placement)

        def setup() -> None:
            placement.wait_shared()  # (for the bare rounds too; gate.setup probes again)
            for key, pair in bare.items():  # the bare rings' rounds, interleaved
                got[key].append(pair.pings(cfg.lat_pings, cfg.lat_skip))
            gate.setup()

        info = {"kind": "channel-echo", "msg_size": size, "msgs_per_op": cfg.lat_pings,
                "bytes_per_op": size * cfg.lat_pings,
                "channel": "EchoVsc.echo in child1 (pinned to CPU "
                           f"{cfg.cpus[0]}); the root's echo VSP (CPU {cfg.cpus[1]}) answers "
                           "from its loop",
                "bare": "bench_latency's ping-pong: try_write / IncomingRing.read, two plain "
                        f"processes on CPUs {cfg.cpus[0]} and {cfg.cpus[1]}",
                "spin_ns": DEFAULT_SPIN_NS}
        benchmark.group = f"channel echo {size_label(size)}"
        benchmark.extra_info.update(info)
        benchmark.pedantic(lambda: got["channel"].append(chan.pings(cfg.lat_pings,
                                                                    cfg.lat_skip)),
                           setup=setup, teardown=gate.teardown, rounds=cfg.lat_rounds,
                           warmup_rounds=0 if cfg.quick else 1, iterations=1)
        machine = gate.summary(cfg.lat_rounds)
    finally:
        for pair in bare.values():
            pair.close()
    res: dict[str, Any] = {**info, "machine": machine}
    for key, rounds in got.items():
        res[key] = percentiles([x for r in rounds[-cfg.lat_rounds:] for x in r])
    for key in ("spin", "block"):
        res[f"p50_x_{key}"] = res["channel"]["p50_us"] / res[key]["p50_us"]
        res[f"p99_x_{key}"] = res["channel"]["p99_us"] / res[key]["p99_us"]
    benchmark.extra_info.update({k: v for k, v in res.items() if k not in info})
    bench_store["channels"].setdefault("echo", {})[str(size)] = res


# ----------------------------------------------------------------------------
# Streaming


class _ChannelStream:
    """child2's channel as a harness pair: ``round(n)`` is the measured op."""

    def __init__(self, conn: ChildConn, size: int, k: int, cfg: BenchConfig) -> None:
        self.conn, self.size, self.k, self.cfg = conn, size, k, cfg
        self.timings: list[float] = []
        self.results: list[dict[str, Any]] = []
        self._rid = 0

    def round(self, n: int) -> dict[str, Any]:
        self._rid += 1
        t0 = time.perf_counter()
        res = self.conn.request("round", self.cfg.round_deadline_s, size=self.size, n=n,
                                k=self.k, rid=self._rid)
        self.timings.append(time.perf_counter() - t0)
        if res["n"] != n or res["rid"] != self._rid:
            raise WorkerError(f"channel round {self._rid}: {res}")
        self.results.append(res)
        return res


def _quiet_pairs(bare: list[dict[str, float]], chan: list[dict[str, float]]) -> list[bool]:
    """Per round pair: neither round had other processes (or steal) above NOISE_PCT."""
    def ok(r: dict[str, float]) -> bool:
        return r["foreign_cpu_pct"] <= NOISE_PCT and r["steal_pct"] <= NOISE_PCT

    if len(bare) != len(chan):  # --benchmark-disable runs no teardown: nothing watched
        return []
    return [ok(b) and ok(c) for b, c in zip(bare, chan, strict=True)]


def _confirm_root_counters(cluster: ChannelCluster, conn: ChildConn) -> dict[str, Any]:
    """The root's own counters (status) agree with what the child wrote."""
    mine = conn.request("stats", 10.0)["stats"]
    deadline = time.monotonic() + 10
    while True:
        root = cluster.root_channel(SINK_CHILD)
        if (root["packets_in"], root["bytes_in"]) == (mine["packets_out"], mine["bytes_out"]):
            return {"packets": root["packets_in"], "bytes": root["bytes_in"],
                    "dropped_by_vsp": root.get("device", {}).get("dropped"),
                    "root_wakeups": root.get("wakeups"),
                    "child_signals_sent": mine["signals_sent"],
                    "child_ring_full": mine["ring_full"]}
        if time.monotonic() > deadline:
            raise AssertionError(f"the root's counters {root} do not match the child's {mine}")
        time.sleep(0.05)  # the root reports every 0.25 s while something changes


@NOT_USED_OK
@pytest.mark.parametrize("size", STREAM_SIZES, ids=[size_label(s).replace(" ", "")
                                                    for s in STREAM_SIZES])
def test_channel_stream(benchmark, cluster, bench_cfg, bench_store, size, placement):
    cfg = bench_cfg
    conn = cluster.conns[SINK_CHILD]
    ring_data = conn.hello["ring_data_bytes"]
    assert ring_data == cfg.ring_data, (ring_data, cfg.ring_data)
    k = tr.batch_k(size, ring_data)
    chan = _ChannelStream(conn, size, k, cfg)
    pids = [conn.pid, _root_pid(cluster)]
    with open_stream_pair("viridian-batch", size, cfg, None,
                          bench_store["notes"]) as bare:
        n_bare = calibrate(bare, size, k, cfg)
        n_chan = calibrate(chan, size, k, cfg)
        bare_before, chan_before = len(bare.timings), len(chan.timings)
        bgate, cgate = QuietGate(cfg, bare.pids, placement), QuietGate(cfg, pids, placement)

        def setup() -> None:  # a bare-ring round before each channel round
            bgate.setup()
            bare.round(n_bare)
            bgate.teardown()
            cgate.setup()

        info = {"kind": "channel-stream", "msg_size": size, "msgs_per_op": n_chan,
                "bytes_per_op": n_chan * size, "batch_k": k, "ring_data_bytes": ring_data,
                "bare_msgs_per_op": n_bare,
                "api": f"write_many({k}) in the child / Endpoint.service drain(256) in the "
                       "root (sink: count and drop); bare: write_many / drain(256)",
                "pinning": {"producer_cpu": cfg.cpus[0], "consumer_cpu": cfg.cpus[1],
                            "child": conn.hello["affinity"], "bare": bare.ready}}
        benchmark.group = f"channel stream {size_label(size)}"
        benchmark.extra_info.update(info)
        benchmark.pedantic(lambda: chan.round(n_chan), setup=setup, teardown=cgate.teardown,
                           rounds=cfg.rounds, warmup_rounds=cfg.warmup, iterations=1)
        ct = chan.timings[chan_before:][-cfg.rounds:]
        bt = bare.timings[bare_before:][-cfg.rounds:]
        machine = {"channel": cgate.summary(cfg.rounds), "bare": bgate.summary(cfg.rounds)}
        quiet = _quiet_pairs(bgate.rounds[-len(bt):], cgate.rounds[-len(ct):])
    counters = _confirm_root_counters(cluster, conn)
    stats = getattr(benchmark, "stats", None)
    cm = stats.stats.median if stats else statistics.median(ct)
    bm = statistics.median(bt)
    c_mps, b_mps = n_chan / cm, n_bare / bm
    # The ratio is judged on the round pairs (bare round, then channel round)
    # during which no other process took more than NOISE_PCT of the CPUs:
    # under foreign load the cluster's cgroups (cpu.shares) shield the
    # partitions but not the bare workers, which would flatter the channel.
    pairs = [i for i, q in enumerate(quiet) if q]
    if len(pairs) >= max(1, len(quiet) // 4):
        judged = (statistics.median(n_chan / ct[i] for i in pairs)
                  / statistics.median(n_bare / bt[i] for i in pairs))
        basis = f"{len(pairs)} of {len(quiet)} round pairs quiet"
    elif quiet:
        judged = c_mps / b_mps
        basis = f"only {len(pairs)} of {len(quiet)} round pairs quiet: all rounds (noisy)"
    else:
        judged = c_mps / b_mps
        basis = "rounds not watched: all rounds"
    res = {
        **info,
        "channel": {"msgs_per_s": c_mps, "GB_per_s": c_mps * size / 1e9, "median_s": cm,
                    "round_msgs_per_s": [n_chan / x for x in ct],
                    "doorbell_waits": sum(r["doorbell_waits"] for r in chan.results[-len(ct):])},
        "bare": {"msgs_per_s": b_mps, "GB_per_s": b_mps * size / 1e9, "median_s": bm,
                 "round_msgs_per_s": [n_bare / x for x in bt], "worker_stats": bare.bye},
        "ratio_all_rounds": c_mps / b_mps,
        "ratio": judged,
        "ratio_basis": basis,
        "target_ratio": TARGET_RATIO,
        "root_counters": counters,
        "machine": machine,
    }
    benchmark.extra_info.update(channel_msgs_per_s=c_mps, bare_msgs_per_s=b_mps,
                                ratio=res["ratio"], root_counters=counters, machine=machine)
    bench_store["channels"].setdefault("stream", {})[str(size)] = res


# ----------------------------------------------------------------------------
# Idle after traffic


@NOT_USED_OK
def test_channel_idle_after_traffic(benchmark, cluster, bench_cfg, bench_store):
    """After the channels carried traffic, the cluster is idle again: the
    root's short poll after busy service calls must not keep it awake."""
    from hv.rundir import cluster_processes

    cfg = bench_cfg
    window = max(cfg.idle_s, 1.0)
    time.sleep(0.5)  # the last reports go out
    procs = cluster_processes(cluster.name)
    result: dict[str, float] = {}

    def measure() -> None:
        result["cpu_percent"] = _cpu_percent(procs, window)

    benchmark.group = "channel idle"
    benchmark.pedantic(measure, rounds=1, warmup_rounds=0, iterations=1)
    res = {"kind": "channel-idle", "processes": len(procs), "window_s": window, **result,
           "target_percent": IDLE_TARGET_PERCENT}
    benchmark.extra_info.update(res)
    bench_store["channels"]["idle"] = res
    if not cfg.quick:
        assert result["cpu_percent"] < IDLE_TARGET_PERCENT, result
