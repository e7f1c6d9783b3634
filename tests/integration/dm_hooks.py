"""Partition hooks for tests/integration/test_dynamic_memory.py (VIRIDIAN_PARTITION_HOOK).

``VIRIDIAN_DM_ROGUE`` picks what child1 does wrong with Dynamic Memory:

* ``die_on_hot_add``: kill -9 itself the moment a hot-add request arrives
  (after the supervisor mapped the range, before answering);
* ``liar``: report a demand of 64 GiB in every pressure report;
* ``ignore_balloon``: never answer a balloon request.

Other partitions, and child1 without the variable, are left alone.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from partitions.devices.dynmem import protocol as D
from partitions.devices.dynmem.device import DmVsc


def run(rt: Any) -> None:
    rogue = os.environ.get("VIRIDIAN_DM_ROGUE", "")
    if rt.name != "child1" or not rogue:
        return
    rt.log("dm rogue", mode=rogue)
    if rogue == "die_on_hot_add":
        def die(self: DmVsc, rng: D.PageRange, tid: int) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        DmVsc._hot_add = die  # type: ignore[method-assign]
    elif rogue == "liar":
        def status(self: DmVsc) -> D.StatusReport:
            return D.StatusReport(num_avail=0, num_committed=(64 << 30) // 4096)

        DmVsc.status = status  # type: ignore[method-assign]
    elif rogue == "ignore_balloon":
        DmVsc._balloon = lambda self, pages, tid: None  # type: ignore[method-assign]
