"""Fixtures and the report of Viridian's benchmark suite.

Run everything (about 6 minutes on the 2-vCPU build machine):

    .venv/bin/python -m pytest benchmarks [--benchmark-json=out.json]

Quick mode (every transport once, tiny rounds, seconds; what CI runs):

    VIRIDIAN_BENCH_QUICK=1 .venv/bin/python -m pytest benchmarks --benchmark-disable

``--benchmark-disable`` alone also selects quick mode.  Durations are set with
environment variables (see harness.BenchConfig): VIRIDIAN_BENCH_ROUND_S,
_ROUNDS, _WARMUP, _LAT_ROUNDS, _LAT_PINGS, _LAT_SKIP, _IDLE_S, _RING_BYTES,
_DEADLINE_S and _CPUS ("0,1": producer CPU, consumer CPU).

At the end ``pytest_terminal_summary`` prints one table (msgs/s, GB/s and
ratios per size), the latency table, the head-to-head block of
bench_paired.py, the idle reader's CPU, the check of issue 2's targets (each
ratio judged head to head when that ran), the channel block of
bench_channels.py with issue 4's target, the storage block with issue 7's, and a
system block; the same goes to benchmarks/results/latest.json.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from . import report
from .harness import BenchConfig, Placement

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

_STORE = pytest.StashKey[dict]()
_CFG = pytest.StashKey[BenchConfig]()
_START = pytest.StashKey[dict]()


def _watched_dirs() -> dict[str, set[str]]:
    out = {}
    for d in ("/dev/shm", "/dev/mqueue"):
        with contextlib.suppress(OSError):
            out[d] = set(os.listdir(d))
    return out


def pytest_configure(config: pytest.Config) -> None:
    disabled = bool(config.getoption("benchmark_disable", False))
    config.stash[_CFG] = BenchConfig.from_env(benchmark_disabled=disabled)
    config.stash[_STORE] = {"stream": {}, "latency": {}, "idle": None, "channels": {},
                            "storage": {}, "paired": {}, "notes": []}
    config.stash[_START] = {"time": time.time(), "dirs": _watched_dirs(),
                            "load": os.getloadavg()}
    # Columns that matter for rounds of one op each: medians, not means
    # (unless --benchmark-columns was given).
    if not config.getoption("benchmark_columns", None):
        config.option.benchmark_columns = ["median", "iqr", "min", "max", "rounds"]


@pytest.fixture(scope="session")
def bench_cfg(pytestconfig: pytest.Config) -> BenchConfig:
    cfg = pytestconfig.stash[_CFG]
    if len(os.sched_getaffinity(0)) < 2 or cfg.cpus[0] == cfg.cpus[1]:
        pytest.skip("the benchmarks need two CPUs (producer and consumer pinned apart)")
    return cfg


@pytest.fixture(scope="session")
def bench_store(pytestconfig: pytest.Config) -> dict[str, Any]:
    return pytestconfig.stash[_STORE]


@pytest.fixture(scope="session")
def ring_bench(tmp_path_factory: pytest.TempPathFactory,
               bench_store: dict[str, Any]) -> str | None:
    """benchmarks/c/ring_bench.c linked with csrc/vmbus_ring.c, built now (gcc -O2)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        bench_store["notes"].append("gcc not found: the C rows were skipped")
        return None
    out = tmp_path_factory.mktemp("ring_bench") / "ring_bench"
    cmd = [gcc, "-O2", "-std=gnu11", "-Wall", "-Wextra", f"-I{ROOT / 'csrc'}", "-o", str(out),
           str(HERE / "c" / "ring_bench.c"), str(ROOT / "csrc" / "vmbus_ring.c")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode:
        bench_store["notes"].append(f"ring_bench.c did not build: {r.stderr.strip()[:500]}")
        return None
    return str(out)


@pytest.fixture(scope="session")
def placement(ring_bench: str | None, bench_cfg: BenchConfig) -> Placement:
    """The vCPU placement probe and its run-wide wait budget (harness.Placement)."""
    return Placement(ring_bench, bench_cfg)


# ----------------------------------------------------------------------------
# The report


def _cmd(args: list[str]) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=ROOT)
        return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _extension_info() -> str:
    """Is the built cffi extension older than the C source it came from?"""
    try:
        import vmbus._ring_cffi as ext

        so = Path(ext.__file__).stat().st_mtime
        src = max((ROOT / "csrc" / f).stat().st_mtime for f in ("vmbus_ring.c", "vmbus_ring.h"))
    except Exception as e:  # pragma: no cover - diagnostics only
        return f"unknown ({e})"
    if src > so:
        return ("STALE: csrc/ is newer than vmbus/_ring_cffi (the Python rows use an older C "
                "core than the C rows; rebuild with pip install -e)")
    return "vmbus/_ring_cffi built after the last change to csrc/"


