"""Devices: the VSP/VSC framework (``framework``) and one folder per device.

Layer: partitions.  Each subpackage here is one device, whole: ``echo/``,
``dynmem/`` (Dynamic Memory), ``storage/`` (disks: synthetic SCSI and the
emulated IDE controller).  A device folder registers its ``DeviceClass``
when it is imported, and importing this package imports every folder it
holds, so ``DEVICES`` (by name) knows every shipped device and a new device
is one new folder that touches nothing here (docs/devices.md).
"""

import importlib
import pkgutil

from .framework import DEVICES as DEVICES
from .framework import DeviceClass as DeviceClass
from .framework import DeviceError as DeviceError
from .framework import DeviceResources as DeviceResources
from .framework import Endpoint as Endpoint
from .framework import Hypercalls as Hypercalls
from .framework import Vsc as Vsc
from .framework import Vsp as Vsp
from .framework import by_class_id as by_class_id
from .framework import device_spec as device_spec
from .framework import disk_clients as disk_clients
from .framework import disk_offers as disk_offers
from .framework import register as register

__all__ = ["DEVICES", "DeviceClass", "DeviceError", "DeviceResources", "Endpoint", "Hypercalls",
           "Vsc", "Vsp", "by_class_id", "device_spec", "disk_clients", "disk_offers", "register"]

for _folder in pkgutil.iter_modules(__path__):
    if _folder.ispkg:
        importlib.import_module(f"{__name__}.{_folder.name}")
