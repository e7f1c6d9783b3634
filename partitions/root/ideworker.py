"""``python -m partitions.root.ideworker``: the root's IDE device worker process.

The worker is partitions/devices/storage/ide/worker.py; this name is its
command line (the root starts it so, and hv/rundir.py finds a cluster's
processes by it).
"""

from partitions.devices.storage.ide.worker import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
