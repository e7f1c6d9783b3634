"""The hypervisor services as the supervisor sees them: one narrow facade.

Layer: hv.  The supervisor (hv/supervisor.py) asks this module for a
partition's boot grant, hands it hypercalls, tells it when a partition starts
and exits, and reads accounting back.  Behind it are the service modules
(hv/memory.py, hv/cpu.py, hv/hypercalls.py, hv/synic.py); while one is not
installed, a minimal stand-in keeps the cluster running:

- memory: one memfd of the startup size per partition, granted at GPA 0;
- CPU (hv/cpu.py ``CpuArbiter``: cgroup v2, v1, or a userspace credit
  scheduler): without it, settings are kept and reported, nothing is enforced;
- hypercalls: every call answers HV_STATUS_INVALID_HYPERCALL_CODE (2).

``backends()`` says which is in use; ``viridian status --json`` shows it.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BootGrant", "CpuSettings", "Services"]

HV_STATUS_INVALID_HYPERCALL_CODE = 2
HV_STATUS_INVALID_HYPERCALL_INPUT = 3


@dataclass
class CpuSettings:
    weight: int = 100
    limit_percent: float = 100.0
    reserve_percent: float = 0.0


@dataclass
class BootGrant:
    """What a partition gets at boot: memory ranges with their fds, and extras.

    ``fds`` are owned by the services (the supervisor sends dups and closes nothing).
    """

    memory: list[dict[str, int]] = field(default_factory=list)  # [{"gpa", "bytes"}]
    fds: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class _FallbackMemory:
    """One memfd of the startup size per running partition."""

    name = "memfd (stand-in)"

    def __init__(self) -> None:
        self._fds: dict[str, tuple[int, int]] = {}

    def grant(self, name: str, startup_bytes: int) -> BootGrant:
        self.release(name)
        fd = os.memfd_create(f"viridian-{name}-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, startup_bytes)
        self._fds[name] = (fd, startup_bytes)
        return BootGrant(memory=[{"gpa": 0, "bytes": startup_bytes}], fds=[fd])

    def assigned_bytes(self, name: str) -> int:
        return self._fds.get(name, (-1, 0))[1]

    def release(self, name: str) -> None:
        fd, _ = self._fds.pop(name, (-1, 0))
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        for name in list(self._fds):
            self.release(name)


def _load_cpu_arbiter(cluster: str) -> Any:
    try:
        from hv import cpu
    except ImportError:
        return None
    try:
        return cpu.CpuArbiter(cluster)
    except (OSError, ValueError):
        return cpu.CpuArbiter(cluster, mechanism="userspace")


class Services:
    """The service modules behind one facade, with stand-ins for missing ones.

    Args:
        cluster: the cluster's name (prefix of any named object).
        manifest: the run directory's ``Manifest``; named objects go in it.
    """

    def __init__(self, cluster: str, manifest: Any) -> None:
        self.cluster = cluster
        self.manifest = manifest
        self.memory = _FallbackMemory()
        self.cpu: dict[str, CpuSettings] = {}
        self.arbiter = _load_cpu_arbiter(cluster)
        self._usage: dict[str, float] = {}

    def backends(self) -> dict[str, str]:
        return {"memory": self.memory.name,
                "cpu": self.arbiter.mechanism if self.arbiter else "none (settings only)",
                "hypercalls": "none (every call: INVALID_HYPERCALL_CODE)"}

    def _cpu_args(self, s: CpuSettings) -> dict[str, Any]:
        """Our settings in hv.cpu's terms: a 100 % limit is no cap."""
        return {"weight": s.weight,
                "limit_percent": None if s.limit_percent >= 100 else s.limit_percent,
                "reserve_percent": s.reserve_percent}

    # -- partition life cycle ------------------------------------------------------------

    def add_partition(self, name: str, pid_id: int, startup_bytes: int,
                      cpu: CpuSettings) -> BootGrant:
        """Before the process starts: its memory and (later) SynIC; returns the grant."""
        self.cpu[name] = cpu
        if self.arbiter is not None:
            from hv.cpu import CpuSettings as ArbiterSettings

            self.arbiter.add_partition(name, ArbiterSettings(**self._cpu_args(cpu)))
        try:
            return self.memory.grant(name, startup_bytes)
        except BaseException:
            self.remove_partition(name)
            raise

    def partition_started(self, name: str, pid: int) -> None:
        """The process exists: put it under CPU arbitration."""
        if self.arbiter is not None:
            with contextlib.suppress(ProcessLookupError, KeyError):
                self.arbiter.attach(name, pid)

    def remove_partition(self, name: str) -> None:
        """The process is gone (any exit): release everything it held."""
        self.memory.release(name)
        if self.arbiter is not None:
            self.arbiter.remove_partition(name)
        self._usage.pop(name, None)

    # -- while running -------------------------------------------------------------------

    def hypercall(self, caller: str, request: bytes) -> bytes:
        """Route one encoded hypercall from ``caller``; returns the encoded reply."""
        if len(request) < 2:
            return struct.pack("<H", HV_STATUS_INVALID_HYPERCALL_INPUT)
        return struct.pack("<H", HV_STATUS_INVALID_HYPERCALL_CODE)

    def set_cpu(self, name: str, settings: CpuSettings) -> None:
        """Change a partition's CPU settings (live if it runs).

        Raises:
            ValueError: not satisfiable (e.g. the reserves exceed the machine).
        """
        if self.arbiter is not None and name in self.arbiter.partitions():
            self.arbiter.set(name, **self._cpu_args(settings))
        self.cpu[name] = settings

    def assigned_bytes(self, name: str) -> int:
        return self.memory.assigned_bytes(name)

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
        with contextlib.suppress(Exception):
            self.memory.close()
        if self.arbiter is not None:
            self.arbiter.close()
