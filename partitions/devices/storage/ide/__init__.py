"""The emulated IDE disk: the controller (ata.py), the child's driver (driver.py),
the root's device worker (worker.py), every register access trapped (hv/intercept/)."""

from .ata import IDE_PORTS as IDE_PORTS

__all__ = ["IDE_PORTS"]
