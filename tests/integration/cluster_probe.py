"""A partition hook for tests/integration/test_cluster.py (VIRIDIAN_PARTITION_HOOK).

Runs inside real partition processes after boot.  child1 makes hypercalls
through the supervisor, allowed and forbidden, and logs each status; the root
logs what its SynIC receives and answers child1 with a message of its own;
child1 logs what it receives.  The test reads the partitions' JSON-lines logs.
"""

from __future__ import annotations

from typing import Any

from hv.abi import (
    ROOT_EVENT_BASE,
    ROOT_MESSAGE_BASE,
    VMBUS_EVENT_CONNECTION_ID,
    VMBUS_MESSAGE_CONNECTION_ID,
)


def run(rt: Any) -> None:
    def on_synic(msgs: list[Any], flags: list[int]) -> None:
        for m in msgs:
            if not m.payload.startswith((b"hello", b"welcome")):
                continue  # VMBus channel management, which the partitions run themselves
            rt.log("probe message", origin=m.origination_id, payload=m.payload.decode())
            if rt.role == "root" and m.payload.startswith(b"hello"):
                st = rt.hv.post_message(ROOT_MESSAGE_BASE + m.origination_id, 1, b"welcome")
                rt.log("probe call", call="root_to_child", status=int(st))
        if flags:
            rt.log("probe events", flags=flags)

    rt.on_synic = on_synic
    if rt.name != "child1":
        return
    other = 2  # child2's id
    calls = {
        "post_root": lambda: rt.hv.post_message(VMBUS_MESSAGE_CONNECTION_ID, 1, b"hello root"),
        "signal_root": lambda: rt.hv.signal_event(VMBUS_EVENT_CONNECTION_ID, 5),
        "post_other_child": lambda: rt.hv.post_message(ROOT_MESSAGE_BASE + other, 1, b"x"),
        "signal_other_child": lambda: rt.hv.signal_event(ROOT_EVENT_BASE + other, 0),
        "share_not_mine": lambda: rt.hv.share_pages([1 << 30])[0],
        "share_mine": lambda: rt.hv.share_pages([0, 1, 2])[0],
    }
    for name, call in calls.items():
        rt.log("probe call", call=name, status=int(call()))
