"""Fuzz what the supervisor decodes from others: the control socket's JSON
lines (``hv.control.LineReader``, then ``Supervisor._handle`` for each
request) and the runtime frames partitions send on their links
(``hv.link.decode_runtime``, then ``Supervisor._on_partition_message``), with
partitions the input starts and stops.

The supervisor is real but does nothing outside the process: no partition is
spawned, signalled or written to (``_spawn``, ``_kill`` and ``_to_partition``
are stand-ins), and the services behind it (memory, CPU) are stand-ins.

Allowed: ``ControlError`` from ``LineReader.feed`` (a line past 1 MiB: the
connection is dropped).  ``_handle`` answers every request, good or bad,
with an object (never an exception), and every answer encodes as one
protocol line; ``_on_partition_message`` takes any object silently.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from _fuzzlib import Reader, Writer, instrumented, main

with instrumented():
    import pydantic  # noqa: F401  (memory.set validates with it: imported here, not later)

    from hv import control as C
    from hv import link as L
    from hv import supervisor as SUP
    from hv.config import MemoryConfig, default_config  # noqa: F401
    from hv.memwire import GuestMemoryError
    from hv.rundir import RunDir
    from hv.services import CpuSettings  # noqa: F401
    from hv.supervisor.requests import ControlConnection
    from hv.wire import Frame

MiB = 1 << 20
LINE, RUNTIME, BOOT, EXIT = range(4)
STEPS = [LINE, LINE, LINE, RUNTIME, RUNTIME, BOOT, EXIT]
_CONFIG = default_config()
_tmp: tempfile.TemporaryDirectory[str] | None = None


class _Memory:
    def __init__(self) -> None:
        self.assigned_bytes = 256 * MiB
        self.minimum_bytes = 128 * MiB
        self.maximum_bytes = 1024 * MiB
        self.ballooned_bytes = 0

    def resident_bytes(self) -> int:
        return self.assigned_bytes

    def set_limits(self, *, minimum_bytes: int, maximum_bytes: int) -> None:
        if minimum_bytes > self.assigned_bytes or maximum_bytes < self.assigned_bytes:
            raise GuestMemoryError("the assigned memory is outside the new limits")
        self.minimum_bytes, self.maximum_bytes = minimum_bytes, maximum_bytes


class _Services:
    def __init__(self) -> None:
        self.live: dict[int, Any] = {}
        self.router = SimpleNamespace(host_available=lambda: 8 << 30)

    def measure_cpu(self) -> None:
        pass

    def cpu_usage_percent(self, name: str) -> float:
        return 0.0

    def backends(self) -> dict[str, str]:
        return {"cpu": "fuzz"}

    def assigned_bytes(self, pid: int) -> int:
        live = self.live.get(pid)
        return live.memory.assigned_bytes if live else 0

    def set_cpu(self, name: str, settings: Any) -> None:
        if settings.limit_percent < settings.reserve_percent:
            raise ValueError("reserve above limit")


class _Supervisor(SUP.Supervisor):
    """Everything but the outside world."""

    def _spawn(self, p: SUP.Partition) -> None:
        p.pid = 1 << 30  # (no such process: never signalled, _kill is ours)
        p.started = time.monotonic()
        self._set_state(p, SUP.PartitionState.STARTING)

    def _kill(self, p: SUP.Partition) -> None:
        p.pid = None
        self.services.live.pop(p.id, None)  # type: ignore[union-attr]
        self._set_state(p, SUP.PartitionState.STOPPED)

    def _to_partition(self, p: SUP.Partition, frame: Frame) -> None:
        frame.close_fds()

    def _plog(self, p: SUP.Partition) -> Any:
        return lambda *a, **k: None


def _supervisor() -> _Supervisor:
    global _tmp
    if _tmp is None:
        _tmp = tempfile.TemporaryDirectory(prefix="viridian-fuzz-control-")
    sup = _Supervisor("fuzz", _CONFIG, RunDir("fuzz", Path(_tmp.name)))
    sup.services = _Services()  # type: ignore[assignment]
    return sup


def close() -> None:
    global _tmp
    if _tmp is not None:
        _tmp.cleanup()
        _tmp = None


def _answer(obj: dict[str, Any]) -> None:
    line = C.encode(obj)  # what _send does with it
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    back = json.loads(line)
    assert isinstance(back, dict) and ("ok" in back or "event" in back), back


def TestOneInput(data: bytes) -> None:
    r = Reader(data)
    sup = _supervisor()
    conn = ControlConnection(SimpleNamespace(fileno=lambda: -1))  # type: ignore[arg-type]
    try:
        for _ in range(16):
            if not r.left():
                break
            step = r.pick(STEPS)
            if step == LINE:
                try:
                    items = conn.reader.feed(r.chunk(4000))
                except C.ControlError as e:
                    assert e.code == "bad_request"
                    break
                for item in items:
                    if isinstance(item, C.ControlError):
                        _answer({"ok": False, "error": str(item), "code": item.code})
                    else:
                        resp = sup._handle(conn, item)
                        if resp:  # ({}: answered later, memory.add / balloon)
                            _answer(resp)
            elif step == RUNTIME:
                p = r.pick(sup.parts)
                obj = L.decode_runtime(Frame(L.KIND_RUNTIME, 0, r.chunk(4000)))
                if obj is not None:
                    sup._on_partition_message(p, obj)
            elif step == BOOT:  # a partition started and said hello
                p = r.pick(sup.parts)
                if not p.alive:
                    sup._spawn(p)
                sup.services.live[p.id] = SimpleNamespace(memory=_Memory())  # type: ignore
                sup._on_partition_message(p, {"op": "hello", "guest_visible_bytes": 256 * MiB})
            else:
                p = r.pick(sup.parts)
                if p.alive:
                    sup._kill(p)
        for c in sup._dm_pending.values():  # (answered by the root, or a timer)
            assert c[0] is conn
    finally:
        sup._sel.close()


def _line(w: Writer, obj: Any) -> Writer:
    return w.pick(STEPS, LINE).chunk(json.dumps(obj).encode() + b"\n", 4000)


def _runtime(w: Writer, who: int, obj: Any) -> Writer:
    return w.pick(STEPS, RUNTIME).below(3, who).chunk(json.dumps(obj).encode(), 4000)


def seeds() -> Iterator[bytes]:
    w = Writer()
    for who in (0, 1, 2):
        w.pick(STEPS, BOOT).below(3, who)
    for req in [{"op": "ping"}, {"op": "status"}, {"op": "watch"},
                {"op": "partition.set", "name": "child1", "cpu_weight": 200, "cpu_limit": 50,
                 "cpu_reserve": 10},
                {"op": "memory.set", "name": "child2", "minimum": 128 * MiB, "dynamic": True},
                {"op": "memory.add", "name": "child1", "bytes": 128 * MiB},
                {"op": "memory.balloon", "name": "child2", "bytes": 64 * MiB},
                {"op": "workload", "name": "child1", "device": "echo", "action": "stream",
                 "args": {"size": 1024}},
                {"op": "channel.rescind", "name": "child1", "relid": 1},
                {"op": "trace", "name": "1"},
                {"op": "partition.restart", "name": "child2"},
                {"op": "partition.kill", "name": 1},
                {"op": "partition.start", "name": "child1"},
                {"op": "partition.stop", "name": "root"},
                {"op": "stop", "force": False}]:
        _line(w, req)
    yield w.done()
    w = Writer()
    for who in (0, 1):
        w.pick(STEPS, BOOT).below(3, who)
    for obj in [{"op": "report", "channels": [{"relid": 1, "device": "echo"}]},
                {"op": "trace", "events": [{"t": 1}], "dropped": 0},
                {"op": "memory", "guest_visible_bytes": 300 * MiB},
                {"op": "disks", "disks": {"child1": [{"index": 0, "read_ops": 5}]}},
                {"op": "vmbus.errors", "errors": {"child1": 3}},
                {"op": "dm.status", "child": 1, "committed_bytes": 4096,
                 "available_bytes": 8192, "ballooned_bytes": 0},
                {"op": "dm.result", "req": 1, "ok": True, "pages": 10, "ms": 1.5},
                {"op": "intercept.attached", "child": 2},
                {"op": "intercept.detached", "child": 2}]:
        _runtime(w, 0, obj)
    _line(w, {"op": "memory.add", "name": "child1", "bytes": 4096})
    _runtime(w, 0, {"op": "dm.result", "req": 1, "ok": False, "error": "refused"})
    w.pick(STEPS, EXIT).below(3, 1)
    yield w.done()
    yield _line(Writer(), "not an object").pick(STEPS, LINE).chunk(b"{bad json\n\n", 4000).done()


if __name__ == "__main__":
    main(TestOneInput)
