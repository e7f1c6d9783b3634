"""The hypervisor services as the supervisor sees them: one narrow facade.

Layer: hv.  The supervisor (hv/supervisor.py) asks this module for a
partition's boot grant, hands it hypercalls, tells it when a partition starts
and exits, and reads accounting back.  Behind it are the service modules
(hv/memory.py, hv/cpu.py, hv/hypercalls.py, hv/synic.py); while one is not
installed, a minimal stand-in keeps the cluster running:

- memory: one memfd of the startup size per partition, granted at GPA 0;
- CPU: settings are kept and reported, usage is measured, nothing is enforced;
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

    def backends(self) -> dict[str, str]:
        return {"memory": self.memory.name, "cpu": "none (settings only)",
                "hypercalls": "none (every call: INVALID_HYPERCALL_CODE)"}

    # -- partition life cycle ------------------------------------------------------------

    def add_partition(self, name: str, pid_id: int, startup_bytes: int,
                      cpu: CpuSettings) -> BootGrant:
        """Before the process starts: its memory and (later) SynIC; returns the grant."""
        self.cpu[name] = cpu
        return self.memory.grant(name, startup_bytes)

    def partition_started(self, name: str, pid: int) -> None:
        """The process exists: put it under CPU arbitration."""

    def remove_partition(self, name: str) -> None:
        """The process is gone (any exit): release everything it held."""
        self.memory.release(name)

    # -- while running -------------------------------------------------------------------

    def hypercall(self, caller: str, request: bytes) -> bytes:
        """Route one encoded hypercall from ``caller``; returns the encoded reply."""
        if len(request) < 2:
            return struct.pack("<H", HV_STATUS_INVALID_HYPERCALL_INPUT)
        return struct.pack("<H", HV_STATUS_INVALID_HYPERCALL_CODE)

    def set_cpu(self, name: str, settings: CpuSettings) -> None:
        self.cpu[name] = settings

    def assigned_bytes(self, name: str) -> int:
        return self.memory.assigned_bytes(name)

    def cpu_usage_percent(self, name: str) -> float | None:
        """The service's measured share, or None (the supervisor then measures)."""
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.memory.close()
