"""Dynamic Memory: hot-add and ballooning of a child's memory (docs/dynamic-memory.md).

Layer: partitions.  The whole device:

* ``protocol``: the DM messages, byte-exact, sans-IO;
* ``device``: ``DmVsp`` (root) and ``DmVsc`` (child), the ``dynmem`` DeviceClass;
* ``balancer``: the root's policy, pure (``plan``);
* ``manager``: the root's ``MemoryManager`` (runs the balancer, carries out
  the CLI's requests, reports demand).

Importing this package registers ``dynmem`` (the root-only manager is
imported by the root's composition root, not here).
"""

from .device import DYNMEM as DYNMEM
from .device import DmVsc as DmVsc
from .device import DmVsp as DmVsp

__all__ = ["DYNMEM", "DmVsc", "DmVsp"]
