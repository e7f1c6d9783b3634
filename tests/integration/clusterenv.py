"""Shared helpers for the integration tests: a private run directory and the
real ``viridian`` CLI pointed at it (``Env``), the status schema as a tool
would check it, the leak check, waits with deadlines.  The ``env`` fixture
lives in conftest.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import BaseModel, ConfigDict

from hv.control import ControlClient
from hv.rundir import RunDir, cluster_processes

CLI_TIMEOUT_S = 60.0
LEAVES_LINE = re.compile(
    r"stopped (\d+) partitions in [\d.]+ s; 0 processes, 0 shm, 0 mq, 0 sockets left")


# -- the status schema (docs/status-schema.md), as a tool would check it ----------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class MemoryStatus(_Strict):
    assigned_bytes: int
    guest_visible_bytes: int | None


class CpuStatus(_Strict):
    weight: int
    limit_percent: float
    reserve_percent: float
    usage_percent: float


class PartitionStatus(_Strict):
    name: str
    role: Literal["root", "child"]
    pid: int | None
    state: Literal["starting", "running", "stopping", "stopped", "crashed", "restarting"]
    restarts: int
    uptime_s: float
    memory: MemoryStatus
    cpu: CpuStatus
    channels: list[Any]


class ClusterStatus(_Strict):
    schema_version: int
    cluster: str
    supervisor_pid: int
    partitions: list[PartitionStatus]


# -- fixtures and helpers ---------------------------------------------------------------------


class Env:
    """A private run directory and the CLI pointed at it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.env = {**os.environ, "VIRIDIAN_RUNTIME_DIR": str(base), "NO_COLOR": "1",
                    "VIRIDIAN_DATA_DIR": str(base / "data"),
                    "COLUMNS": "80"}
        self.started: list[str] = []

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "partitions.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def static_config(self) -> Path:
        """The embedded default with dynamic memory off: a cluster whose
        memory moves only when a test moves it (the balancer would shrink
        idle children within seconds)."""
        from hv.config import default_config, dump_toml

        path = self.base / "static.toml"
        if not path.exists():
            c = default_config()
            parts = [p.model_copy(update={"memory": p.memory.model_copy(
                update={"dynamic": False})}) for p in c.partitions]
            path.write_text(dump_toml(c.model_copy(update={"partitions": parts})))
        return path

    def up(self, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """``viridian up --detach``; without ``--config``, the default cluster
        with dynamic memory off (``static_config``)."""
        self.started.append(name)
        if "--config" not in extra and "-c" not in extra:
            extra = ("--config", str(self.static_config()), *extra)
        r = self.cli("up", "--detach", "--name", name, *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    def wait_channels(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """Until every child reports every channel open (and Dynamic Memory,
        where there is one, negotiated): ``up`` returns when the partitions
        said hello, a few ms before their channels are open."""
        def ready(st: dict[str, Any]) -> bool:
            for p in st["partitions"]:
                if p["role"] != "child":
                    continue
                if p["state"] != "running" or len(p["channels"]) < len(p["devices"]):
                    return False
                for c in p["channels"]:
                    if c["state"] != "open" or c.get("device", {}).get("state") not in (
                            None, "ready"):
                        return False
            return True
        return self.wait_status(name, ready, timeout)

    def rundir(self, name: str) -> RunDir:
        return RunDir(name, self.base)

    def client(self, name: str) -> ControlClient:
        return ControlClient(self.rundir(name).control_socket, timeout=5.0)

    def status(self, name: str) -> dict[str, Any]:
        with self.client(name) as c:
            st = c.request("status")["status"]
        ClusterStatus.model_validate(st)
        return st

    def part(self, name: str, pname: str) -> dict[str, Any]:
        return next(p for p in self.status(name)["partitions"] if p["name"] == pname)

    def wait_status(self, name: str, pred: Callable[[dict[str, Any]], bool],
                    timeout: float = 10.0) -> dict[str, Any]:
        """Poll the status until ``pred`` holds; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(name)
            if pred(st):
                return st
            assert time.monotonic() < deadline, f"timed out; last status: {st}"
            time.sleep(0.02)


def _unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def make_env() -> Iterator[Env]:
    base = Path(tempfile.mkdtemp(prefix="vir-"))  # short: AF_UNIX paths are <= 107 bytes
    e = Env(base)
    try:
        yield e
    finally:
        for name in e.started:
            try:
                e.cli("down", "--name", name, timeout=30)
            except subprocess.TimeoutExpired:
                pass
            procs = cluster_processes(name)
            for p in procs:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=5)
            rd = e.rundir(name)
            if rd.supervisor() is None:
                rd.sweep()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_no_leaks(env: Env, name: str, pids: list[int], timeout: float = 5.0) -> None:
    """Nothing of cluster ``name`` is left: processes, shm, mq, sockets, cgroups."""
    rd = env.rundir(name)
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if not gone(pid)]
        left = rd.leftovers()
        if not alive and not left:
            break
        assert time.monotonic() < deadline, f"left behind: pids {alive}; {left.describe()}"
        time.sleep(0.02)  # the cgroup reaper may still be finishing after kill -9
    assert not rd.control_socket.exists()
    assert not rd.pid_file.exists()
    shm = [n for n in os.listdir("/dev/shm") if n.startswith(f"viridian-{name}-")]
    assert shm == []


def settled_fds(proc: psutil.Process, timeout: float = 5.0) -> int:
    """The process's open fd count once it stops changing for a moment.

    A control connection the test just closed is still open in the
    supervisor until its loop reads the EOF, so a single count can be one
    high; a leak stays."""
    deadline = time.monotonic() + timeout
    last = proc.num_fds()
    while time.monotonic() < deadline:
        time.sleep(0.05)  # sampling interval of a settling measurement
        now = proc.num_fds()
        if now == last:
            return now
        last = now
    return last


def fds_at_most(proc: psutil.Process, limit: int, timeout: float = 5.0) -> bool:
    """True once ``proc`` has at most ``limit`` open fds (polled up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while proc.num_fds() > limit:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def all_pids(st: dict[str, Any]) -> list[int]:
    return [st["supervisor_pid"]] + [p["pid"] for p in st["partitions"] if p["pid"]]


def events_until(c: ControlClient, pred: Callable[[dict[str, Any]], bool],
                 timeout: float = 10.0) -> list[dict[str, Any]]:
    """Events from a watching connection up to and including the first that matches."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; events so far: {seen}"
        ev = next(c.events(left), None)
        assert ev is not None, f"supervisor went away; events so far: {seen}"
        seen.append(ev)
        if pred(ev):
            return seen


def _log_records(env: Env, name: str, partition: str) -> list[dict[str, Any]]:
    import json

    path = env.rundir(name).log_file(partition)
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
