"""Cluster configuration: a TOML file validated into typed settings per partition.

Layer: hv.  Read by the CLI (to refuse a bad file before anything starts) and by
the supervisor (which runs what the file says).  Pydantic validates; a bad file
raises ``ConfigError`` whose one-line message names the file, the key and why,
e.g. ``cluster.toml: partition[2] (child2).memory.startup: 8M is below
minimum 64M (Minimum <= Startup <= Maximum)``.

The file::

    [[partition]]
    name = "root"             # [A-Za-z0-9_.-], 1-32 characters, unique
    role = "root"             # "root" (exactly one) or "child"
    restart = "on-crash"      # "never" | "on-crash" | "always"
    devices = ["echo"]        # VMBus devices offered to a child: "echo" or { type = "echo", ... }
    memory = { startup = "256M", minimum = "64M", maximum = "1G", dynamic = true }
                              # also buffer = 20 (% kept free over demand, 5-2000) and
                              # weight = 5000 (0-10000: who gets memory first when short);
                              # dynamic: the root's balancer hot-adds / balloons by demand
    cpu = { weight = 100, limit = 100, reserve = 0 }

Sizes are binary (``512M`` = ``512MB`` = ``512MiB`` = 512 x 2**20 bytes) or
plain byte counts, and must be whole 4 KiB pages.  CPU settings follow Hyper-V's
``Set-VMProcessor``: weight 1-10000 (default 100), limit and reserve in percent
of one CPU (limit 1-100, default 100; reserve 0-100, default 0; reserve <= limit).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from hv.abi import PAGE_SIZE
from hv.rundir import NAME_RE

__all__ = [
    "DEFAULT_CONFIG_TOML",
    "NAME_RE",
    "ClusterConfig",
    "ConfigError",
    "CpuConfig",
    "DiskConfig",
    "MemoryConfig",
    "PartitionConfig",
    "default_config",
    "disk_path",
    "dump_toml",
    "format_size",
    "load_config",
    "parse_config",
    "parse_size",
]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


class ConfigError(ValueError):
    """A configuration that cannot run; ``str()`` is one line: file, key, why."""


def parse_size(value: object) -> int:
    """Bytes from ``512M``, ``512MB``, ``512MiB``, ``2g``, ``2GB`` or a plain integer.

    All units are binary, as PowerShell, xl and virsh users expect.

    Raises:
        ValueError: not a size, or not a whole number of 4 KiB pages.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None:
            raise ValueError(f"{value!r} is not a size like 512M, 2G or 1073741824")
        n = int(m.group(1)) << _UNITS[(m.group(2) or "").lower()]
    else:
        raise ValueError(f"{value!r} is not a size like 512M, 2G or 1073741824")
    if n <= 0:
        raise ValueError(f"{value!r}: a size must be positive")
    if n % PAGE_SIZE:
        raise ValueError(f"{value!r} is not a whole number of 4 KiB pages")
    return n


