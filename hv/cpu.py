"""CPU arbitration like Hyper-V's processor settings: weight, limit, reserve.

Layer: hv.  ``CpuArbiter`` puts each partition's processes under one of
three mechanisms and changes their settings live:

``cgroup-v2``  ``/sys/fs/cgroup/viridian/<cluster>/<partition>`` with
               ``cpu.weight`` and ``cpu.max``;
``cgroup-v1``  ``/sys/fs/cgroup/cpu/viridian/<cluster>/<partition>`` with
               ``cpu.shares`` and ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``;
``userspace``  anywhere: a credit scheduler in the supervisor that stops and
               continues partitions (SIGSTOP / SIGCONT through pidfds, as
               ``psutil.Process.suspend`` / ``resume`` do, but immune to PID
               reuse).

``auto`` picks the first that works here (``detect_mechanism``).

Settings (``CpuSettings``), with Hyper-V's ranges:

* **weight** 1..10000 (default 100): relative share under contention.  v2
  uses it as ``cpu.weight`` directly; v1 as ``cpu.shares = 26 * weight``
  (26..260000, so ratios stay exact); userspace as the weight of a weighted
  fair queue.
* **limit** (cap) in % of one CPU, (0, 100 * ncpus], None = no cap:
  ``cpu.max`` / CFS quota over a 100 ms period, or a token bucket.
* **reserve** (floor) in % of one CPU, 0..100: no controller has a CPU floor,
  so a reserve is turned into weight: the arbiter raises the partition's
  effective weight until, with every partition busy, its proportional share
  of the machine is at least the reserve (``effective_weights``).  The sum
  of reserves may not exceed the machine, and a reserve may not exceed the
  partition's limit (``CpuSettingsError`` says which).

Usage is measured per partition from ``/proc/<pid>/task/*/schedstat``
(nanosecond run time) whatever the mechanism: ``usage()``.

Leftovers: groups are removed when a partition or the arbiter goes away
(remaining tasks are moved to the root group first).  A cgroup directory is a
kernel object that survives its creator, so for kill -9 of the supervisor the
cgroup mechanisms start a tiny reaper process (``python -m hv.cpu reap``, in
its own session) that waits for the supervisor to vanish, waits for the
partitions to exit (they die with their supervisor) and removes the
cluster's groups.  ``sweep_groups`` removes the groups of a crashed cluster
at the next start.  The userspace mechanism leaves nothing behind by
construction, and a stopped partition still dies with its supervisor
(SIGKILL works on stopped processes).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = [
    "MECHANISMS",
    "CpuArbiter",
    "CpuSettings",
    "CpuSettingsError",
    "CpuUsage",
    "detect_mechanism",
    "effective_weights",
    "read_cpu_ns",
    "sweep_groups",
]

MECHANISMS = ("cgroup-v2", "cgroup-v1", "userspace")
CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP_PREFIX = "viridian"
SHARES_PER_WEIGHT = 26  # v1: weight 1..10000 -> shares 26..260000 (max 262144)
CFS_PERIOD_US = 100_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CpuSettingsError(ValueError):
    """Settings out of range or not satisfiable; the message names the rule."""


@dataclass(frozen=True)
class CpuSettings:
    """Hyper-V-style processor settings of one partition."""

    weight: int = 100
    limit_percent: float | None = None  # % of one CPU; None: no cap
    reserve_percent: float = 0.0  # % of one CPU

    def check(self, name: str = "partition", ncpus: int | None = None) -> None:
        ncpus = ncpus or os.cpu_count() or 1
        if isinstance(self.weight, bool) or not isinstance(self.weight, int):
            raise CpuSettingsError(f"{name}: cpu weight must be an integer 1-10000")
        if not 1 <= self.weight <= 10000:
            raise CpuSettingsError(f"{name}: cpu weight {self.weight} is not in 1-10000")
        lim = self.limit_percent
        if lim is not None and not (0 < lim <= 100 * ncpus):
            raise CpuSettingsError(
                f"{name}: cpu limit {lim:g} % is not in (0, {100 * ncpus}] (% of one CPU)"
            )
        if not 0 <= self.reserve_percent <= 100:
            raise CpuSettingsError(
                f"{name}: cpu reserve {self.reserve_percent:g} % is not in 0-100"
            )
        if lim is not None and self.reserve_percent > lim:
            raise CpuSettingsError(
                f"{name}: cpu reserve {self.reserve_percent:g} % is above its limit {lim:g} %"
            )


@dataclass(frozen=True)
class CpuUsage:
    usage_percent: float  # % of one CPU over the last window
    cpu_seconds: float  # total since the partition was added
    window_s: float
    suspended: bool = False  # userspace: held back right now


def effective_weights(
    settings: dict[str, CpuSettings], ncpus: int | None = None
) -> dict[str, float]:
    """Weights that honour reserves: with every partition busy, a partition's
    proportional share of the machine (``ncpus`` CPUs) is at least its
    reserve.  Partitions without a binding reserve keep their configured
    weight; the others get exactly the weight their reserve needs.

    Raises CpuSettingsError if the reserves exceed the machine."""
    ncpus = ncpus or os.cpu_count() or 1
    cap = 100.0 * ncpus
    total_r = sum(s.reserve_percent for s in settings.values())
    if total_r > cap + 1e-9:
        raise CpuSettingsError(
            f"cpu reserves add up to {total_r:g} % but the machine has {ncpus} CPUs ({cap:g} %)"
        )
    bound: set[str] = set()
    while True:
        free_w = sum(s.weight for n, s in settings.items() if n not in bound)
        r_b = sum(settings[n].reserve_percent for n in bound) / cap
        if free_w == 0:
            # every partition is reserve-bound: weights proportional to reserves
            return {n: max(s.reserve_percent, 1e-3) for n, s in settings.items()}
        if r_b >= 1.0 - 1e-9:
            # the bound reserves fill the machine: they split it by reserve, and
            # the others get a token weight (they run only when those idle)
            return {
                n: (s.reserve_percent if n in bound else 1e-3) for n, s in settings.items()
            }
        total = free_w / (1.0 - r_b)
        newly = {
            n
            for n, s in settings.items()
            if n not in bound
            and s.reserve_percent > 0
            and s.weight / total < s.reserve_percent / cap
        }
        if not newly:
            return {
                n: (s.reserve_percent / cap * total if n in bound else float(s.weight))
                for n, s in settings.items()
            }
        bound |= newly


# --- measurement -------------------------------------------------------------------


def read_cpu_ns(pid: int) -> tuple[int, int] | None:
    """(run time, run-queue wait) in ns, summed over the threads of ``pid``,
    from /proc/<pid>/task/*/schedstat; None if the process is gone."""
    run = wait = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                a, b, _ = f.read().split(None, 2)
        except (OSError, ValueError):
            continue
        run += int(a)
        wait += int(b)
    return run, wait


@dataclass
class _Part:
    name: str
    settings: CpuSettings
    pids: dict[int, int] = field(default_factory=dict)  # pid -> pidfd
    base: dict[int, tuple[int, int]] = field(default_factory=dict)  # at attach
    last: dict[int, tuple[int, int]] = field(default_factory=dict)  # latest reading
    dead_run: int = 0
    dead_wait: int = 0
    # usage window
    win_t: float = 0.0
    win_run: int = 0
    usage_percent: float = 0.0
    # userspace scheduler state
    tick_run: int = 0
    tick_wait: int = 0
    vt: float = 0.0  # virtual time: run ns / weight
    tokens: float = 0.0  # limit token bucket, ns
    stop_limit: bool = False
    stop_weight: bool = False
    victims: set[str] = field(default_factory=set)  # who it was stopped for
    idle_ns: float = 0.0  # how long it has neither run nor waited
    cpus: frozenset[int] = frozenset()  # union of its processes' affinities

    def refresh_cpus(self) -> None:
        cpus: set[int] = set()
        for pid in self.pids:
            with contextlib.suppress(OSError):
                cpus |= os.sched_getaffinity(pid)
        self.cpus = frozenset(cpus)

    def totals(self) -> tuple[int, int]:
        """(run, wait) ns since attach, over live and exited pids."""
        run, wait = self.dead_run, self.dead_wait
        for pid in list(self.pids):
            v = read_cpu_ns(pid)
            b = self.base.get(pid, (0, 0))
            if v is None:  # exited: keep what it used until its last reading
                last = self.last.pop(pid, b)
                self.dead_run += last[0] - b[0]
                self.dead_wait += last[1] - b[1]
                run += last[0] - b[0]
                wait += last[1] - b[1]
                self.base.pop(pid, None)
                os.close(self.pids.pop(pid))
                continue
            self.last[pid] = v
            run += v[0] - b[0]
            wait += v[1] - b[1]
        return run, wait

    @property
    def stopped(self) -> bool:
        return self.stop_limit or self.stop_weight


# --- mechanisms ----------------------------------------------------------------------


def _check_name(what: str, name: str) -> None:
    if not _NAME.match(name) or name in (".", ".."):
        raise CpuSettingsError(f"{what} name {name!r} cannot name a cgroup")


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _procs(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _remove_group(path: Path, parent_procs: Path) -> bool:
    """Move the group's tasks to ``parent_procs`` and rmdir it; True if gone."""
    if not path.is_dir():
        return True
    for child in [p for p in path.iterdir() if p.is_dir()]:
        _remove_group(child, parent_procs)
    for _ in range(3):
        for pid in _procs(path):
            with contextlib.suppress(OSError):
                _write(parent_procs, str(pid))
        try:
            path.rmdir()
            return True
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                return False
    return False


class _Cgroup:
    """Shared logic of the two cgroup versions."""

    version = 0

    def __init__(self, root: Path, cluster: str) -> None:
        self.root = root
        self.base = root / GROUP_PREFIX
        self.cluster_dir = self.base / cluster
        self._prepare()

    def _prepare(self) -> None:
        for attempt in range(3):
            self.base.mkdir(exist_ok=True)
            try:
                self.cluster_dir.mkdir(exist_ok=True)
                return
            except FileNotFoundError:  # an empty base removed under us (_can_mkdir, close)
                if attempt == 2:
                    raise

    def group(self, name: str) -> Path:
        return self.cluster_dir / name

    def add(self, name: str) -> None:
        self.group(name).mkdir(exist_ok=True)

    def attach(self, name: str, pid: int) -> None:
        _write(self.group(name) / "cgroup.procs", str(pid))

    def apply(self, name: str, weight: float, limit: float | None) -> None:
        raise NotImplementedError

    # The cluster's group competes with its siblings (other clusters, and in
    # v1 every task of the root group at 1024 shares).  So that a cluster
    # weighs what its partitions would weigh as plain processes, the cluster
    # group gets the sum of its partitions' weights (in "processes at weight
    # 100"), and the viridian group the sum of its clusters.
    WEIGHT_FILE = ""

    def _level_value(self, processes: float) -> str:
        raise NotImplementedError

    def _level_processes(self, value: str) -> float:
        raise NotImplementedError

    def apply_total(self, total_weight: float) -> None:
        with contextlib.suppress(OSError):
            _write(self.cluster_dir / self.WEIGHT_FILE, self._level_value(total_weight / 100))
        self._update_base()

    def _update_base(self) -> None:
        total = 0.0
        with contextlib.suppress(OSError):
            for d in self.base.iterdir():
                if d.is_dir():
                    with contextlib.suppress(OSError, ValueError):
                        total += self._level_processes((d / self.WEIGHT_FILE).read_text())
        if total > 0:
            with contextlib.suppress(OSError):
                _write(self.base / self.WEIGHT_FILE, self._level_value(total))

    def remove(self, name: str) -> bool:
        return _remove_group(self.group(name), self.root / "cgroup.procs")

    def close(self) -> bool:
        ok = _remove_group(self.cluster_dir, self.root / "cgroup.procs")
        try:
            self.base.rmdir()  # fails while another cluster runs: then re-weigh it
        except OSError:
            self._update_base()
        return ok


class _CgroupV1(_Cgroup):
    version = 1
    WEIGHT_FILE = "cpu.shares"

    def _level_value(self, processes: float) -> str:
        return str(min(262144, max(2, round(processes * 1024))))

    def _level_processes(self, value: str) -> float:
        return int(value) / 1024

    def apply(self, name: str, weight: float, limit: float | None) -> None:
        g = self.group(name)
        shares = min(262144, max(2, round(weight * SHARES_PER_WEIGHT)))
        _write(g / "cpu.shares", str(shares))
        _write(g / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        quota = -1 if limit is None else max(1000, round(limit / 100 * CFS_PERIOD_US))
        _write(g / "cpu.cfs_quota_us", str(quota))


class _CgroupV2(_Cgroup):
    version = 2
    WEIGHT_FILE = "cpu.weight"

    def _level_value(self, processes: float) -> str:
        return str(min(10000, max(1, round(processes * 100))))

    def _level_processes(self, value: str) -> float:
        return int(value) / 100

    def _prepare(self) -> None:
        super()._prepare()
        for d in (self.root, self.base, self.cluster_dir):
            ctl = d / "cgroup.subtree_control"
            try:
                if "cpu" not in ctl.read_text().split():
                    _write(ctl, "+cpu")
            except OSError:
                _write(ctl, "+cpu")

    def apply(self, name: str, weight: float, limit: float | None) -> None:
        g = self.group(name)
        _write(g / "cpu.weight", str(min(10000, max(1, round(weight)))))
        quota = "max" if limit is None else str(max(1000, round(limit / 100 * CFS_PERIOD_US)))
        _write(g / "cpu.max", f"{quota} {CFS_PERIOD_US}")


def _v1_root(root: Path) -> Path | None:
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        p = root / name
        if (p / "cpu.shares").exists():
            return p
    return None


def detect_mechanism(root: Path | str = CGROUP_ROOT) -> str:
    """The best mechanism usable here: cgroup-v2, cgroup-v1 or userspace.

    ``VIRIDIAN_CPU_MECHANISM`` overrides it.  A cgroup version counts only if
    its cpu controller is there and a group can be made under it."""
    forced = os.environ.get("VIRIDIAN_CPU_MECHANISM", "").strip()
    if forced:
        if forced not in MECHANISMS:
            raise CpuSettingsError(f"VIRIDIAN_CPU_MECHANISM={forced!r}: use one of {MECHANISMS}")
        return forced
    root = Path(root)
    ctl = root / "cgroup.controllers"
    with contextlib.suppress(OSError):
        if "cpu" in ctl.read_text().split() and _can_mkdir(root):
            return "cgroup-v2"
    v1 = _v1_root(root)
    if v1 is not None and _can_mkdir(v1):
        return "cgroup-v1"
    return "userspace"


def _can_mkdir(parent: Path) -> bool:
    probe = parent / GROUP_PREFIX
    existed = probe.is_dir()
    try:
        probe.mkdir(exist_ok=True)
    except OSError:
        return False
    ok = os.access(probe, os.W_OK)
    if not existed:  # a probe leaves nothing behind (a cluster's use makes it again)
        with contextlib.suppress(OSError):
            probe.rmdir()
    return ok


def sweep_groups(
    cluster: str | None = None,
    *,
    root: Path | str = CGROUP_ROOT,
    is_live: Callable[[str], bool] | None = None,
) -> list[str]:
    """Remove the groups of ``cluster`` (or of every cluster for which
    ``is_live(name)`` is False) under both cgroup versions; returns the
    removed cluster group paths.  For ``viridian up`` after a crash."""
    root = Path(root)
    removed: list[str] = []
    candidates: list[tuple[Path, Path]] = []
    v1 = _v1_root(root)
    if v1 is not None:
        candidates.append((v1 / GROUP_PREFIX, v1 / "cgroup.procs"))
    if (root / "cgroup.controllers").exists():
        candidates.append((root / GROUP_PREFIX, root / "cgroup.procs"))
    for base, procs in candidates:
        if not base.is_dir():
            continue
        for d in base.iterdir():
            if not d.is_dir():
                continue
            doomed = (cluster is not None and d.name == cluster) or (
                cluster is None and is_live is not None and not is_live(d.name)
            )
            if doomed and _remove_group(d, procs):
                removed.append(str(d))
        with contextlib.suppress(OSError):
            base.rmdir()
    return removed


# --- the userspace credit scheduler ---------------------------------------------------


class _Userspace:
    """Weighted fair queueing at tick granularity, plus token-bucket caps.

    Each tick reads every partition's run time and run-queue wait.  Limit:
    a bucket earns ``limit`` of one CPU per second and pays for run time; a
    partition whose bucket is negative is stopped until it refills.
    Weight: virtual time advances by run time / weight; when some running
    partition had to wait for a CPU (it is contended), every partition
    more than ``slack`` ahead of it in virtual time is stopped until the
    running partitions catch up.  Nobody is stopped without contention, so
    it is work-conserving (two partitions on two idle CPUs both run flat
    out, whatever their weights).  Idle partitions do not bank credit.
    """

    TICK_S = 0.010  # while anything is busy or stopped
    IDLE_TICK_S = 0.2
    SLACK_NS = 5e6  # how far (in its own run time) a partition may run ahead
    BUCKET_NS = 20e6  # a capped partition may burst this much
    IDLE_NS = 100e6  # neither running nor waiting this long: idle

    def __init__(self) -> None:
        self.last_tick = 0.0
        self.busy = False

    def tick(self, parts: Iterable[_Part], weights: dict[str, float], now: float) -> None:
        parts = list(parts)
        dt_ns = (now - self.last_tick) * 1e9 if self.last_tick else 0.0
        self.last_tick = now
        used: dict[str, float] = {}
        waited: dict[str, float] = {}
        for p in parts:
            run, wait = p.totals()
            used[p.name] = max(0.0, float(run - p.tick_run))
            waited[p.name] = max(0.0, float(wait - p.tick_wait))
            p.tick_run, p.tick_wait = run, wait
        if dt_ns <= 0:
            return
        # caps
        for p in parts:
            lim = p.settings.limit_percent
            if lim is None:
                p.tokens, p.stop_limit = 0.0, False
                continue
            earned = lim / 100.0 * dt_ns
            p.tokens = min(p.tokens + earned - used[p.name], self.BUCKET_NS * lim / 100.0)
            p.stop_limit = p.tokens < 0
        # weights
        for p in parts:
            p.vt += used[p.name] / weights[p.name]
        # Active: wants CPU.  Run-queue wait is only booked when a task gets
        # a CPU, so a starved task can look idle for a tick or two: only a
        # partition that neither ran nor waited for IDLE_NS counts as idle.
        for p in parts:
            if p.stopped or used[p.name] > 0.01 * dt_ns or waited[p.name] > 0.01 * dt_ns:
                p.idle_ns = 0.0
            else:
                p.idle_ns += dt_ns
        active = [p for p in parts if p.idle_ns < self.IDLE_NS]
        if active:
            floor = min(p.vt for p in active)
            for p in parts:
                if p not in active:
                    p.vt = max(p.vt, floor)  # idle: no banked credit
        running = [p for p in active if not p.stopped]
        hungry = [p for p in running if waited[p.name] > 0.1 * dt_ns]
        for p in running:
            # p is stopped for the contended partitions it shares a CPU with
            # and is more than SLACK_NS of its own run time ahead of
            victims = {
                h.name
                for h in hungry
                if h is not p
                and h.cpus & p.cpus
                and (p.vt - h.vt) * weights[p.name] > self.SLACK_NS
            }
            if victims:
                p.stop_weight, p.victims = True, victims
        by_name = {p.name: p for p in parts}
        for p in parts:
            if not p.stop_weight:
                continue
            # continue it once every victim caught up, went idle or is stopped itself
            waiting_for = {
                v
                for v in p.victims
                if v in by_name
                and by_name[v] in active
                and not by_name[v].stopped
                and by_name[v].vt < p.vt
            }
            if not waiting_for:
                p.stop_weight, p.victims = False, set()
        self.busy = bool(active)

    def interval(self) -> float:
        return self.TICK_S if self.busy else self.IDLE_TICK_S


def _signal(p: _Part, sig: int) -> None:
    for fd in p.pids.values():
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(fd, sig)


# --- the arbiter ----------------------------------------------------------------------


class CpuArbiter:
    """CPU arbitration for one cluster's partitions.

    Args:
        cluster: the cluster's name (a cgroup directory name).
        mechanism: "auto" or one of ``MECHANISMS``.
        root: the cgroup mount (tests point it elsewhere).
        ncpus: CPUs the cluster may use (reserve arithmetic); default all.
        reaper: for cgroup mechanisms, start the reaper that removes the
            cluster's groups if this process dies without ``close()``.

    Thread-safe.  With the userspace mechanism somebody must call ``tick()``
    every ``interval()`` seconds: the supervisor's loop, or ``start()``'s
    thread.
    """

    def __init__(
        self,
        cluster: str,
        *,
        mechanism: str = "auto",
        root: Path | str = CGROUP_ROOT,
        ncpus: int | None = None,
        reaper: bool = True,
    ) -> None:
        _check_name("cluster", cluster)
        self.cluster = cluster
        self.ncpus = ncpus or len(os.sched_getaffinity(0)) or 1
        self._lock = threading.RLock()
        self._parts: dict[str, _Part] = {}
        self._weights: dict[str, float] = {}
        self._cg: _Cgroup | None = None
        self._us: _Userspace | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._reaper: subprocess.Popen[bytes] | None = None
        self._reaper_w = -1
        self._cpus_t = 0.0
        root = Path(root)
        if mechanism == "auto":
            mechanism = detect_mechanism(root)
        if mechanism not in MECHANISMS:
            raise CpuSettingsError(f"unknown cpu mechanism {mechanism!r}: use {MECHANISMS}")
        if mechanism == "cgroup-v2":
            self._cg = _CgroupV2(root, cluster)
        elif mechanism == "cgroup-v1":
            v1 = _v1_root(root)
            if v1 is None:
                raise CpuSettingsError(f"no cgroup v1 cpu controller under {root}")
            self._cg = _CgroupV1(v1, cluster)
        else:
            self._us = _Userspace()
        self.mechanism = mechanism
        if self._cg is not None and reaper:
            self._start_reaper()

    # -- partitions --

    def add_partition(self, name: str, settings: CpuSettings | None = None) -> None:
        settings = settings or CpuSettings()
        _check_name("partition", name)
        settings.check(name, self.ncpus)
        with self._lock:
            if name in self._parts:
                raise CpuSettingsError(f"{name} is already under CPU arbitration")
            trial = {n: p.settings for n, p in self._parts.items()}
            trial[name] = settings
            weights = effective_weights(trial, self.ncpus)
            part = _Part(name, settings, win_t=time.monotonic())
            if self._cg is not None:
                self._cg.add(name)
            self._parts[name] = part
            self._reweigh(weights)

    def attach(self, name: str, pid: int) -> None:
        """Put process ``pid`` (and its threads; children it forks later
        follow it in a cgroup) under ``name``'s settings."""
        with self._lock:
            part = self._parts[name]
            if pid in part.pids:
                return
            fd = os.pidfd_open(pid)
            part.pids[pid] = fd
            v = read_cpu_ns(pid)
            if v is not None:
                part.base[pid] = part.last[pid] = v
            if self._cg is not None:
                self._cg.attach(name, pid)
            part.refresh_cpus()

    def set(
        self,
        name: str,
        *,
        weight: int | None = None,
        limit_percent: float | type[...] | None = ...,
        reserve_percent: float | None = None,
    ) -> CpuSettings:
        """Change settings live; returns the new settings.  ``limit_percent
        =None`` removes the cap (leave it out to keep the current one)."""
        with self._lock:
            part = self._parts[name]
            new = part.settings
            if weight is not None:
                new = replace(new, weight=weight)
            if limit_percent is not ...:
                new = replace(new, limit_percent=limit_percent)  # type: ignore[arg-type]
            if reserve_percent is not None:
                new = replace(new, reserve_percent=reserve_percent)
            new.check(name, self.ncpus)
            trial = {n: p.settings for n, p in self._parts.items()}
            trial[name] = new
            weights = effective_weights(trial, self.ncpus)
            part.settings = new
            self._reweigh(weights)
            return new

    def settings(self, name: str) -> CpuSettings:
        return self._parts[name].settings

    def effective_weight(self, name: str) -> float:
        return self._weights[name]

    def _reweigh(self, weights: dict[str, float]) -> None:
        self._weights = weights
        if self._cg is not None:
            for n, p in self._parts.items():
                self._cg.apply(n, weights[n], p.settings.limit_percent)
            self._cg.apply_total(sum(weights.values()))

    def remove_partition(self, name: str) -> None:
        """Stop arbitrating ``name`` (its processes are continued if they
        were stopped, and its group removed)."""
        with self._lock:
            part = self._parts.pop(name, None)
            if part is None:
                return
            if part.stopped:
                _signal(part, signal.SIGCONT)
            for fd in part.pids.values():
                os.close(fd)
            if self._cg is not None:
                self._cg.remove(name)
            if self._parts:
                current = {n: p.settings for n, p in self._parts.items()}
                self._reweigh(effective_weights(current, self.ncpus))

    def partitions(self) -> list[str]:
        return list(self._parts)

    # -- measurement --

    def usage(self, min_window: float = 0.1) -> dict[str, CpuUsage]:
        """Measured usage per partition (% of one CPU) since the previous
        call (windows shorter than ``min_window`` repeat the last value)."""
        now = time.monotonic()
        out = {}
        with self._lock:
            for n, p in self._parts.items():
                run, _ = p.totals()
                win = now - p.win_t
                if win >= min_window:
                    p.usage_percent = max(0.0, (run - p.win_run) / 1e9 / win * 100.0)
                    p.win_t, p.win_run = now, run
                out[n] = CpuUsage(round(p.usage_percent, 2), run / 1e9, win, p.stopped)
        return out

    # -- the userspace mechanism's clock --

    def interval(self) -> float:
        """Seconds until ``tick`` should run again (inf: never needed)."""
        return math.inf if self._us is None else self._us.interval()

    def tick(self) -> None:
        """One scheduling step of the userspace mechanism (no-op otherwise)."""
        if self._us is None:
            return
        with self._lock:
            parts = list(self._parts.values())
            now = time.monotonic()
            if now - self._cpus_t > 1.0:  # affinities may change (taskset)
                self._cpus_t = now
                for p in parts:
                    p.refresh_cpus()
            before = {p.name: p.stopped for p in parts}
            self._us.tick(parts, self._weights, time.monotonic())
            for p in parts:
                if p.stopped != before[p.name]:
                    _signal(p, signal.SIGSTOP if p.stopped else signal.SIGCONT)

    def start(self) -> None:
        """Run ``tick`` in a daemon thread (userspace mechanism only)."""
        if self._us is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="viridian-cpu", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval()):
            try:
                self.tick()
            except Exception:  # never let the clock die; the next tick retries
                continue

    # -- reaper --

    def _start_reaper(self) -> None:
        assert self._cg is not None
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            self._reaper = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hv.cpu",
                    "reap",
                    str(self._cg.cluster_dir),
                    str(self._cg.root / "cgroup.procs"),
                    str(r),
                ],
                pass_fds=(r,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(r)
        self._reaper_w = w

    # -- lifetime --

    def close(self) -> None:
        """Continue every stopped partition, remove every group, stop the
        thread and the reaper."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._lock:
            for name in list(self._parts):
                self.remove_partition(name)
            if self._cg is not None:
                self._cg.close()
                self._cg = None
        if self._reaper_w >= 0:
            os.close(self._reaper_w)  # EOF: the reaper finds nothing left and exits
            self._reaper_w = -1
        if self._reaper is not None:
            try:
                self._reaper.wait(5)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None

    def __enter__(self) -> CpuArbiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reap(cluster_dir: str, root_procs: str, fd: int) -> int:
    """The reaper: wait for EOF on ``fd`` (the supervisor closed it or died),
    give the partitions up to 10 s to exit, then remove the groups."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.setproctitle(f"viridian-cgroup-reaper {cluster_dir}")
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP)
    while True:
        p.poll()
        try:
            if not os.read(fd, 64):
                break
        except OSError:
            break
    d = Path(cluster_dir)
    deadline = time.monotonic() + 10.0
    while d.is_dir() and time.monotonic() < deadline:
        if not any(_procs(g) for g in [d, *[x for x in d.iterdir() if x.is_dir()]]):
            break
        time.sleep(0.05)  # polling the kernel for exits; not synchronisation in tests
    _remove_group(d, Path(root_procs))
    with contextlib.suppress(OSError):
        d.parent.rmdir()
    return 0


if __name__ == "__main__":  # pragma: no cover - the reaper process
    if len(sys.argv) == 5 and sys.argv[1] == "reap":
        sys.exit(_reap(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    print("usage: python -m hv.cpu reap CLUSTER_DIR ROOT_PROCS FD", file=sys.stderr)
    sys.exit(2)
