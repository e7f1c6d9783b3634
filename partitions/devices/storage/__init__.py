"""Storage: disk images and the two ways a child reaches them (docs/storage.md).

Layer: partitions.  The whole of it:

* ``disk``: disk images (``open_image``, zero-copy preadv/pwritev);
* ``scsi/``: synthetic SCSI over VMBus: ``vstor`` (the VSTOR packets),
  ``scsi`` (``ScsiDisk``), ``device`` (``StorVsp``/``StorVsc``, the
  ``storvsc`` DeviceClass);
* ``ide/``: the emulated IDE disk: ``ata`` (the controller and its ports),
  ``driver`` (the child's polling driver), ``worker`` (the root's device
  worker process);
* ``host``: the root's side (IDE workers, disk statistics);
* ``guest``: the child's side (one block API over both, the ``disk`` workload).

Importing this package registers ``storvsc``.
"""

from .scsi import STORVSC as STORVSC

__all__ = ["STORVSC"]
