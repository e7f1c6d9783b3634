"""The per-user run directory: one folder per cluster, and the sweep after a crash.

Layer: hv.  Layout (``viridian up`` prints where ``BASE`` is)::

    BASE/                      $VIRIDIAN_RUNTIME_DIR, else platformdirs'
                               user_runtime_dir("viridian") when $XDG_RUNTIME_DIR
                               is usable, else /tmp/viridian-$UID   (mode 0700)
      CLUSTER/
        supervisor.lock        flock()ed by the live supervisor: one per name
        supervisor.pid         {"pid": ..., "create_time": ...} while it runs
        control.sock           the control socket (hv/control.py), mode 0600
        manifest.json          every OS object the cluster holds, kept current
        config.toml            the configuration the supervisor runs
        logs/NAME.jsonl        one JSON-lines log per partition (and supervisor.jsonl)
        logs/NAME.stderr       what escaped a partition's logger (tracebacks)
        logs.prev/             the logs of the last crashed run, kept by the sweep

A cluster is *running* when its pid file names a live process with the same
start time; it is *stale* when a pid file, socket or manifest is left but the
supervisor is gone (kill -9).  ``sweep`` removes what a stale cluster left: the
processes still alive under its name, the named POSIX objects in its manifest
or with its prefix, its socket, pid file and manifest; the logs move to
``logs.prev``.  The same check after a clean ``down`` is ``leftovers``.

Named POSIX objects of a cluster start with ``/viridian-CLUSTER-`` so that a
sweep finds them even when the manifest missed one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import psutil

__all__ = [
    "NAME_RE",
    "Leftovers",
    "Manifest",
    "RunDir",
    "cluster_processes",
    "list_clusters",
    "process_title",
    "runtime_base",
]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
"""Cluster and partition names: they appear in process titles and file names."""

_ENV = "VIRIDIAN_RUNTIME_DIR"
_SHM = Path("/dev/shm")
_MQUEUE = Path("/dev/mqueue")


def runtime_base() -> Path:
    """The per-user base run directory, created 0700 if missing."""
    env = os.environ.get(_ENV)
    if env:
        base = Path(env)
    else:
        base = Path(f"/tmp/viridian-{os.getuid()}")
        if os.environ.get("XDG_RUNTIME_DIR"):
            import platformdirs

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                candidate = Path(platformdirs.user_runtime_dir("viridian"))
            if not caught:  # platformdirs fell back to /tmp itself: use our own fallback
                base = candidate
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{base}: not a directory owned by uid {os.getuid()}")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(base, 0o700)
    return base


def list_clusters(base: Path | None = None) -> list[str]:
    """Names of clusters that have a pid file (running or stale), sorted."""
    base = base or runtime_base()
    return sorted(d.name for d in base.iterdir() if (d / "supervisor.pid").exists())


def process_title(cluster: str, name: str) -> str:
    """What ``ps`` shows for a process of the cluster: ``viridian[CLUSTER]: NAME``."""
    return f"viridian[{cluster}]: {name}"


def shm_prefix(cluster: str) -> str:
    """The prefix of every named POSIX object of a cluster (without the leading /)."""
    return f"viridian-{cluster}-"


def _proc_matches(pid: int, create_time: float | None) -> psutil.Process | None:
    """The live (non-zombie) process ``pid`` if it started at ``create_time``."""
    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 0.05:
            return None  # the pid was reused
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.Error:
        return None


def cluster_processes(cluster: str) -> list[psutil.Process]:
    """Live processes that belong to ``cluster``: by title, or by the command line a
    partition or supervisor has before it sets its title."""
    title = f"viridian[{cluster}]:"
    group = f"/viridian/{cluster} "
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] == psutil.STATUS_ZOMBIE or not cmd:
            continue
        line = " ".join(cmd) + " "
        if line.startswith(title) or (
            # hv/cpu.py's cgroup reaper of this cluster (it outlives a killed supervisor)
            ("viridian-cgroup-reaper" in line or "hv.cpu reap" in line) and group in line
        ) or (
            any(c in ("partitions.root", "partitions.child", "hv.supervisor",
                      "partitions.root.ideworker") for c in cmd)
            and "--cluster" in cmd
            and cmd[cmd.index("--cluster") + 1 : cmd.index("--cluster") + 2] == [cluster]
        ):
            out.append(p)
    return out


@dataclass
class Leftovers:
    """What a cluster left in the OS; empty after a clean stop."""

    processes: list[tuple[int, str]] = field(default_factory=list)
    shm: list[str] = field(default_factory=list)
    mq: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.processes or self.shm or self.mq or self.sockets or self.cgroups)

    def counts(self) -> str:
        """``0 processes, 0 shm, 0 mq, 0 sockets`` (cgroups only when there are some)."""
        s = (f"{len(self.processes)} processes, {len(self.shm)} shm, {len(self.mq)} mq, "
             f"{len(self.sockets)} sockets")
        return s + (f", {len(self.cgroups)} cgroups" if self.cgroups else "")

    def describe(self) -> str:
        parts = []
        if self.processes:
            parts.append("processes " + ", ".join(f"{pid} ({t})" for pid, t in self.processes))
        if self.shm:
            parts.append("shm " + ", ".join(self.shm))
        if self.mq:
            parts.append("mq " + ", ".join(self.mq))
        if self.sockets:
            parts.append("sockets " + ", ".join(self.sockets))
        if self.cgroups:
            parts.append("cgroups " + ", ".join(self.cgroups))
        return "; ".join(parts)


class Manifest:
    """Every OS object a cluster holds, written atomically on each change.

    Kinds: ``process`` (pid, create_time, name), ``shm`` and ``mq`` (POSIX
    names), ``socket`` (a path), ``cgroup`` (a directory).  The supervisor is the
    only writer; the sweep after a crash is the reader.
    """

    def __init__(self, path: Path, cluster: str) -> None:
        self.path = path
        self.data: dict[str, object] = {"cluster": cluster, "objects": []}

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
            return None
        m = cls(path, str(data.get("cluster", "")))
        m.data = data
        return m

    @property
    def objects(self) -> list[dict[str, object]]:
        """The recorded objects (entries that are not objects are ignored)."""
        return [o for o in self._list() if isinstance(o, dict)]

    def add(self, kind: str, save: bool = True, **fields: object) -> None:
        self._list().append({"kind": kind, **fields})
        if save:
            self.save()

    def remove(self, kind: str, save: bool = True, **match: object) -> None:
        objs = self._list()
        objs[:] = [o for o in objs if not (o.get("kind") == kind
                                          and all(o.get(k) == v for k, v in match.items()))]
        if save:
            self.save()

    def _list(self) -> list[dict[str, object]]:
        objs = self.data["objects"]
        assert isinstance(objs, list)
        return objs

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


@dataclass
class SupervisorInfo:
    pid: int
    create_time: float


class RunDir:
    """The run directory of one cluster (it need not exist yet)."""

    def __init__(self, cluster: str, base: Path | None = None) -> None:
        self.cluster = cluster
        self.base = base or runtime_base()
        self.path = self.base / cluster
        self.lock_file = self.path / "supervisor.lock"
        self.pid_file = self.path / "supervisor.pid"
        self.control_socket = self.path / "control.sock"
        self.manifest_file = self.path / "manifest.json"
        self.config_file = self.path / "config.toml"
        self.logs = self.path / "logs"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.jsonl"

    def create(self) -> None:
        self.path.mkdir(mode=0o700, exist_ok=True)
        self.logs.mkdir(mode=0o700, exist_ok=True)

    # -- the supervisor's side -------------------------------------------------------

    def lock(self) -> int:
        """Take the cluster's lock for the life of the calling process.

        Returns:
            the lock fd (keep it open; the kernel drops the lock at exit, kill -9 too).

        Raises:
            BlockingIOError: another live supervisor holds it.
        """
        self.create()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BlockingIOError(errno.EWOULDBLOCK, "cluster is locked") from None
        return fd

    def write_pid(self) -> None:
        me = psutil.Process()
        tmp = self.pid_file.with_name("supervisor.pid.tmp")
        tmp.write_text(json.dumps({"pid": me.pid, "create_time": me.create_time()}))
        os.replace(tmp, self.pid_file)

    # -- everyone's side -------------------------------------------------------------

    def supervisor(self) -> SupervisorInfo | None:
        """The live supervisor of this cluster, or None."""
        try:
            data = json.loads(self.pid_file.read_text())
            info = SupervisorInfo(int(data["pid"]), float(data["create_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return info if _proc_matches(info.pid, info.create_time) else None

    def is_stale(self) -> bool:
        """True when a dead supervisor left state behind (and none is running)."""
        if self.supervisor() is not None:
            return False
        return (self.pid_file.exists() or self.manifest_file.exists()
                or self.control_socket.exists() or is_socket(self.control_socket))

    def leftovers(self, manifest: Manifest | None = None) -> Leftovers:
        """What the cluster holds in the OS right now (processes, named objects, sockets).

        Args:
            manifest: a manifest read earlier (e.g. before a stop); the one on disk
                is read too.
        """
        out = Leftovers()
        mans = [m for m in (manifest, Manifest.load(self.manifest_file)) if m is not None]
        procs: dict[int, str] = {}
        for p in cluster_processes(self.cluster):
            with contextlib.suppress(psutil.Error):
                procs[p.pid] = " ".join(p.cmdline())[:60]
        for m in mans:
            for o in m.objects:
                if o.get("kind") == "process":
                    pid, ct = o.get("pid"), o.get("create_time")
                    if isinstance(pid, int) and _proc_matches(
                            pid, float(ct) if isinstance(ct, int | float) else None):
                        procs.setdefault(pid, str(o.get("name", "?")))
        out.processes = sorted(procs.items())
        shm = {f"/{n}" for n in _listdir(_SHM) if n.startswith(shm_prefix(self.cluster))}
        mq = {f"/{n}" for n in _listdir(_MQUEUE) if n.startswith(shm_prefix(self.cluster))}
        cg: set[str] = set()
        for m in mans:
            for o in m.objects:
                kind, name = o.get("kind"), str(o.get("name", ""))
                if kind == "shm" and (_SHM / name.lstrip("/")).exists():
                    shm.add(name)
                elif kind == "mq" and _mq_exists(name):
                    mq.add(name)
                elif kind == "cgroup" and os.path.isdir(name):
                    cg.add(name)
        cg.update(str(d) for d in cgroup_dirs(self.cluster) if d.is_dir())
        out.shm, out.mq, out.cgroups = sorted(shm), sorted(mq), sorted(cg)
        if self.path.is_dir():
            out.sockets = sorted(str(p) for p in self.path.rglob("*") if is_socket(p))
        return out

    def sweep(self, timeout: float = 2.0) -> Leftovers:
        """Remove everything a dead (or just stopped) cluster left behind.

        Kills its processes (SIGKILL, then waits up to ``timeout``), unlinks its
        named objects and sockets, removes cgroups, the pid file and the
        manifest, and moves the logs of a crashed run to ``logs.prev``.  Refuses
        to touch a cluster whose supervisor is alive.

        Returns:
            what was found (and removed).
        """
        if self.supervisor() is not None:
            raise RuntimeError(f"cluster {self.cluster!r} is running; stop it first")
        manifest = Manifest.load(self.manifest_file)
        found = self.leftovers(manifest)
        procs = []
        for pid, _ in found.processes:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                p.send_signal(signal.SIGKILL)
                procs.append(p)
        psutil.wait_procs(procs, timeout=timeout)
        for name in found.shm:
            with contextlib.suppress(OSError):
                os.unlink(_SHM / name.lstrip("/"))
        for name in found.mq:
            _mq_unlink(name)
        for path in found.sockets:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if found.cgroups:
            try:
                from hv.cpu import sweep_groups
            except ImportError:
                sweep_groups = None  # type: ignore[assignment]
            if sweep_groups is not None:
                sweep_groups(self.cluster)
            for path in found.cgroups:
                _rmdir_cgroup(Path(path))
        crashed = self.pid_file.exists() or manifest is not None
        for f in (self.pid_file, self.manifest_file):
            with contextlib.suppress(OSError):
                f.unlink()
        if crashed and self.logs.is_dir() and any(self.logs.iterdir()):
            prev = self.path / "logs.prev"
            shutil.rmtree(prev, ignore_errors=True)
            os.replace(self.logs, prev)
        return found


def cgroup_dirs(cluster: str) -> list[Path]:
    """Where hv/cpu.py puts a cluster's CPU groups (cgroup v2 and v1 layouts)."""
    root = Path("/sys/fs/cgroup")
    return [root / sub / "viridian" / cluster for sub in ("", "cpu", "cpu,cpuacct", "cpuacct,cpu")]


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _mq_exists(name: str) -> bool:
    try:
        import posix_ipc
    except ImportError:  # pragma: no cover - a dependency
        return False
    try:
        posix_ipc.MessageQueue(name).close()
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.Error:
        return True  # exists, but we may not open it
    return True


def _mq_unlink(name: str) -> None:
    try:
        import posix_ipc

        posix_ipc.unlink_message_queue(name)
    except Exception:  # already gone, or not ours to remove
        pass


def _rmdir_cgroup(path: Path, timeout: float = 1.0) -> None:
    """rmdir a cgroup once its (killed) tasks have left it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
