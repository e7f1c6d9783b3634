"""The echo device: the smallest useful VSP/VSC pair (device.py; docs/devices.md).

Importing this package registers ``echo``.
"""

from .device import ECHO as ECHO
from .device import ECHO_CLASS_ID as ECHO_CLASS_ID
from .device import MODE_ECHO as MODE_ECHO
from .device import MODE_SINK as MODE_SINK
from .device import EchoVsc as EchoVsc
from .device import EchoVsp as EchoVsp

__all__ = ["ECHO", "ECHO_CLASS_ID", "MODE_ECHO", "MODE_SINK", "EchoVsc", "EchoVsp"]
