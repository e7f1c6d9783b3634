"""Devices: the VSP/VSC framework (``base``) and the devices that ship with Viridian.

Importing this package registers every shipped device (``DEVICES`` by name).
"""

from . import dynmem as dynmem
from . import echo as echo
from . import storvsc as storvsc
from .base import DEVICES as DEVICES
from .base import DeviceClass as DeviceClass
from .base import DeviceError as DeviceError
from .base import Endpoint as Endpoint
from .base import Vsc as Vsc
from .base import Vsp as Vsp
from .base import by_class_id as by_class_id
from .base import register as register

__all__ = ["DEVICES", "DeviceClass", "DeviceError", "Endpoint", "Vsc", "Vsp", "by_class_id",
           "dynmem", "echo", "register", "storvsc"]


def device_spec(entry: object) -> tuple[str, dict]:  # type: ignore[type-arg]
    """A config ``devices`` entry ("echo" or {"type": "echo", ...}) as
    (name, settings).  Raises ValueError for an unknown or malformed entry."""
    if isinstance(entry, str):
        name, cfg = entry, {}
    elif isinstance(entry, dict) and isinstance(entry.get("type"), str):
        name, cfg = entry["type"], {k: v for k, v in entry.items() if k != "type"}
    else:
        raise ValueError(f"a device is a name or a table with a \"type\", not {entry!r}")
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r} (known: {', '.join(sorted(DEVICES))})")
    return name, cfg
