"""The hypervisor services as the supervisor sees them: one narrow facade.

Layer: hv.  The supervisor (hv/supervisor/) asks this module to set a
partition up before its process starts (memory, SynIC, router entry, CPU
group), hands it every hypercall frame, tells it when a partition exits, and
reads accounting back.  Behind it:

- hv/memory.py ``GuestMemory``: the partition's memfd ranges (startup range
  at GPA 0), sent as one MEMORY (MAP) frame at boot;
- hv/synic.py ``SynicHost``: its message page, event flags, interrupt and EOM;
- hv/router.py ``HypercallRouter``: HvPostMessage / HvSignalEvent with
  permission checks over the cluster's connections (below);
- hv/cpu.py ``CpuArbiter``: weight / limit / reserve (cgroup v2, v1, or a
  userspace credit scheduler); without that module, CPU settings are kept
  and reported but not enforced.

Connections (the router's table; each partition learns its IDs at boot):

=====================  =======  ==========  ================================
connection ID          kind     target      who may use it
=====================  =======  ==========  ================================
1 (VMBus message)      message  root        every child
4 (VMBus contact, 5.0) message  root        every child
2 (VMBus event)        event    root        every child (flags 0..2047)
0x10000 + child id     message  that child  the root
0x20000 + child id     event    that child  the root (flags 0..2047)
=====================  =======  ==========  ================================

A partition's resources live exactly as long as its process: a restart gets
fresh memory and a fresh SynIC, and the router answers INVALID_PORT_ID for a
partition that is down.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from hv.abi import (
    FLAGS_PER_SINT,
    ROOT_EVENT_BASE,
    ROOT_MESSAGE_BASE,
    VMBUS_EVENT_CONNECTION_ID,
    VMBUS_MESSAGE_CONNECTION_ID,
    VMBUS_MESSAGE_CONNECTION_ID_4,
)
from hv.memory import GuestMemory
from hv.router import Connection, ConnectionKind, HypercallRouter
from hv.synic import SynicHost
from hv.wire import Frame

__all__ = ["BootGrant", "CpuSettings", "Services"]


@dataclass
class CpuSettings:
    weight: int = 100
    limit_percent: float = 100.0
    reserve_percent: float = 0.0


@dataclass
class BootGrant:
    """What a partition gets at boot (the fds stay owned by the services)."""

    synic_fds: list[int]
    memory: Frame
    connections: dict[str, Any] = field(default_factory=dict)


def _load_cpu_arbiter(cluster: str) -> Any:
    try:
        from hv import cpu
    except ImportError:
        return None
    try:
        return cpu.CpuArbiter(cluster)
    except (OSError, ValueError):
        return cpu.CpuArbiter(cluster, mechanism="userspace")


@dataclass
class _Live:
    """The resources of one running partition."""

    memory: GuestMemory
    synic: SynicHost


class Services:
    """The service modules behind one facade.

    Args:
        cluster: the cluster's name.
        root_id: the root partition's id (0).
        child_ids: the children's ids (the connection table is built from them).
    """

    def __init__(self, cluster: str, root_id: int, child_ids: list[int]) -> None:
        self.cluster = cluster
        self.root_id = root_id
        self.router = HypercallRouter(root_id)
        self.cpu: dict[str, CpuSettings] = {}
        self.live: dict[int, _Live] = {}
        self.arbiter = _load_cpu_arbiter(cluster)
        self._usage: dict[str, float] = {}
        kids = frozenset(child_ids)
        root = frozenset({root_id})
        self.router.add_connection(Connection(VMBUS_MESSAGE_CONNECTION_ID, root_id,
                                              ConnectionKind.MESSAGE, kids))
        self.router.add_connection(Connection(VMBUS_MESSAGE_CONNECTION_ID_4, root_id,
                                              ConnectionKind.MESSAGE, kids))
        self.router.add_connection(Connection(VMBUS_EVENT_CONNECTION_ID, root_id,
                                              ConnectionKind.EVENT, kids,
                                              flag_count=FLAGS_PER_SINT))
        for c in child_ids:
            self.router.add_connection(Connection(ROOT_MESSAGE_BASE + c, c,
                                                  ConnectionKind.MESSAGE, root))
            self.router.add_connection(Connection(ROOT_EVENT_BASE + c, c, ConnectionKind.EVENT,
                                                  root, flag_count=FLAGS_PER_SINT))
        self._child_ids = list(child_ids)

    def backends(self) -> dict[str, str]:
        return {"memory": "memfd ranges (hv.memory)", "synic": "hv.synic",
                "cpu": self.arbiter.mechanism if self.arbiter else "none (settings only)",
                "hypercalls": "hv.hypercalls router"}

    def connections_of(self, pid_: int) -> dict[str, Any]:
        """The connection IDs partition ``pid_`` may use, by purpose (sent at boot)."""
        if pid_ == self.root_id:
            return {"to_child_message": {str(c): ROOT_MESSAGE_BASE + c for c in self._child_ids},
                    "to_child_event": {str(c): ROOT_EVENT_BASE + c for c in self._child_ids}}
        return {"to_root_message": VMBUS_MESSAGE_CONNECTION_ID,
                "to_root_contact": VMBUS_MESSAGE_CONNECTION_ID_4,
                "to_root_event": VMBUS_EVENT_CONNECTION_ID}

    def _cpu_args(self, s: CpuSettings) -> dict[str, Any]:
        """Our settings in hv.cpu's terms: a 100 % limit is no cap."""
        return {"weight": s.weight,
                "limit_percent": None if s.limit_percent >= 100 else s.limit_percent,
                "reserve_percent": s.reserve_percent}

    # -- partition life cycle ------------------------------------------------------------

    def add_partition(self, pid_: int, name: str, memory: tuple[int, int, int],
                      cpu: CpuSettings) -> BootGrant:
        """Before the process starts: its memory, SynIC, router entry and CPU group.

        Args:
            pid_: the partition id.
            memory: (startup, minimum, maximum) bytes.

        Raises:
            OSError, ValueError: a resource could not be made (nothing is kept).
        """
        self.remove_partition(pid_, name)
        startup, minimum, maximum = memory
        mem = GuestMemory(pid_, startup, minimum_bytes=minimum, maximum_bytes=maximum, name=name)
        try:
            syn = SynicHost(pid_, label=f"{self.cluster}-{name}")
        except BaseException:
            mem.close()
            raise
        self.live[pid_] = _Live(mem, syn)
        try:
            self.router.add_partition(pid_, syn, memory=mem)
            self.cpu[name] = cpu
            if self.arbiter is not None:
                from hv.cpu import CpuSettings as ArbiterSettings

                self.arbiter.add_partition(name, ArbiterSettings(**self._cpu_args(cpu)))
        except BaseException:
            self.remove_partition(pid_, name)
            raise
        return BootGrant(list(syn.handles()), mem.map_message().frame(),
                         self.connections_of(pid_))

    def partition_started(self, name: str, pid: int) -> None:
        """The process exists: put it under CPU arbitration."""
        if self.arbiter is not None:
            with contextlib.suppress(ProcessLookupError, KeyError):
                self.arbiter.attach(name, pid)

    def remove_partition(self, pid_: int, name: str) -> None:
        """The process is gone (any exit): release everything it held.

        Its grants to the root are revoked (the REVOKE frames come out of
        ``take_outbox``); messages queued for it are dropped."""
        self.router.remove_partition(pid_)
        live = self.live.pop(pid_, None)
        if live is not None:
            live.synic.close()
            live.memory.close()
        if self.arbiter is not None and name in self.arbiter.partitions():
            self.arbiter.remove_partition(name)
        self._usage.pop(name, None)

    # -- while running -------------------------------------------------------------------

    def eom_fileno(self, pid_: int) -> int:
        return self.live[pid_].synic.eom_fileno()

    def service_synic(self, pid_: int) -> None:
        """The partition signalled EOM: refill its freed message slots."""
        live = self.live.get(pid_)
        if live is not None:
            live.synic.service()

    def hypercall(self, caller: int, frame: Frame) -> Frame | None:
        """Route one HYPERCALL frame from ``caller`` (the link's owner); returns
        the REPLY frame (None: no reply wanted).  Raises WireError if malformed."""
        return self.router.handle_frame(caller, frame)

    def take_outbox(self) -> list[tuple[int, Frame]]:
        """Frames the router produced for other partitions (grants to the root)."""
        return self.router.take_outbox()

    def set_cpu(self, name: str, settings: CpuSettings) -> None:
        """Change a partition's CPU settings (live if it runs).

        Raises:
            ValueError: not satisfiable (e.g. the reserves exceed the machine).
        """
        if self.arbiter is not None and name in self.arbiter.partitions():
            self.arbiter.set(name, **self._cpu_args(settings))
        self.cpu[name] = settings

    def hot_add(self, pid_: int, nbytes: int) -> Frame:
        """Grow a running partition's memory by ``nbytes`` (a new memfd range
        after its last one); returns the MAP frame to send it.

        Raises:
            hv.memory.GuestMemoryError (MemoryLimitError): above its maximum.
        """
        return self.live[pid_].memory.hot_add(nbytes).frame()

    def balloon(self, pid_: int, nbytes: int) -> Frame:
        """Take ``nbytes`` back from a running partition (its highest free
        pages, punched out of the memfd); returns the BALLOON frame to send it.

        Raises:
            hv.memory.GuestMemoryError: below its minimum, or not enough free pages.
        """
        return self.live[pid_].memory.balloon_bytes(nbytes).frame()

    def assigned_bytes(self, pid_: int) -> int:
        live = self.live.get(pid_)
        return live.memory.assigned_bytes if live is not None else 0

    def measure_cpu(self) -> None:
        """Take one usage sample of every partition (call once per status)."""
        if self.arbiter is not None:
            self._usage = {n: u.usage_percent for n, u in self.arbiter.usage(0.25).items()}

    def cpu_usage_percent(self, name: str) -> float | None:
        """The measured share (% of one CPU) from the last ``measure_cpu``, or None
        (the supervisor then measures itself)."""
        if self.arbiter is None:
            return None
        return self._usage.get(name, 0.0)

    def tick_interval(self) -> float | None:
        """Seconds until ``tick`` is due (None: never; the cgroup mechanisms)."""
        if self.arbiter is None:
            return None
        t = self.arbiter.interval()
        return None if t == float("inf") else t

    def tick(self) -> None:
        if self.arbiter is not None:
            self.arbiter.tick()

    def close(self) -> None:
        for pid_ in list(self.live):
            live = self.live.pop(pid_)
            live.synic.close()
            live.memory.close()
        if self.arbiter is not None:
            self.arbiter.close()
