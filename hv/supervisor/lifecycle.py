"""The supervisor's lifecycle: the process, its loop, and its partitions' lives.

Layer: hv, the supervisor's side.  ``Supervisor`` sets the process up (lock,
pid file, manifest, control socket, signals), runs the loop, spawns each
partition with its link, reads what the partition sends, reaps it when it
exits, applies the restart policy, and stops the cluster; the control socket
is its other half (hv/supervisor/requests.py, ``ControlRequests``).  ``main``
is ``python -m hv.supervisor``.

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

Trust: every frame and report from a partition is untrusted: malformed
frames or a link it stops reading get it killed, fds it sends are closed,
and report fields are checked once on arrival.
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
from pathlib import Path
from typing import Any

from hv.config import ClusterConfig, ConfigError, load_config
from hv.control import encode
from hv.jsonlog import JsonLog
from hv.link import WireError, decode_runtime, runtime_frame, socketpair
from hv.rundir import Manifest, RunDir, process_title
from hv.services import CpuSettings, Services
from hv.supervisor.link_end import SupervisorEnd
from hv.wire import Frame, FrameKind

from .partition import DISK_STAT_KEYS, Partition, PartitionState
from .requests import ControlRequests

__all__ = ["Supervisor", "main"]

BOOT_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
STABLE_AFTER_S = 10.0
MAX_REPORTED_CHANNELS = 256  # channels kept from one partition's report
MAX_TRACE_EVENTS = 1000  # trace events forwarded from one frame
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])  # (hv/supervisor/ -> the repository)


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


class Supervisor(ControlRequests):
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
        self._conns = {}  # fd -> connection (typed in ControlRequests)
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

    # -- partitions -----------------------------------------------------------------------

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

    # -- emulated devices: trapped port I/O (hv/intercept/) -----------------------------

    def _disks(self, p: Partition) -> list[dict[str, Any]]:
        from hv.config import disk_path

        return [{"index": i, "bus": d.bus, "path": disk_path(self.cluster, p.name, i, d),
                 "size": d.size} for i, d in enumerate(p.cfg.disks)]

    def _start_intercepts(self, p: Partition) -> None:
        """The child's emulated IDE controller: its intercept link (to the
        child) and its worker link (to the root, which runs the worker)."""
        from hv.intercept.route import InterceptRoute

        self._stop_intercepts(p)
        route = p.route = InterceptRoute()  # its ports: the root's, when its worker attaches
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

    # -- a partition's link, exit, restart and stop ---------------------------------------

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
                route.worker_attached = route.claim(obj.get("ports"))
            elif route is not None:  # a pending access must not wait for a worker gone
                route.worker_gone()
        elif op == "disks" and p.cfg.role == "root":
            stats = obj.get("disks")
            if isinstance(stats, dict):
                for c in self.parts[1:]:
                    v = stats.get(c.name)
                    if isinstance(v, list):  # checked once here, used as they are
                        c.disk_stats = [{k: x for k, x in d.items()
                                         if k in DISK_STAT_KEYS and type(x) is int}
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

    # -- messages to partitions -----------------------------------------------------------

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

    def _memory_settings(self, p: Partition) -> dict[str, Any]:
        m = p.cfg.memory
        return {"startup": m.startup, "minimum": m.minimum, "maximum": m.maximum,
                "buffer": m.buffer, "weight": m.weight, "dynamic": m.dynamic}

    def _child_of(self, obj: dict[str, Any]) -> Partition | None:
        """The child a root report names in its "child" field: an int (not a
        bool) in range, checked once here for every report that has one."""
        c = obj.get("child")
        return self.parts[c] if type(c) is int and 0 < c < len(self.parts) else None


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
