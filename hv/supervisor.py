"""The supervisor: the process that plays the hypervisor for one cluster.

Layer: hv.  ``viridian up`` starts it (``python -m hv.supervisor --cluster NAME
--config FILE``); it starts the root partition, then, once the root runs, every
child, each as its own process (``python -m partitions.root`` /
``partitions.child``) holding a socketpair made for exactly that partition
(hv/link.py).  It watches them and serves the control socket (hv/control.py).

It stays thin: one thread, one ``selectors`` loop over

- a **pidfd** per partition (``os.pidfd_open``): readable the moment the
  process exits, kill -9 included; reaped with ``waitid(P_PIDFD)``, so there
  is no SIGCHLD handler and no pid-reuse race;
- each partition's **link** (hv/link.py): boot, hello, memory reports,
  hypercalls (routed by hv/services.py), and its SynIC's EOM eventfd;
- the **control socket** and its client connections;
- a wakeup socket for SIGTERM/SIGINT (``signal.set_wakeup_fd``);

and a timer heap (boot timeout, stop timeout, restart backoff).  With no
timer armed it sleeps in ``epoll_wait`` with no timeout: an idle cluster costs
no CPU.  It never carries channel data.

Partition states: ``starting`` (process spawned, no hello yet) -> ``running``
-> ``stopping`` (asked to stop; SIGKILL after STOP_TIMEOUT_S) -> ``stopped``.
An exit nobody asked for is ``crashed`` (non-zero status or a signal) or
``stopped`` (status 0); the restart policy (never | on-crash | always) may
then move it to ``restarting`` and, after a backoff of 0.1 s doubling to 5 s
(reset after 10 s of running), to ``starting`` again.

Cluster stop (``stop`` op, SIGTERM, SIGINT): children first, then the root,
then the supervisor itself; a second signal, or ``"force": true``, kills.
Partitions call ``die_with_parent()``, so kill -9 of the supervisor ends them
all within milliseconds; the next ``viridian up`` sweeps what it left
(hv/rundir.py).

Process threads: partitions are spawned from the main thread only:
PR_SET_PDEATHSIG fires when the *thread* that forked a child exits.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hv.config import ClusterConfig, ConfigError, PartitionConfig, load_config
from hv.control import PROTOCOL_VERSION, ControlError, LineReader, encode
from hv.hypercalls import Frame, FrameKind
from hv.jsonlog import JsonLog
from hv.link import SupervisorEnd, WireError, decode_runtime, runtime_frame, socketpair
from hv.rundir import Manifest, RunDir, process_title
from hv.services import CpuSettings, Services

__all__ = ["SCHEMA_VERSION", "PartitionState", "Supervisor", "main"]

SCHEMA_VERSION = 1
BOOT_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
STABLE_AFTER_S = 10.0
_WATCH_BUFFER_MAX = 4 << 20
MAX_REPORTED_CHANNELS = 256  # channels kept from one partition's report
MAX_TRACE_EVENTS = 1000  # trace events forwarded from one frame
# the root's per-disk counters (op "disks"): only int values of these keys are kept
_DISK_COUNTERS = ("read_ops", "write_ops", "read_bytes", "write_bytes", "flushes", "errors")
_DISK_STAT_KEYS = frozenset(("index", *_DISK_COUNTERS))
DM_REQUEST_TIMEOUT_S = 15.0  # a memory request the root does not answer in time fails
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class PartitionState(StrEnum):
    STARTING = "starting"
    """Process spawned; it has not said hello yet."""
    RUNNING = "running"
    """Booted: it mapped its memory and said hello."""
    STOPPING = "stopping"
    """Asked to stop; killed if still alive after STOP_TIMEOUT_S."""
    STOPPED = "stopped"
    """No process, and none expected (asked to stop, or a clean exit, or never started)."""
    CRASHED = "crashed"
    """It exited unasked with a non-zero status or a signal."""
    RESTARTING = "restarting"
    """Waiting out the backoff before it is started again."""


@dataclass(eq=False)
class Partition:
    id: int
    cfg: PartitionConfig
    cpu: CpuSettings
    state: PartitionState = PartitionState.STOPPED
    pid: int | None = None
    pidfd: int | None = None
    link: SupervisorEnd | None = None
    eom_fd: int | None = None
    started: float | None = None  # monotonic, when the process was spawned
    boot_s: float | None = None  # spawn -> hello
    restarts: int = 0
    failures: int = 0  # consecutive quick failures (backoff exponent)
    want_stop: bool = False  # the supervisor asked it to stop
    restart_after_stop: bool = False
    guest_visible_bytes: int | None = None
    last_exit: dict[str, Any] | None = None
    timer: list[Any] | None = None
    cpu_sample: tuple[int, float, float] | None = None  # (pid, monotonic, cpu seconds)
    usage: float = 0.0
    log: JsonLog | None = None
    channels: list[dict[str, Any]] = field(default_factory=list)  # its last report
    hypercalls: int = 0  # frames it sent the supervisor (none per channel packet)
    demand: dict[str, int] | None = None  # its DM pressure report, as the root relayed it
    route: Any = None  # hv.intercept.InterceptRoute while it runs with an ide disk
    disk_stats: list[dict[str, Any]] = field(default_factory=list)  # the root's report
    vmbus_errors: int = 0  # the root's count of this child's VMBus protocol errors
    tracers: set[int] = field(default_factory=set)  # control connections tracing it

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def alive(self) -> bool:
        return self.pid is not None


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    reader: LineReader = field(default_factory=LineReader)
    out: bytearray = field(default_factory=bytearray)
    watching: bool = False
    closing: bool = False
    tracing: int | None = None  # the partition id this connection traces


class _Timers:
    """A heap of (deadline, seq, callback); a handle is cancelled by clearing its callback."""

    def __init__(self) -> None:
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, fn: Callable[[], None]) -> list[Any]:
        entry = [time.monotonic() + delay, next(self._seq), fn]
        heapq.heappush(self._heap, entry)
        return entry

    @staticmethod
    def cancel(entry: list[Any] | None) -> None:
        if entry is not None:
            entry[2] = None

    def timeout(self) -> float | None:
        while self._heap and self._heap[0][2] is None:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - time.monotonic())

    def run_due(self) -> None:
        now = time.monotonic()
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            fn, entry[2] = entry[2], None
            if fn is not None:
                fn()


class Supervisor:
    """One cluster's supervisor.  ``run()`` returns the process exit status.

    Args:
        cluster: the cluster's name.
        config: the validated configuration.
        rundir: its run directory.
        lock_fd: an fd already holding the cluster lock (from ``viridian up``),
            or None to take it here.
    """

    def __init__(self, cluster: str, config: ClusterConfig, rundir: RunDir,
                 lock_fd: int | None = None) -> None:
        self.cluster = cluster
        self.config = config
        self.rundir = rundir
        self._lock_fd = lock_fd
        self.parts = [
            Partition(i, cfg, CpuSettings(cfg.cpu.weight, cfg.cpu.limit, cfg.cpu.reserve))
            for i, cfg in enumerate([config.root, *config.children])
        ]
        self._by_name = {p.name: p for p in self.parts}
        self._sel = selectors.DefaultSelector()
        self._timers = _Timers()
        self._conns: dict[int, _Conn] = {}
        self._listener: socket.socket | None = None
        self._sig_r: socket.socket | None = None
        self._sig_w: socket.socket | None = None
        self.stopping = False
        self._forced = False
        self._done = False
        self._children_started = False
        self._dm_seq = 0
        self._dm_pending: dict[int, tuple[Any, ...]] = {}  # req -> (conn, child, action, ...)
        self._manifest_dirty = False
        self._t0 = time.monotonic()
        self.manifest = Manifest(rundir.manifest_file, cluster)
        self.services: Services | None = None
        self.log = JsonLog(None)

    # -- set-up and tear-down -------------------------------------------------------------

    def setup(self) -> None:
        """Lock the name, write pid file and manifest, listen, catch signals.

        Raises:
            BlockingIOError: a supervisor of this name is already running.
        """
        rd = self.rundir
        rd.create()
        if self._lock_fd is None:
            self._lock_fd = rd.lock()
        self.log = JsonLog(rd.log_file("supervisor"), partition="supervisor", pid=os.getpid())
        me = os.getpid()
        self.manifest.data["supervisor"] = {"pid": me}
        self.manifest.add("process", save=False, pid=me, name="supervisor",
                          create_time=_create_time(me))
        self.services = Services(self.cluster, self.parts[0].id, [p.id for p in self.parts[1:]])
        with contextlib.suppress(FileNotFoundError):
            rd.control_socket.unlink()  # a stale one: the lock proves its owner is dead
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            lst.bind(str(rd.control_socket))
        finally:
            os.umask(old_umask)
        lst.listen(64)
        lst.setblocking(False)
        self._listener = lst
        self.manifest.add("socket", save=False, path=str(rd.control_socket))
        self.manifest.save()
        self._sel.register(lst, selectors.EVENT_READ, self._on_accept)
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the signal number
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._sel.register(self._sig_r, selectors.EVENT_READ, self._on_signal)
        rd.write_pid()
        self.log("supervisor started", cluster=self.cluster, partitions=len(self.parts),
                 backends=self.services.backends())

    def teardown(self) -> None:
        for c in list(self._conns.values()):
            if c.watching:
                self._send(c, {"event": "stopped"})
                self._flush(c)
            self._drop(c)
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            with contextlib.suppress(OSError):
                self.rundir.control_socket.unlink()
            self.manifest.remove("socket", save=False, path=str(self.rundir.control_socket))
        if self.services is not None:
            self.services.close()
        signal.set_wakeup_fd(-1)
        for s in (self._sig_r, self._sig_w):
            if s is not None:
                s.close()
        self._sel.close()
        self.manifest.remove("process", save=False, pid=os.getpid())
        with contextlib.suppress(OSError):
            self.rundir.pid_file.unlink()
        if any(o.get("kind") != "process" or o.get("pid") != os.getpid()
               for o in self.manifest.objects):
            self.manifest.save()  # something is left: the next up sweeps it
        else:
            with contextlib.suppress(OSError):
                self.rundir.manifest_file.unlink()
        self.log("supervisor stopped", seconds=round(time.monotonic() - self._t0, 3))
        self.log.close()
        for p in self.parts:
            if p.log is not None:
                p.log.close()

    def run(self, ready: Callable[[], None] | None = None) -> int:
        """Start the cluster and serve until it is stopped."""
        if ready is not None:
            ready()
        self._spawn(self.parts[0])
        while not self._done:
            if self._manifest_dirty:
                self.manifest.save()
                self._manifest_dirty = False
            timeout = self._timers.timeout()
            tick = self.services.tick_interval() if self.services else None
            if tick is not None:
                timeout = tick if timeout is None else min(timeout, tick)
            for key, _ in self._sel.select(timeout):
                self._guarded(key.data, key.fileobj)
            self._guarded(self._timers.run_due)
            if tick is not None and self.services is not None:
                self.services.tick()
        return 0

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run one event handler; a bug in it is logged, not fatal: if the supervisor
        died, every partition would die with it."""
        try:
            fn(*args)
        except Exception as e:
            import traceback

            self.log("internal error", level="error", error=f"{type(e).__name__}: {e}",
                     traceback=traceback.format_exc())

    # -- partitions ------------------------------------------------------------------------

    def _plog(self, p: Partition) -> JsonLog:
        if p.log is None:
            p.log = JsonLog(self.rundir.log_file(p.name), partition=p.name, source="supervisor")
        return p.log

    def _set_state(self, p: Partition, state: PartitionState, **extra: Any) -> None:
        p.state = state
        ev = {"event": "state", "name": p.name, "id": p.id, "state": str(state), "pid": p.pid,
              "restarts": p.restarts, "t": round(time.time(), 6), **extra}
        self._plog(p)(str(state), **{k: v for k, v in ev.items()
                                     if k not in ("event", "name", "t", "state")})
        for c in list(self._conns.values()):
            if c.watching:
                self._send(c, ev)

    def _spawn(self, p: Partition) -> None:
        assert self.services is not None and not p.alive
        p.want_stop = False
        p.guest_visible_bytes = None
        p.cpu_sample = None
        p.usage = 0.0
        mem = p.cfg.memory
        try:
            grant = self.services.add_partition(p.id, p.name, (mem.startup, mem.minimum,
                                                               mem.maximum), p.cpu)
        except Exception as e:  # a service's own bug must not take the cluster down
            # Not a crash of the partition: restarting cannot help, so no policy applies.
            self._plog(p)("cannot set up its resources", level="error", error=str(e))
            self._set_state(p, PartitionState.CRASHED, error=str(e))
            return
        sup_end, part_end = socketpair()
        err_fd = os.open(self.rundir.logs / f"{p.name}.stderr",
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        argv = [sys.executable, "-m", f"partitions.{p.cfg.role}", "--cluster", self.cluster,
                "--partition", p.name, "--id", str(p.id), "--fd", "3",
                "--log", str(self.rundir.log_file(p.name))]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            x for x in (_PROJECT_ROOT, env.get("PYTHONPATH")) if x)
        try:
            pid = os.posix_spawn(sys.executable, argv, env, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, err_fd, 1),
                (os.POSIX_SPAWN_DUP2, err_fd, 2),
                (os.POSIX_SPAWN_DUP2, part_end.fileno(), 3),
            ], setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM))
        except OSError as e:
            sup_end.close()
            self.services.remove_partition(p.id, p.name)
            self._plog(p)("cannot start", level="error", error=str(e))
            self._set_state(p, PartitionState.CRASHED, error=f"spawn: {e}")
            return
        finally:
            os.close(err_fd)
            part_end.close()
        p.pid = pid
        p.pidfd = os.pidfd_open(pid)
        p.started = time.monotonic()
        p.boot_s = None
        p.link = SupervisorEnd(sup_end)
        self.manifest.add("process", save=False, pid=pid, name=p.name,
                          create_time=_create_time(pid))
        self._manifest_dirty = True
        self._sel.register(p.pidfd, selectors.EVENT_READ, lambda _f, p=p: self._on_exit(p))
        self._sel.register(sup_end, selectors.EVENT_READ, lambda _f, p=p: self._on_link(p))
        p.eom_fd = self.services.eom_fileno(p.id)
        self._sel.register(p.eom_fd, selectors.EVENT_READ,
                           lambda _f, p=p: self.services and self.services.service_synic(p.id))
        boot: dict[str, Any] = {"op": "boot", "cluster": self.cluster, "name": p.name,
                                "id": p.id, "role": p.cfg.role, "devices": p.cfg.devices,
                                "connections": grant.connections}
        if p.cfg.role == "root":
            boot["children"] = [{"id": c.id, "name": c.name, "devices": c.cfg.devices,
                                 "running": c.state == PartitionState.RUNNING,
                                 "memory": self._memory_settings(c),
                                 "disks": self._disks(c)}
                                for c in self.parts[1:]]
        else:
            boot["root_up"] = self.parts[0].state == PartitionState.RUNNING
            boot["disks"] = [{"index": d["index"], "bus": d["bus"], "size": d["size"]}
                             for d in self._disks(p)]
        self._to_partition(p, runtime_frame(boot, grant.synic_fds))
        self._to_partition(p, grant.memory)
        if any(d.bus == "ide" for d in p.cfg.disks):
            self._start_intercepts(p)
        self.services.partition_started(p.name, pid)
        p.timer = self._timers.call_later(BOOT_TIMEOUT_S, lambda: self._boot_timeout(p))
        self._set_state(p, PartitionState.STARTING)

    # -- emulated devices: trapped port I/O (hv/intercept.py) ---------------------------------

    def _disks(self, p: Partition) -> list[dict[str, Any]]:
        from hv.config import disk_path

        return [{"index": i, "bus": d.bus, "path": disk_path(self.cluster, p.name, i, d),
                 "size": d.size} for i, d in enumerate(p.cfg.disks)]

    def _start_intercepts(self, p: Partition) -> None:
        """The child's emulated IDE controller: its intercept link (to the
        child) and its worker link (to the root, which runs the worker)."""
        from hv.intercept import IDE_PORTS, InterceptRoute

        self._stop_intercepts(p)
        route = p.route = InterceptRoute(ports=list(IDE_PORTS))
        self._sel.register(route.child_exit_fd, selectors.EVENT_READ,
                           lambda _f, r=route: r.on_exit())
        self._sel.register(route.worker_done_fd, selectors.EVENT_READ,
                           lambda _f, r=route: r.on_done())
        self._to_partition(p, runtime_frame({"op": "intercept", "ports": route.ports},
                                            route.child_handles()))
        self._offer_worker(p)

    def _offer_worker(self, p: Partition) -> None:
        """Give the root what it needs to run ``p``'s device worker."""
        root = self.parts[0]
        if p.route is None or root.state != PartitionState.RUNNING:
            return  # (a starting root gets every child's offer with its hello)
        ide = [d for d in self._disks(p) if d["bus"] == "ide"]
        self._tell(root, {"op": "intercept", "child": p.id, "name": p.name,
                          "ports": p.route.ports, "disk": ide[0]}, p.route.worker_handles())

    def _stop_intercepts(self, p: Partition) -> None:
        route, p.route = p.route, None
        if route is None:
            return
        for fd in route.fds():
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)
        route.close()
        self._tell_root({"op": "intercept.stop", "child": p.id})

    def _boot_timeout(self, p: Partition) -> None:
        if p.alive and p.state == PartitionState.STARTING:
            self._plog(p)("no hello in time: killed", level="error", timeout_s=BOOT_TIMEOUT_S)
            self._kill(p)

    def _kill(self, p: Partition) -> None:
        if p.pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(p.pidfd, signal.SIGKILL)

    def _to_partition(self, p: Partition, frame: Frame) -> None:
        """Queue a frame for a partition; never blocks.  A partition that stops
        reading its link is killed (it cannot stall the supervisor)."""
        if p.link is None:
            if frame.close_after_send:
                frame.close_fds()
            return
        try:
            if not p.link.send(frame):
                self._sel.modify(p.link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 lambda _f, p=p: self._on_link(p))
        except WireError as e:
            self._plog(p)("not reading its link: killed", level="error", error=str(e))
            self._kill(p)
        except OSError:
            pass  # it is gone; its pidfd says so
        finally:
            if frame.close_after_send:  # the writer holds its own copies
                frame.close_fds()

    def _on_link(self, p: Partition) -> None:
        assert self.services is not None
        link = p.link
        if link is None:
            return
        if link.writer.pending_bytes:
            try:
                if link.flush():
                    self._sel.modify(link.sock, selectors.EVENT_READ,
                                     lambda _f, p=p: self._on_link(p))
            except OSError:
                pass
        for _ in range(64):  # bounded: one chatty partition cannot starve the others
            try:
                frames = link.recv()
            except BlockingIOError:
                return
            except (WireError, OSError) as e:
                self._plog(p)("malformed frames: killed", level="error", error=str(e))
                self._close_link(p)
                self._kill(p)
                return
            if frames is None:  # it closed its end; its pidfd tells when it is gone
                self._close_link(p)
                return
            for fr in frames:
                self._on_frame(p, fr)

    def _on_frame(self, p: Partition, fr: Frame) -> None:
        assert self.services is not None
        fr.close_fds()  # a partition never hands the supervisor a descriptor
        if fr.kind == FrameKind.HYPERCALL:
            p.hypercalls += 1
            try:
                reply = self.services.hypercall(p.id, fr)
            except WireError as e:
                self._plog(p)("malformed hypercall: killed", level="error", error=str(e))
                self._kill(p)
                return
            # What the call produced for other partitions (a grant for the root,
            # a new memory range or doorbells for a child) goes out before the
            # caller's reply: the caller may tell the other partition about it
            # through a ring the moment it has the reply, and by then the frame
            # must already be waiting on that partition's link.
            for target, out in self.services.take_outbox():
                if 0 <= target < len(self.parts):
                    self._to_partition(self.parts[target], out)
                else:
                    out.close_fds()
            if reply is not None:
                self._to_partition(p, reply)
        elif (obj := decode_runtime(fr)) is not None:
            self._on_partition_message(p, obj)
        else:
            self._plog(p)("unexpected frame dropped", level="warning", kind=fr.kind)

    def _close_link(self, p: Partition) -> None:
        if p.link is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(p.link.sock)
            p.link.close()
            p.link = None

    def _on_partition_message(self, p: Partition, obj: dict[str, Any]) -> None:
        op = obj.get("op")
        gvb = obj.get("guest_visible_bytes")
        if isinstance(gvb, int) and not isinstance(gvb, bool) and gvb >= 0:
            p.guest_visible_bytes = gvb
        if op == "hello" and p.state == PartitionState.STARTING:
            self._timers.cancel(p.timer)
            p.timer = None
            assert p.started is not None
            p.boot_s = round(time.monotonic() - p.started, 4)
            self._set_state(p, PartitionState.RUNNING, boot_s=p.boot_s,
                            guest_visible_bytes=p.guest_visible_bytes)
            if p.tracers:  # a traced partition started again: the trace goes on
                self._tell(p, {"op": "trace", "on": True})
            if p.cfg.role == "root":
                for c in self.parts[1:]:  # workers first: the children then re-share
                    self._offer_worker(c)  # their DMA pages, which go to them
                self._tell_children({"op": "root", "state": "up"})
            else:
                self._tell_root({"op": "partition", "id": p.id, "name": p.name, "state": "up"})
            if p.cfg.role == "root" and not self._children_started and not self.stopping:
                self._children_started = True
                for c in self.parts[1:]:
                    if not c.alive and not c.want_stop:
                        self._spawn(c)
        elif op == "report":
            chans = obj.get("channels")
            if isinstance(chans, list) and len(chans) <= MAX_REPORTED_CHANNELS:
                p.channels = [c for c in chans if isinstance(c, dict)]
        elif op == "trace":
            ev = obj.get("events")
            if isinstance(ev, list):
                self._trace_out(p, {"event": "trace", "partition": p.name,
                                    "events": ev[:MAX_TRACE_EVENTS],
                                    "dropped": obj.get("dropped", 0)})
        elif op in ("intercept.attached", "intercept.detached") and p.cfg.role == "root":
            c = self._child_of(obj)
            route = c.route if c is not None else None
            if route is not None and op == "intercept.attached":
                route.worker_attached = True
            elif route is not None:  # a pending access must not wait for a worker gone
                route.worker_gone()
        elif op == "disks" and p.cfg.role == "root":
            stats = obj.get("disks")
            if isinstance(stats, dict):
                for c in self.parts[1:]:
                    v = stats.get(c.name)
                    if isinstance(v, list):  # checked once here, used as they are
                        c.disk_stats = [{k: x for k, x in d.items()
                                         if k in _DISK_STAT_KEYS and type(x) is int}
                                        for d in v[:8] if isinstance(d, dict)]
        elif op == "vmbus.errors" and p.cfg.role == "root":
            counts = obj.get("errors")
            if isinstance(counts, dict):
                for c in self.parts[1:]:
                    v = counts.get(c.name)
                    if type(v) is int and v >= 0:
                        c.vmbus_errors = v
        elif op == "dm.result" and p.cfg.role == "root":
            self._dm_result(obj)
        elif op == "dm.status" and p.cfg.role == "root":
            c = self._child_of(obj)
            if c is not None:
                c.demand = {
                    k: int(obj[k]) for k in ("committed_bytes", "available_bytes",
                                             "ballooned_bytes")
                    if isinstance(obj.get(k), int) and not isinstance(obj.get(k), bool)}
        elif op not in ("hello", "memory", "report", "trace"):
            self._plog(p)("unknown message", level="warning", op=str(op)[:40])

    def _on_exit(self, p: Partition) -> None:
        assert p.pidfd is not None
        try:
            info = os.waitid(os.P_PIDFD, p.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            info = None
        if info is None:
            return
        if info.si_code == os.CLD_EXITED:
            code, sig = info.si_status, None
        else:
            code, sig = None, info.si_status
        self._sel.unregister(p.pidfd)
        os.close(p.pidfd)
        self._close_link(p)
        if p.eom_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(p.eom_fd)
            p.eom_fd = None
        self._timers.cancel(p.timer)
        p.timer = None
        assert self.services is not None
        self.services.remove_partition(p.id, p.name)
        for target, out in self.services.take_outbox():  # its grants to the root, revoked
            if 0 <= target < len(self.parts):
                self._to_partition(self.parts[target], out)
        self.manifest.remove("process", save=False, pid=p.pid)
        self._manifest_dirty = True
        ran_s = time.monotonic() - (p.started or time.monotonic())
        p.last_exit = {"code": code, "signal": sig, "signal_name": _signame(sig),
                       "t": round(time.time(), 6)}
        old_pid = p.pid
        p.pid = p.pidfd = None
        p.guest_visible_bytes = None
        p.channels = []
        p.demand = None
        self._stop_intercepts(p)
        p.disk_stats = []
        if p.cfg.role == "root":
            for c in self.parts[1:]:
                c.vmbus_errors = 0  # (counted by the root: a new root counts afresh)
                if c.route is not None:
                    c.route.worker_gone()
            for req in list(self._dm_pending):
                self._dm_answer(req, {"ok": False, "error": "the root went down"})
        if p.cfg.role == "root":
            self._tell_children({"op": "root", "state": "down"})
        else:
            self._tell_root({"op": "partition", "id": p.id, "name": p.name, "state": "down"})
        if p.tracers:
            self._trace_out(p, {"event": "trace", "partition": p.name, "events": [],
                                "exited": True})
        crashed = not p.want_stop and (sig is not None or code != 0)
        if p.want_stop or not crashed:
            self._set_state(p, PartitionState.STOPPED, exit=p.last_exit, exited_pid=old_pid)
        else:
            self._set_state(p, PartitionState.CRASHED, exit=p.last_exit, exited_pid=old_pid)
        if p.want_stop:
            if p.restart_after_stop and not self.stopping:
                p.restart_after_stop = False
                p.restarts += 1
                self._spawn(p)
        else:
            self._after_exit(p, crashed, ran_s)
        if self.stopping:
            self._stop_next()

    def _after_exit(self, p: Partition, crashed: bool, ran_s: float) -> None:
        """Apply the restart policy to an exit nobody asked for."""
        policy = p.cfg.restart
        if self.stopping or not (policy == "always" or (policy == "on-crash" and crashed)):
            return
        p.failures = 1 if ran_s >= STABLE_AFTER_S else p.failures + 1
        delay = min(BACKOFF_FIRST_S * 2 ** (p.failures - 1), BACKOFF_MAX_S)
        self._set_state(p, PartitionState.RESTARTING, backoff_s=round(delay, 3))
        p.timer = self._timers.call_later(delay, lambda: self._restart_due(p))

    def _restart_due(self, p: Partition) -> None:
        p.timer = None
        if p.state == PartitionState.RESTARTING and not self.stopping:
            p.restarts += 1
            self._spawn(p)

    def _stop_partition(self, p: Partition) -> None:
        """Ask one partition to stop; kill it if it is still there after STOP_TIMEOUT_S."""
        p.want_stop = True
        if not p.alive:
            self._timers.cancel(p.timer)
            p.timer = None
            if p.state != PartitionState.STOPPED:
                self._set_state(p, PartitionState.STOPPED)
            return
        if p.state == PartitionState.STOPPING:
            return
        self._timers.cancel(p.timer)
        self._set_state(p, PartitionState.STOPPING)
        if self._forced:
            self._kill(p)
            return
        if p.link is None:
            self._kill(p)
        else:
            self._to_partition(p, runtime_frame({"op": "stop"}))
        p.timer = self._timers.call_later(STOP_TIMEOUT_S, lambda: self._stop_timeout(p))

    def _stop_timeout(self, p: Partition) -> None:
        p.timer = None
        if p.alive:
            self._plog(p)("did not stop in time: killed", level="warning",
                          timeout_s=STOP_TIMEOUT_S)
            self._kill(p)

    # -- the cluster ----------------------------------------------------------------------

    def begin_stop(self, force: bool = False) -> None:
        """Stop the cluster: children first, then the root, then this process."""
        if force and not self._forced:
            self._forced = True
            self.log("forced stop")
            for p in self.parts:
                if p.alive:
                    p.want_stop = True
                    self._kill(p)
        if self.stopping:
            return
        self.stopping = True
        self.log("stopping", force=force)
        self._stop_next()

    def _stop_next(self) -> None:
        children = self.parts[1:]
        for p in children:
            if p.alive or p.state != PartitionState.STOPPED:
                self._stop_partition(p)
        if any(p.alive for p in children):
            return
        root = self.parts[0]
        if root.alive or root.state != PartitionState.STOPPED:
            self._stop_partition(root)
        if not root.alive:
            self._done = True

    def _on_signal(self, _f: object) -> None:
        assert self._sig_r is not None
        try:
            data = self._sig_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.log("signal", signal=_signame(signum))
                self.begin_stop(force=self.stopping)

    # -- status ---------------------------------------------------------------------------

    def _cpu_usage(self, p: Partition) -> float:
        assert self.services is not None
        measured = self.services.cpu_usage_percent(p.name)
        if measured is not None:
            return round(measured, 2)
        if p.pid is None:
            return 0.0
        try:
            import psutil

            t = psutil.Process(p.pid).cpu_times()
        except Exception:
            return 0.0
        now, cpu_s = time.monotonic(), t.user + t.system
        s = p.cpu_sample
        if s is None or s[0] != p.pid:
            dt = now - (p.started or now)
            p.usage = 100.0 * cpu_s / dt if dt > 0 else 0.0
            p.cpu_sample = (p.pid, now, cpu_s)
        elif now - s[1] >= 0.25:
            p.usage = 100.0 * (cpu_s - s[2]) / (now - s[1])
            p.cpu_sample = (p.pid, now, cpu_s)
        return round(p.usage, 2)

    def status(self) -> dict[str, Any]:
        """The status object (docs/status-schema.md)."""
        assert self.services is not None
        now = time.monotonic()
        self.services.measure_cpu()
        parts = []
        for p in self.parts:
            parts.append({
                "id": p.id,
                "name": p.name,
                "role": p.cfg.role,
                "pid": p.pid,
                "state": str(p.state),
                "restarts": p.restarts,
                "uptime_s": round(now - p.started, 3) if p.alive and p.started else 0.0,
                "boot_s": p.boot_s,
                "restart_policy": p.cfg.restart,
                "last_exit": p.last_exit,
                "memory": self._memory_status(p),
                "cpu": {
                    "weight": p.cpu.weight,
                    "limit_percent": p.cpu.limit_percent,
                    "reserve_percent": p.cpu.reserve_percent,
                    "usage_percent": self._cpu_usage(p),
                },
                "devices": p.cfg.devices,
                "hypercalls": p.hypercalls,
                "vmbus_errors": p.vmbus_errors,
                "channels": p.channels,
                "disks": self._disk_status(p),
            })
        return {
            "schema_version": SCHEMA_VERSION,
            "cluster": self.cluster,
            "supervisor_pid": os.getpid(),
            "state": "stopping" if self.stopping else "running",
            "uptime_s": round(now - self._t0, 3),
            "run_dir": str(self.rundir.path),
            "backends": self.services.backends(),
            "partitions": parts,
        }

    # -- the control socket ----------------------------------------------------------------

    def _on_accept(self, _f: object) -> None:
        assert self._listener is not None
        for _ in range(16):
            try:
                s, _addr = self._listener.accept()
            except BlockingIOError:
                return
            s.setblocking(False)
            c = _Conn(s)
            self._conns[s.fileno()] = c
            self._sel.register(s, selectors.EVENT_READ, lambda _f, c=c: self._on_conn(c))

    def _on_conn(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data == b"":
            self._drop(c)
            return
        if data:
            try:
                items = c.reader.feed(data)
            except ControlError as e:
                self._send(c, {"ok": False, "error": str(e), "code": e.code})
                c.closing = True
                items = []
            for item in items:
                if isinstance(item, ControlError):
                    self._send(c, {"ok": False, "error": str(item), "code": item.code})
                else:
                    self._send(c, self._handle(c, item))
        self._flush(c)

    def _send(self, c: _Conn, obj: dict[str, Any]) -> None:
        if obj:
            c.out += encode(obj)
            if len(c.out) > _WATCH_BUFFER_MAX:  # a client that does not read: let it go
                c.out.clear()
                c.closing = True
            else:
                self._flush(c)

    def _flush(self, c: _Conn) -> None:
        if c.sock.fileno() < 0:
            return
        while c.out:
            try:
                n = c.sock.send(c.out)
            except BlockingIOError:
                break
            except OSError:
                self._drop(c)
                return
            del c.out[:n]
        if c.closing and not c.out:
            self._drop(c)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        with contextlib.suppress(KeyError, ValueError):
            if self._sel.get_key(c.sock).events != events:
                self._sel.modify(c.sock, events, lambda _f, c=c: self._on_conn_ready(c))

    def _on_conn_ready(self, c: _Conn) -> None:
        self._on_conn(c) if not c.out else self._flush(c)

    def _drop(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd < 0:
            return
        if c.tracing is not None:
            self._untrace(c)
        self._conns.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.sock)
        c.sock.close()

    # -- messages to partitions, tracing, relays -------------------------------------------

    def _tell(self, p: Partition, obj: dict[str, Any], fds: list[int] | tuple[int, ...] = (),
              ) -> None:
        """A runtime frame to a running partition (``fds`` stay ours: sending dups them)."""
        if p.alive and p.link is not None:
            self._to_partition(p, runtime_frame(obj, fds))

    def _tell_root(self, obj: dict[str, Any]) -> None:
        self._tell(self.parts[0], obj)

    def _tell_children(self, obj: dict[str, Any]) -> None:
        for c in self.parts[1:]:
            self._tell(c, obj)

    def _handle_trace(self, c: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        """Stream a partition's decoded control messages and packet headers to
        this connection until it closes (the partition traces only while
        someone listens)."""
        p = self._find(req.get("name"))
        if c.tracing is not None:
            raise ControlError("this connection is already tracing", "invalid")
        c.tracing = p.id
        p.tracers.add(id(c))
        self._tell(p, {"op": "trace", "on": True})
        return {"ok": True, "name": p.name, "state": str(p.state), "tracing": True}

    def _untrace(self, c: _Conn) -> None:
        pid_, c.tracing = c.tracing, None
        if pid_ is None or not 0 <= pid_ < len(self.parts):
            return
        p = self.parts[pid_]
        p.tracers.discard(id(c))
        if not p.tracers:
            self._tell(p, {"op": "trace", "on": False})

    def _trace_out(self, p: Partition, ev: dict[str, Any]) -> None:
        for c in list(self._conns.values()):
            if c.tracing == p.id:
                self._send(c, ev)

    def _handle_relay(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        """Pass a request to a partition (one way): ``workload`` to a child's
        device, ``channel.rescind`` to the root about a child's channel."""
        p = self._find(req.get("name"))
        if not p.alive or p.state != PartitionState.RUNNING:
            raise ControlError(f"{p.name} is not running ({p.state})", "invalid")
        if op == "workload":
            if p.cfg.role != "child":
                raise ControlError("workloads run in child partitions", "invalid")
            self._tell(p, {"op": "workload", "device": str(req.get("device", "echo")),
                           "action": str(req.get("action", "stream")),
                           "args": req.get("args") if isinstance(req.get("args"), dict) else {}})
            return {"ok": True, "name": p.name}
        relid = req.get("relid")
        if p.cfg.role != "child" or not isinstance(relid, int) or isinstance(relid, bool):
            raise ControlError("channel.rescind needs a child \"name\" and an integer "
                               "\"relid\"", "bad_request")
        root = self.parts[0]
        if root.state != PartitionState.RUNNING:
            raise ControlError(f"the root is not running ({root.state})", "invalid")
        self._tell(root, {"op": "rescind", "child": p.id, "relid": relid})
        return {"ok": True, "name": p.name, "relid": relid}

    def _find(self, ref: object) -> Partition:
        if (isinstance(ref, int) and not isinstance(ref, bool)) or (
                isinstance(ref, str) and ref.isascii() and ref.isdigit()):  # (not "²")
            i = int(ref)  # type: ignore[arg-type]
            if 0 <= i < len(self.parts):
                return self.parts[i]
        elif isinstance(ref, str) and ref in self._by_name:
            return self._by_name[ref]
        raise ControlError(f"no such partition: {ref}", "not_found")

    def _handle(self, c: _Conn, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        try:
            if op == "ping":
                return {"ok": True, "cluster": self.cluster, "pid": os.getpid(),
                        "protocol": PROTOCOL_VERSION}
            if op == "status":
                return {"ok": True, "status": self.status()}
            if op == "watch":
                c.watching = True
                return {"event": "snapshot", "status": self.status()}
            if op == "stop":
                self.begin_stop(force=bool(req.get("force")))
                return {"ok": True, "state": "stopping"}
            if isinstance(op, str) and op.startswith("partition."):
                return self._handle_partition(op, req)
            if op in ("memory.add", "memory.balloon"):
                return self._handle_memory(c, op, req)
            if op == "memory.set":
                return self._handle_memory_set(self._find(req.get("name")), req)
            if op == "trace":
                return self._handle_trace(c, req)
            if op in ("workload", "channel.rescind"):
                return self._handle_relay(op, req)
            raise ControlError(f"unknown op: {op!r}", "bad_request")
        except ControlError as e:
            return {"ok": False, "error": str(e), "code": e.code}

    def _handle_partition(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        if "name" not in req:
            raise ControlError(f"{op} needs a partition \"name\"", "bad_request")
        p = self._find(req["name"])
        if op == "partition.set":
            return self._handle_set(p, req)
        if self.stopping:
            raise ControlError(f"cluster {self.cluster} is stopping", "invalid")
        if op == "partition.start":
            if p.alive or p.state == PartitionState.RESTARTING:
                raise ControlError(f"{p.name} is already {p.state}", "invalid")
            if p.cfg.role == "child" and not self.parts[0].alive:
                raise ControlError(f"start the root ({self.parts[0].name}) first", "invalid")
            self._timers.cancel(p.timer)
            p.failures = 0
            self._spawn(p)
        elif op == "partition.stop":
            if not p.alive and p.state in (PartitionState.STOPPED, PartitionState.CRASHED):
                raise ControlError(f"{p.name} is not running ({p.state})", "invalid")
            self._stop_partition(p)
        elif op == "partition.restart":
            if p.alive:
                p.restart_after_stop = True
                self._stop_partition(p)
            else:
                self._timers.cancel(p.timer)
                p.restarts += 1
                self._spawn(p)
        elif op == "partition.kill":
            if not p.alive:
                raise ControlError(f"{p.name} is not running ({p.state})", "invalid")
            p.want_stop = True
            self._set_state(p, PartitionState.STOPPING)
            self._kill(p)
        else:
            raise ControlError(f"unknown op: {op!r}", "bad_request")
        return {"ok": True, "name": p.name, "state": str(p.state), "pid": p.pid}

    # -- dynamic memory ----------------------------------------------------------------------

    def _disk_status(self, p: Partition) -> list[dict[str, Any]]:
        out = []
        for i, d in enumerate(self._disks(p)):
            st = next((x for x in p.disk_stats if x.get("index") == i), {})
            entry: dict[str, Any] = {
                "bus": d["bus"], "path": d["path"], "size_bytes": d["size"],
                **{k: st.get(k, 0) for k in _DISK_COUNTERS}}
            if d["bus"] == "ide":
                r = p.route
                entry["traps"] = r.traps if r is not None else 0
                entry["traps_forwarded"] = r.forwarded if r is not None else 0
                # the root's device worker is there: until then accesses float
                entry["attached"] = bool(r is not None and r.worker_attached)
            out.append(entry)
        return out

    def _memory_settings(self, p: Partition) -> dict[str, Any]:
        m = p.cfg.memory
        return {"startup": m.startup, "minimum": m.minimum, "maximum": m.maximum,
                "buffer": m.buffer, "weight": m.weight, "dynamic": m.dynamic}

    def _memory_status(self, p: Partition) -> dict[str, Any]:
        assert self.services is not None
        m = p.cfg.memory
        live = self.services.live.get(p.id) if p.alive else None
        d = p.demand or {}
        visible = p.guest_visible_bytes
        demand = d.get("committed_bytes")
        return {
            "assigned_bytes": self.services.assigned_bytes(p.id),
            "guest_visible_bytes": visible,
            "demand_bytes": demand,
            "pressure_percent": round(100.0 * demand / visible, 1)
            if demand is not None and visible else None,
            "ballooned_bytes": live.memory.ballooned_bytes if live else 0,
            "resident_bytes": live.memory.resident_bytes() if live else 0,
            "startup_bytes": m.startup,
            "minimum_bytes": m.minimum,
            "maximum_bytes": m.maximum,
            "buffer_percent": m.buffer,
            "weight": m.weight,
            "dynamic": m.dynamic,
        }

    def _handle_memory(self, c: _Conn, op: str, req: dict[str, Any]) -> dict[str, Any]:
        """Hot-add to or balloon a running child through its Dynamic Memory
        channel: the root's DM VSP runs the protocol, the supervisor maps or
        takes back the pages; the answer comes when the guest has answered."""
        from hv.hypercalls import HOST_RESERVE_BYTES
        from hv.memory import format_bytes

        if "name" not in req:
            raise ControlError(f"{op} needs a partition \"name\"", "bad_request")
        p = self._find(req["name"])
        nbytes = req.get("bytes")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ControlError("bytes must be a positive integer", "invalid")
        if nbytes % 4096:
            raise ControlError(f"bytes must be a multiple of 4096, got {nbytes}", "invalid")
        if p.cfg.role != "child":
            raise ControlError(f"{p.name} is the root: dynamic memory is for children", "invalid")
        if not p.alive or p.state != PartitionState.RUNNING or self.services is None:
            raise ControlError(f"{p.name} is not running ({p.state})", "invalid")
        root = self.parts[0]
        if root.state != PartitionState.RUNNING:
            raise ControlError(f"the root is not running ({root.state}): no dynamic memory "
                               "channel", "invalid")
        mem = self.services.live[p.id].memory
        a = mem.assigned_bytes
        if op == "memory.add":
            if a + nbytes > mem.maximum_bytes:
                raise ControlError(
                    f"cannot add {format_bytes(nbytes)} to {p.name}: above its maximum of "
                    f"{format_bytes(mem.maximum_bytes)} (assigned {format_bytes(a)})", "invalid")
            # (the router's own measure, so the reason given here is the one it applies)
            avail = self.services.router.host_available() - HOST_RESERVE_BYTES
            if nbytes > avail:
                raise ControlError(
                    f"cannot add {format_bytes(nbytes)} to {p.name}: not enough host memory "
                    f"({format_bytes(max(0, avail))} can be given)", "invalid")
        elif a - nbytes < mem.minimum_bytes:
            raise ControlError(
                f"cannot balloon {format_bytes(nbytes)} from {p.name}: below its minimum of "
                f"{format_bytes(mem.minimum_bytes)} (assigned {format_bytes(a)})", "invalid")
        self._dm_seq += 1
        req_id = self._dm_seq
        action = "hot-add" if op == "memory.add" else "balloon"
        timer = self._timers.call_later(DM_REQUEST_TIMEOUT_S, lambda: self._dm_answer(
            req_id, {"ok": False, "error": "the root did not answer in time"}))
        self._dm_pending[req_id] = (c, p, action, nbytes, timer)
        self._tell_root({"op": "dm", "action": action, "child": p.id, "bytes": nbytes,
                         "req": req_id})
        return {}  # answered by _dm_answer

    def _child_of(self, obj: dict[str, Any]) -> Partition | None:
        """The child a root report names in its "child" field: an int (not a
        bool) in range, checked once here for every report that has one."""
        c = obj.get("child")
        return self.parts[c] if type(c) is int and 0 < c < len(self.parts) else None

    def _dm_result(self, obj: dict[str, Any]) -> None:
        req = obj.get("req")
        if isinstance(req, int):
            self._dm_answer(req, obj)

    def _dm_answer(self, req_id: int, r: dict[str, Any]) -> None:
        entry = self._dm_pending.pop(req_id, None)
        if entry is None:
            return
        c, p, action, nbytes, timer = entry
        self._timers.cancel(timer)
        assert self.services is not None
        assigned = self.services.assigned_bytes(p.id)
        ok = bool(r.get("ok"))
        self._plog(p)(action, bytes=nbytes, ok=ok, assigned_bytes=assigned, ms=r.get("ms"),
                      **({"error": str(r.get("error"))} if not ok else {}))
        if ok:
            ans = {"ok": True, "name": p.name, "action": action, "assigned_bytes": assigned,
                   "pages": r.get("pages"), "ms": r.get("ms")}
            if r.get("note"):
                ans["note"] = r["note"]
        else:
            ans = {"ok": False, "code": "refused",
                   "error": f"{p.name}: {r.get('error') or 'failed'}"}
        if c.sock.fileno() >= 0:
            self._send(c, ans)

    def _handle_memory_set(self, p: Partition, req: dict[str, Any]) -> dict[str, Any]:
        """Change a partition's memory limits, buffer, weight or dynamic flag
        (live: the supervisor enforces the limits, the root's balancer follows)."""
        from pydantic import ValidationError

        from hv.config import MemoryConfig

        keys = ("minimum", "maximum", "buffer", "weight", "dynamic")
        changes = {k: req[k] for k in keys if k in req and req[k] is not None}
        if not changes:
            raise ControlError("memory.set needs one of " + ", ".join(keys), "bad_request")
        try:
            new = MemoryConfig.model_validate({**p.cfg.memory.model_dump(), **changes})
        except ValidationError as e:
            err = e.errors()[0]
            raise ControlError(f"{p.name}: {'.'.join(map(str, err['loc'])) or 'memory'}: "
                               f"{err['msg']}", "invalid") from None
        assert self.services is not None
        live = self.services.live.get(p.id) if p.alive else None
        if live is not None:
            from hv.memory import GuestMemoryError

            try:
                live.memory.set_limits(minimum_bytes=new.minimum, maximum_bytes=new.maximum)
            except GuestMemoryError as e:
                raise ControlError(str(e), "invalid") from None
        p.cfg = p.cfg.model_copy(update={"memory": new})
        self._plog(p)("memory settings", **self._memory_settings(p))
        if p.cfg.role == "child":
            self._tell_root({"op": "dm.settings", "child": p.id,
                             "memory": self._memory_settings(p)})
        return {"ok": True, "name": p.name, "memory": self._memory_status(p)}

    def _handle_set(self, p: Partition, req: dict[str, Any]) -> dict[str, Any]:
        assert self.services is not None
        w = req.get("cpu_weight", p.cpu.weight)
        lim = req.get("cpu_limit", p.cpu.limit_percent)
        res = req.get("cpu_reserve", p.cpu.reserve_percent)
        for key, v in (("cpu_weight", w), ("cpu_limit", lim), ("cpu_reserve", res)):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ControlError(f"{key} must be a number", "invalid")
        if not (isinstance(w, int) and 1 <= w <= 10000):
            raise ControlError(f"cpu_weight must be an integer 1-10000, got {w}", "invalid")
        if not 0 < lim <= 100:
            raise ControlError(f"cpu_limit must be in (0, 100] %, got {lim}", "invalid")
        if not 0 <= res <= 100:
            raise ControlError(f"cpu_reserve must be in [0, 100] %, got {res}", "invalid")
        if res > lim:
            raise ControlError(f"cpu_reserve ({res} %) exceeds cpu_limit ({lim} %)", "invalid")
        new = CpuSettings(int(w), float(lim), float(res))
        try:
            self.services.set_cpu(p.name, new)
        except ValueError as e:
            raise ControlError(f"cannot apply CPU settings to {p.name}: {e}", "invalid") from None
        except OSError as e:
            raise ControlError(f"cannot apply CPU settings to {p.name}: {e}", "failed") from None
        p.cpu = new
        self._plog(p)("cpu settings", weight=new.weight, limit_percent=new.limit_percent,
                      reserve_percent=new.reserve_percent)
        return {"ok": True, "name": p.name, "cpu": {
            "weight": new.weight, "limit_percent": new.limit_percent,
            "reserve_percent": new.reserve_percent}}


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _signame(sig: int | None) -> str | None:
    if sig is None:
        return None
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def main(argv: list[str] | None = None) -> int:
    """``python -m hv.supervisor --cluster NAME --config FILE [--ready-fd N] ...``"""
    ap = argparse.ArgumentParser(prog="python -m hv.supervisor",
                                 description="The Viridian supervisor of one cluster "
                                 "(normally started by `viridian up`).")
    ap.add_argument("--cluster", default="default")
    ap.add_argument("--config", help="TOML config (default: the embedded default cluster)")
    ap.add_argument("--ready-fd", type=int, help="write one JSON line here once serving")
    ap.add_argument("--lock-fd", type=int, help="an fd that already holds the cluster lock")
    ap.add_argument("--attached", action="store_true",
                    help="stop gracefully (SIGTERM) when the parent process dies")
    ap.add_argument("--daemon", action="store_true",
                    help="fork into the background at once (the parent exits 0)")
    args = ap.parse_args(argv)

    if args.daemon and os.fork() > 0:
        os._exit(0)  # the caller reaps this one; the supervisor lives on in the child
    if args.daemon:
        os.setsid()
    if args.attached:
        from hv.proc import die_with_parent

        die_with_parent(signal.SIGTERM)

    def report(obj: dict[str, Any]) -> None:
        if args.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(args.ready_fd, encode(obj))
                os.close(args.ready_fd)
            args.ready_fd = None

    try:
        from setproctitle import setproctitle

        setproctitle(process_title(args.cluster, "supervisor"))
    except ImportError:  # pragma: no cover - a dependency
        pass
    try:
        if args.config:
            config = load_config(args.config)
        else:
            from hv.config import default_config

            config = default_config()
    except ConfigError as e:
        report({"ok": False, "error": f"bad config: {e}", "code": "config"})
        print(f"hv.supervisor: bad config: {e}", file=sys.stderr)
        return 1
    sup = Supervisor(args.cluster, config, RunDir(args.cluster), args.lock_fd)
    try:
        sup.setup()
    except BlockingIOError:
        msg = f"cluster {args.cluster!r} is already running"
        report({"ok": False, "error": msg, "code": "running"})
        print(f"hv.supervisor: {msg}", file=sys.stderr)
        return 1
    except OSError as e:
        report({"ok": False, "error": f"cannot set up {sup.rundir.path}: {e}", "code": "failed"})
        raise
    try:
        return sup.run(ready=lambda: report({"ok": True, "pid": os.getpid(),
                                             "run_dir": str(sup.rundir.path)}))
    finally:
        sup.teardown()


if __name__ == "__main__":
    raise SystemExit(main())
