"""``python -m partitions.root``: a root partition, started by the supervisor."""

from partitions.runtime import main

raise SystemExit(main("root"))
