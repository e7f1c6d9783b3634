"""The supervisor's control socket: connections, requests, status, traces.

Layer: hv, the supervisor's side.  ``ControlRequests`` is the half of
``Supervisor`` (hv/supervisor/lifecycle.py, which inherits it) that answers
the control protocol (hv/control.py): it accepts connections, reads request
lines, answers them in order, streams state events to watchers and trace
events to tracers, and answers a Dynamic Memory request once the root has
(``_dm_answer``).  It never blocks: a client that does not read is dropped
once 4 MiB are queued for it.  What it changes (start, stop, restart, kill a
partition; stop the cluster) it asks of the lifecycle half.

Trust: the control socket is the cluster owner's (mode 0600); every request
field is still checked, and errors are answers (``ControlError`` codes), not
exceptions that reach the loop.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from hv.abi import HOST_RESERVE_BYTES, PAGE_SIZE
from hv.control import PROTOCOL_VERSION, ControlError, LineReader, encode
from hv.rundir import RunDir
from hv.services import CpuSettings, Services

from .partition import DISK_COUNTERS, Partition, PartitionState

__all__ = ["DM_REQUEST_TIMEOUT_S", "SCHEMA_VERSION", "ControlConnection", "ControlRequests"]

SCHEMA_VERSION = 1
_WATCH_BUFFER_MAX = 4 << 20
DM_REQUEST_TIMEOUT_S = 15.0  # a memory request the root does not answer in time fails


@dataclass(eq=False)
class ControlConnection:
    sock: socket.socket
    reader: LineReader = field(default_factory=LineReader)
    out: bytearray = field(default_factory=bytearray)
    watching: bool = False
    closing: bool = False
    tracing: int | None = None  # the partition id this connection traces


class ControlRequests:
    """The control-socket half of ``Supervisor`` (a mixin: it has no state of
    its own; ``Supervisor.__init__`` sets what it uses, below, and it calls
    the lifecycle half's ``_spawn``, ``_stop_partition``, ``_kill``,
    ``_set_state``, ``_plog``, ``_tell``, ``_tell_root``, ``_disks``,
    ``_memory_settings`` and ``begin_stop``)."""

    cluster: str
    rundir: RunDir
    parts: list[Partition]
    services: Services | None
    stopping: bool
    _by_name: dict[str, Partition]
    _conns: dict[int, ControlConnection]
    _listener: socket.socket | None
    _sel: selectors.BaseSelector
    _timers: Any  # the lifecycle's timer heap: call_later(delay, fn), cancel(handle)
    _dm_seq: int
    _dm_pending: dict[int, tuple[Any, ...]]
    _t0: float

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

    def _disk_status(self, p: Partition) -> list[dict[str, Any]]:
        out = []
        for i, d in enumerate(self._disks(p)):
            st = next((x for x in p.disk_stats if x.get("index") == i), {})
            entry: dict[str, Any] = {
                "bus": d["bus"], "path": d["path"], "size_bytes": d["size"],
                **{k: st.get(k, 0) for k in DISK_COUNTERS}}
            if d["bus"] == "ide":
                r = p.route
                entry["traps"] = r.traps if r is not None else 0
                entry["traps_forwarded"] = r.forwarded if r is not None else 0
                # the root's device worker is there: until then accesses float
                entry["attached"] = bool(r is not None and r.worker_attached)
            out.append(entry)
        return out

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

    # -- the control socket ---------------------------------------------------------------

    def _on_accept(self, _f: object) -> None:
        assert self._listener is not None
        for _ in range(16):
            try:
                s, _addr = self._listener.accept()
            except BlockingIOError:
                return
            s.setblocking(False)
            c = ControlConnection(s)
            self._conns[s.fileno()] = c
            self._sel.register(s, selectors.EVENT_READ, lambda _f, c=c: self._on_conn(c))

    def _on_conn(self, c: ControlConnection) -> None:
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

    def _send(self, c: ControlConnection, obj: dict[str, Any]) -> None:
        if obj:
            c.out += encode(obj)
            if len(c.out) > _WATCH_BUFFER_MAX:  # a client that does not read: let it go
                c.out.clear()
                c.closing = True
            else:
                self._flush(c)

    def _flush(self, c: ControlConnection) -> None:
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

    def _on_conn_ready(self, c: ControlConnection) -> None:
        self._on_conn(c) if not c.out else self._flush(c)

    def _drop(self, c: ControlConnection) -> None:
        fd = c.sock.fileno()
        if fd < 0:
            return
        if c.tracing is not None:
            self._untrace(c)
        self._conns.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.sock)
        c.sock.close()

    # -- tracing and relays ---------------------------------------------------------------

    def _handle_trace(self, c: ControlConnection, req: dict[str, Any]) -> dict[str, Any]:
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

    def _untrace(self, c: ControlConnection) -> None:
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

    # -- requests -------------------------------------------------------------------------

    def _find(self, ref: object) -> Partition:
        if (isinstance(ref, int) and not isinstance(ref, bool)) or (
                isinstance(ref, str) and ref.isascii() and ref.isdigit()):  # (not "²")
            i = int(ref)  # type: ignore[arg-type]
            if 0 <= i < len(self.parts):
                return self.parts[i]
        elif isinstance(ref, str) and ref in self._by_name:
            return self._by_name[ref]
        raise ControlError(f"no such partition: {ref}", "not_found")

    def _handle(self, c: ControlConnection, req: dict[str, Any]) -> dict[str, Any]:
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

    # -- dynamic memory and settings ------------------------------------------------------

    def _handle_memory(self, c: ControlConnection, op: str, req: dict[str, Any]) -> dict[str, Any]:
        """Hot-add to or balloon a running child through its Dynamic Memory
        channel: the root's DM VSP runs the protocol, the supervisor maps or
        takes back the pages; the answer comes when the guest has answered."""
        from hv.memory import format_bytes

        if "name" not in req:
            raise ControlError(f"{op} needs a partition \"name\"", "bad_request")
        p = self._find(req["name"])
        nbytes = req.get("bytes")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ControlError("bytes must be a positive integer", "invalid")
        if nbytes % PAGE_SIZE:
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
            from hv.memwire import GuestMemoryError

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
