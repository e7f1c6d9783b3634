"""Disks in the root: the children's IDE device workers, and their statistics.

Layer: partitions (root).  The root's composition root builds
``StorageHost`` and hands it the ``intercept`` / ``intercept.stop``
messages (``on_intercept_frame``) and the children's grants (``on_memory``).

* For a child with an ``ide`` disk the supervisor sends the root an
  ``intercept`` frame with the worker's end of the child's intercept link
  (slot page, request and done eventfds).  The root starts the device
  worker (``python -m partitions.root.ideworker``), hands it those fds and
  one end of a socketpair, forwards it every grant the child makes (so DMA
  reaches exactly the pages the child granted) and, once the worker says
  ``ready``, tells the supervisor to route the child's port accesses to it.
* Disk statistics (the worker's, and the storvsp VSPs') are reported to the
  supervisor (``disks``), which shows them in ``viridian status``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hv.memwire import MemoryMessage
from hv.wire import send_frame

from .ide import IDE_PORTS

if TYPE_CHECKING:
    from hv.wire import Frame
    from partitions.runtime import PartitionRuntime

__all__ = ["StorageHost"]

# the checkout holding the three packages (this file is partitions/devices/storage/host.py)
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


@dataclass
class Worker:
    child: int
    name: str
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    index: int = 0  # which of the child's disks
    ready: bool = False
    stats: dict[str, int] = field(default_factory=dict)


class StorageHost:
    def __init__(self, rt: PartitionRuntime, children: list[dict[str, Any]]) -> None:
        self.rt = rt
        self.workers: dict[int, Worker] = {}
        self.names = {c["id"]: c["name"] for c in children
                      if isinstance(c.get("id"), int) and isinstance(c.get("name"), str)}
        self.scsi_stats: dict[int, dict[int, dict[str, int]]] = {}  # child -> disk -> stats
        self._last: Any = None

    # -- IDE workers -----------------------------------------------------------------------
    def on_intercept_frame(self, obj: dict[str, Any], fr: Frame) -> None:
        """``intercept``: the worker's end of a child's intercept link (start
        its worker; the fds are passed on, ours close after); ``intercept.stop``."""
        if obj.get("op") == "intercept":
            self.start_worker(obj, fr.fds)
        elif isinstance(obj.get("child"), int):
            self.stop_worker(obj["child"])

    def start_worker(self, obj: dict[str, Any], fds: list[int]) -> bool:
        """Start the device worker for a child (adopts nothing: the fds are
        passed on and closed by the caller)."""
        child, disk = obj.get("child"), obj.get("disk")
        if not isinstance(child, int) or not isinstance(disk, dict) or len(fds) != 3:
            return False
        self.stop_worker(child)
        name = str(obj.get("name", child))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", "partitions.root.ideworker", "--cluster", self.rt.cluster,
               "--child", name, "--image", str(disk.get("path")),
               "--size", str(int(disk.get("size", 0))),
               "--fds", ",".join(str(f) for f in [*fds, theirs.fileno()])]
        log = getattr(self.rt.log, "path", None)
        if log:
            cmd += ["--log", str(log).replace(f"{self.rt.name}.jsonl", f"{name}.ide-worker.jsonl")]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (_PROJECT_ROOT, env.get("PYTHONPATH"))
                                            if x)
        try:
            proc = subprocess.Popen(cmd, pass_fds=[*fds, theirs.fileno()], env=env,
                                    stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as e:
            self.rt.log("cannot start the IDE worker", level="error", child=name, error=str(e))
            ours.close()
            return False
        finally:
            theirs.close()
        ours.setblocking(False)
        w = self.workers[child] = Worker(child, name, proc, ours, int(disk.get("index", 0)))
        self.rt.watch(ours.fileno(), lambda: self._on_worker(w))
        self.rt.log("IDE worker started", child=name, pid=proc.pid, image=disk.get("path"))
        return True

    def _on_worker(self, w: Worker) -> None:
        while True:
            try:
                data = w.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.rt.log("IDE worker gone", level="warning", child=w.name)
                self._drop(w)
                return
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue  # (the worker serves a child's I/O: take nothing on trust)
            if obj.get("op") == "ready" and not w.ready:
                w.ready = True
                # the ports the worker serves: the supervisor routes the child's
                # accesses to them (and only them) to it from now on
                self.rt.send({"op": "intercept.attached", "child": w.child,
                              "ports": [list(span) for span in IDE_PORTS]})
            elif obj.get("op") == "stats":
                w.stats = {k: int(v) for k, v in obj.items() if isinstance(v, int)}
                self.rt.report_soon()
            elif obj.get("op") == "error":
                self.rt.log("IDE worker failed", level="error", child=w.name,
                            error=str(obj.get("error"))[:200])

    def _drop(self, w: Worker) -> None:
        if self.workers.get(w.child) is w:
            del self.workers[w.child]
        self.rt.unwatch(w.sock.fileno())
        w.sock.close()
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGKILL)
        try:
            w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.rt.send({"op": "intercept.detached", "child": w.child})

    def stop_worker(self, child: int) -> None:
        w = self.workers.get(child)
        if w is not None:
            self._drop(w)

    # -- grants: the worker may DMA into what the child granted ---------------------------------
    def on_memory(self, msg: MemoryMessage) -> None:
        """A GRANT or REVOKE for the root (before the root closes its fds)."""
        w = self.workers.get(msg.owner)
        if w is not None:
            self._forward(w, msg)

    def _forward(self, w: Worker, msg: MemoryMessage) -> None:
        try:
            send_frame(w.sock, msg.frame())
        except (BlockingIOError, OSError) as e:
            self.rt.log("grant not forwarded to the IDE worker", level="warning",
                        child=w.name, error=str(e))

    # -- statistics ------------------------------------------------------------------------------
    def report(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for w in self.workers.values():
            s = w.stats
            out.setdefault(w.name, []).append({
                "index": w.index, "bus": "ide",
                "read_ops": s.get("read_ops", 0), "write_ops": s.get("write_ops", 0),
                "read_bytes": s.get("read_bytes", 0), "write_bytes": s.get("write_bytes", 0),
                "flushes": s.get("flush_ops", 0), "errors": s.get("errors", 0),
                "dma_ops": s.get("dma_ops", 0), "port_accesses": s.get("port_reads", 0)
                + s.get("port_writes", 0)})
        for child, disks in self.scsi_stats.items():
            name = self.names.get(child, str(child))
            for index, s in disks.items():
                out.setdefault(name, []).append({"index": index, "bus": "scsi", **s})
        return out

    def send_report(self) -> None:
        r = self.report()
        if r != self._last:
            self._last = r
            self.rt.send({"op": "disks", "disks": r})

    def close(self) -> None:
        for w in list(self.workers.values()):
            self._drop(w)
