"""Synthetic SCSI over VMBus: storvsp in the root, storvsc in the child (device.py)."""

from .device import SCSI_CLASS_ID as SCSI_CLASS_ID
from .device import STORVSC as STORVSC
from .device import StorVsc as StorVsc
from .device import StorVsp as StorVsp

__all__ = ["SCSI_CLASS_ID", "STORVSC", "StorVsc", "StorVsp"]