def format_size(n: int) -> str:
    """The shortest exact TOML-friendly spelling: ``512M``, ``2G``, or the byte count."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= (1 << shift) and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


Size = Annotated[int, BeforeValidator(parse_size)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemoryConfig(_Strict):
    """Startup, minimum and maximum guest memory (Hyper-V ``Set-VMMemory``)."""

    startup: Size = Field(default=256 << 20, description="bytes granted at boot")
    minimum: Size = Field(default=64 << 20, description="the balloon never goes below")
    maximum: Size = Field(default=1 << 30, description="hot-add never goes above")
    buffer: int = Field(default=20, ge=5, le=2000,
                        description="% of demand kept free on top (Hyper-V memory buffer)")
    weight: int = Field(default=5000, ge=0, le=10000,
                        description="priority when host memory is short (Hyper-V memory weight)")
    dynamic: bool = Field(default=False, description="the root's balancer moves memory "
                          "between minimum and maximum by demand (Hyper-V Dynamic Memory)")

    @model_validator(mode="after")
    def _ordered(self) -> MemoryConfig:
        if not self.minimum <= self.startup <= self.maximum:
            raise ValueError(
                f"need minimum <= startup <= maximum, got {format_size(self.minimum)} / "
                f"{format_size(self.startup)} / {format_size(self.maximum)}"
            )
        return self


class CpuConfig(_Strict):
    """Processor settings (Hyper-V ``Set-VMProcessor``): weight, limit, reserve."""

    weight: int = Field(default=100, ge=1, le=10000, description="relative share")
    limit: float = Field(default=100, gt=0, le=100, description="cap, % of one CPU")
    reserve: float = Field(default=0, ge=0, le=100, description="floor, % of one CPU")

    @model_validator(mode="after")
    def _reserve_below_limit(self) -> CpuConfig:
        if self.reserve > self.limit:
            raise ValueError(f"reserve ({self.reserve:g} %) exceeds limit ({self.limit:g} %)")
        return self


RestartPolicy = Literal["never", "on-crash", "always"]


class DiskConfig(_Strict):
    """A disk the root serves to a child from a raw image file on the host:
    ``ide`` (emulated, every register access trapped) or ``scsi`` (synthetic,
    storvsc over VMBus).  A missing image is created sparse at ``size``."""

    bus: Literal["ide", "scsi"]
    path: str | None = Field(default=None, description="image file; default: "
                             "$VIRIDIAN_DATA_DIR/<cluster>/<partition>-disk<N>.img")
    size: Size = Field(default=1 << 30, description="bytes, a multiple of 512")

    @model_validator(mode="after")
    def _whole_sectors(self) -> DiskConfig:
        if self.size <= 0 or self.size % 512:
            raise ValueError(f"disk size must be a positive multiple of 512, got {self.size}")
        return self


class PartitionConfig(_Strict):
    name: str = Field(pattern=NAME_RE.pattern)
    role: Literal["root", "child"] = "child"
    memory: MemoryConfig = MemoryConfig()
    cpu: CpuConfig = CpuConfig()
    devices: list[str | dict[str, Any]] = Field(default_factory=list)
    disks: list[DiskConfig] = Field(default_factory=list)
    restart: RestartPolicy = "never"

    @model_validator(mode="after")
    def _disks(self) -> PartitionConfig:
        if self.disks and self.role == "root":
            raise ValueError("the root serves disks; it has none of its own")
        if sum(d.bus == "ide" for d in self.disks) > 1:
            raise ValueError("one ide disk at most (one emulated controller, master only)")
        return self


class ClusterConfig(_Strict):
    """The partitions of one cluster, the root first in start order."""

    partitions: list[PartitionConfig] = Field(alias="partition", min_length=1)

    @model_validator(mode="after")
    def _one_root_unique_names(self) -> ClusterConfig:
        roots = [p.name for p in self.partitions if p.role == "root"]
        if len(roots) != 1:
            raise ValueError(f"need exactly one partition with role = \"root\", found {len(roots)}")
        seen: set[str] = set()
        for p in self.partitions:
            if p.name in seen:
                raise ValueError(f"partition name {p.name!r} is used twice")
            seen.add(p.name)
        return self

    @property
    def root(self) -> PartitionConfig:
        return next(p for p in self.partitions if p.role == "root")

    @property
    def children(self) -> list[PartitionConfig]:
        return [p for p in self.partitions if p.role == "child"]


DEFAULT_CONFIG_TOML = """\
# Viridian cluster: the embedded default (`viridian config default`).
# Edit a copy and start it with `viridian up --config FILE`.
# Sizes are binary (512M = 512 MiB); CPU limit and reserve are % of one CPU.

[[partition]]
name = "root"
role = "root"
restart = "on-crash"
devices = []
memory = { startup = "512M", minimum = "256M", maximum = "2G" }
cpu = { weight = 100, limit = 100, reserve = 0 }