def _leftovers(start: dict[str, Any]) -> str:
    problems = []
    for d, before in start["dirs"].items():
        with contextlib.suppress(OSError):
            new = set(os.listdir(d)) - before
            if new:
                problems.append(f"new entries in {d}: {sorted(new)}")
    with contextlib.suppress(Exception):
        import psutil

        kids = [p for p in psutil.Process().children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())]
        if kids:
            problems.append(f"worker processes still alive: {[k.pid for k in kids]}")
    return "; ".join(problems) if problems else "none (/dev/shm, /dev/mqueue, worker processes)"


def _system(cfg: BenchConfig, start: dict[str, Any]) -> dict[str, Any]:
    import cffi

    commit = _cmd(["git", "rev-parse", "--short", "HEAD"])
    dirty = _cmd(["git", "status", "--porcelain", "--", "csrc", "vmbus"])
    return {
        "cpu_model": _cpu_model(),
        "cpus": f"{os.cpu_count()} online, {len(os.sched_getaffinity(0))} usable",
        "pinning": f"producer/pinger CPU {cfg.cpus[0]}, consumer/ponger/reader CPU "
                   f"{cfg.cpus[1]} (os.sched_setaffinity / sched_setaffinity in each worker)",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cffi": cffi.__version__,
        "gcc": _cmd(["gcc", "--version"]).splitlines()[0] if shutil.which("gcc") else "none",
        "packages": {d: _version(d) for d in ("pytest-benchmark", "posix_ipc", "faster-fifo",
                                              "pyzmq", "iceoryx2", "psutil")},
        "viridian_commit": commit + (" (csrc/ or vmbus/ modified)" if dirty else ""),
        "extension": _extension_info(),
        "load_avg": "start {:.2f} {:.2f} {:.2f}, end {:.2f} {:.2f} {:.2f}".format(
            *start["load"], *os.getloadavg()),
        "started": dt.datetime.fromtimestamp(start["time"], dt.UTC).isoformat(
            timespec="seconds"),
        "duration_s": round(time.time() - start["time"], 1),
        "mode": "QUICK (timings not meaningful)" if cfg.quick else "full",
        "leftovers": _leftovers(start),
    }


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    store = config.stash.get(_STORE, None)
    cfg = config.stash.get(_CFG, None)
    if store is None or cfg is None:
        return
    if not (store["stream"] or store["latency"] or store["idle"] or store["paired"]
            or store["channels"].keys() - {"leftovers"}
            or (store.get("storage") or {}).get("rows")):
        return
    system = _system(cfg, config.stash[_START])
    lines, doc = report.build(store, cfg.as_dict(), system)
    tr = terminalreporter
    tr.write_sep("=", "Viridian benchmarks (issues 2, 4 and 7)")
    for line in lines:
        tr.write_line(line)
    with contextlib.suppress(OSError):
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / "latest.json"
        path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        tr.write_line(f"JSON: {path}")
