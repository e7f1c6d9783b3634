"""What the supervisor knows of each partition: its state and its reports.

Layer: hv, the supervisor's side.  One ``Partition`` per configured
partition, for the supervisor's whole life (a restart is a new process, the
same ``Partition``); ``PartitionState`` is its lifecycle (hv/supervisor/
lifecycle.py moves it).  The fields filled from a partition's reports
(channels, demand, disk stats, error counts) are checked once on arrival.

Trust: plain data; nothing here reads input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hv.config import PartitionConfig
from hv.jsonlog import JsonLog
from hv.services import CpuSettings
from hv.supervisor.link_end import SupervisorEnd

__all__ = ["DISK_COUNTERS", "DISK_STAT_KEYS", "Partition", "PartitionState"]

# the root's per-disk counters (op "disks"): only int values of these keys are kept
DISK_COUNTERS = ("read_ops", "write_ops", "read_bytes", "write_bytes", "flushes", "errors")
DISK_STAT_KEYS = frozenset(("index", *DISK_COUNTERS))


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
    route: Any = None  # hv.intercept.route.InterceptRoute while it runs with an ide disk
    disk_stats: list[dict[str, Any]] = field(default_factory=list)  # the root's report
    vmbus_errors: int = 0  # the root's count of this child's VMBus protocol errors
    tracers: set[int] = field(default_factory=set)  # control connections tracing it

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def alive(self) -> bool:
        return self.pid is not None