[[partition]]
name = "child1"
role = "child"
restart = "on-crash"
devices = ["echo", "dynmem"]
disks = [{ bus = "scsi", size = "1G" }]
memory = { startup = "256M", minimum = "64M", maximum = "1G", dynamic = true, buffer = 20 }
cpu = { weight = 100, limit = 100, reserve = 0 }

[[partition]]
name = "child2"
role = "child"
restart = "on-crash"
devices = ["echo", "dynmem"]
disks = [{ bus = "ide", size = "1G" }]
memory = { startup = "256M", minimum = "64M", maximum = "1G", dynamic = true, buffer = 20 }
cpu = { weight = 100, limit = 100, reserve = 0 }
"""


def data_dir() -> Path:
    """Where disk images live by default: ``$VIRIDIAN_DATA_DIR``, else
    ``$XDG_DATA_HOME/viridian``, else ``~/.local/share/viridian``.  Images
    are the user's data: they stay after the cluster stops."""
    import os

    if os.environ.get("VIRIDIAN_DATA_DIR"):
        return Path(os.environ["VIRIDIAN_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "viridian"


def disk_path(cluster: str, partition: str, index: int, disk: DiskConfig) -> str:
    """The image file of a partition's ``index``-th disk (absolute)."""
    if disk.path:
        return str(Path(disk.path).expanduser().resolve())
    return str(data_dir() / cluster / f"{partition}-disk{index}.img")


def _where(loc: tuple[int | str, ...], data: object) -> str:
    """``partition[2] (child2).memory.startup`` from a pydantic error location."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("name"), str):
                out += f" ({node['name']})"
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out or "partition"


def _why(err: Any) -> str:
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (a typo?)"
    elif err["type"] == "string_pattern_mismatch":
        msg = "names are 1-32 characters of A-Z a-z 0-9 _ . - starting with a letter or digit"
    return msg


def parse_config(text: str, source: str = "<config>") -> ClusterConfig:
    """Validate TOML text; ``source`` names the file in error messages.

    Raises:
        ConfigError: one line naming ``source``, the key and why.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"{source}: {_where(err['loc'], data)}: {_why(err)}{more}") from None


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a config file.

    Raises:
        ConfigError: unreadable or invalid (one line: file, key, why).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{path}: cannot read: {why}") from None
    return parse_config(text, str(path))


def default_config() -> ClusterConfig:
    """The embedded default cluster: a root and two children that restart on crash."""
    return parse_config(DEFAULT_CONFIG_TOML, "<embedded default>")


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dump_toml(config: ClusterConfig) -> str:
    """TOML text that ``parse_config`` reads back into an equal ``ClusterConfig``."""
    lines: list[str] = []
    for p in config.partitions:
        mem: dict[str, Any] = {k: format_size(getattr(p.memory, k))
                               for k in ("startup", "minimum", "maximum")}
        mem.update(dynamic=p.memory.dynamic, buffer=p.memory.buffer, weight=p.memory.weight)
        cpu = {"weight": p.cpu.weight, "limit": p.cpu.limit, "reserve": p.cpu.reserve}
        lines += [
            "[[partition]]",
            f"name = {_toml_value(p.name)}",
            f"role = {_toml_value(p.role)}",
            f"restart = {_toml_value(p.restart)}",
            f"devices = {_toml_value(p.devices)}",
            f"memory = {_toml_value(mem)}",
            f"cpu = {_toml_value(cpu)}",
            "",
        ]
        for d in p.disks:
            disk: dict[str, Any] = {"bus": d.bus, "size": format_size(d.size)}
            if d.path is not None:
                disk["path"] = d.path
            lines[-1:-1] = ["[[partition.disks]]",
                            *(f"{k} = {_toml_value(v)}" for k, v in disk.items())]
    return "\n".join(lines)
