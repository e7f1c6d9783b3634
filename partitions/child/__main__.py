"""``python -m partitions.child``: a child partition, started by the supervisor."""

from partitions.runtime import main

raise SystemExit(main("child"))
