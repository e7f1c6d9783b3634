"""Each partition's disks in ``viridian status`` (``--json`` and the table),
through the real CLI: the embedded default gives child1 a synthetic SCSI
disk and child2 an emulated IDE one, images made sparse in the data folder
(``VIRIDIAN_DATA_DIR``, set by Env) and kept after ``down``.  The demo's
disks panel, progress item and summary are checked in test_demo_trace.py.
Every wait polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal

import pytest
from clusterenv import Env, _log_records, _unique, all_pids, assert_no_leaks
from pydantic import BaseModel, ConfigDict

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(30)]

GiB = 1 << 30


class DiskStatus(BaseModel):
    """An entry of a partition's ``disks`` (docs/status-schema.md), as a tool checks it."""

    model_config = ConfigDict(extra="allow", strict=True)
    bus: Literal["ide", "scsi"]
    path: str
    size_bytes: int
    read_ops: int
    write_ops: int
    read_bytes: int
    write_bytes: int
    flushes: int
    errors: int
    traps: int | None = None
    traps_forwarded: int | None = None


def part(st: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in st["partitions"] if p["name"] == name)


def scsi_ready(st: dict[str, Any]) -> bool:
    p = part(st, "child1")
    return p["state"] == "running" and any(
        c["class"] == "storvsc" and c["state"] == "open" and c.get("device", {}).get("ready")
        for c in p["channels"])


def test_status_lists_each_partitions_disks(env: Env) -> None:
    name = _unique()
    env.up(name)
    env.wait_status(name, scsi_ready)
    with env.client(name) as c:
        c.request("workload", name="child1", device="disk", action="bench",
                  args={"path": "scsi", "block": 4096, "ops": 64, "qd": 1, "write": False,
                        "tag": "status"})
    # the root reports its counters at most every 0.25 s
    st = env.wait_status(name, lambda s: part(s, "child1")["disks"][0]["read_ops"] >= 64)
    bench = [r for r in _log_records(env, name, "child1") if r["event"] == "disk bench"]
    assert [r["ops"] for r in bench] == [64], bench

    # --json: every partition has its disks, with the documented keys
    r = env.cli("status", "--name", name, "--json")
    assert r.returncode == 0, r.stderr
    js = json.loads(r.stdout)
    assert part(js, "root")["disks"] == []
    [d1] = [DiskStatus.model_validate(d) for d in part(js, "child1")["disks"]]
    [d2] = [DiskStatus.model_validate(d) for d in part(js, "child2")["disks"]]
    data = env.base / "data" / name
    assert d1.bus == "scsi" and d1.path == str(data / "child1-disk0.img")
    assert d2.bus == "ide" and d2.path == str(data / "child2-disk0.img")
    assert d1.size_bytes == d2.size_bytes == GiB
    assert (d1.read_ops, d1.write_ops, d1.read_bytes, d1.write_bytes) == (64, 0, 64 * 4096, 0)
    assert d1.traps is None and "traps" not in part(js, "child1")["disks"][0]  # no traps: VMBus
    assert d2.traps is not None and d2.traps_forwarded is not None
    assert 0 <= d2.traps_forwarded <= d2.traps
    assert (d2.read_ops, d2.write_ops) == (0, 0)
    for d in (d1, d2):  # created sparse
        s = os.stat(d.path)
        assert s.st_size == GiB and s.st_blocks * 512 < 64 << 20, (d.path, s.st_blocks)

    # the table: one per partition with disks, under the channels; at most 80 columns
    r = env.cli("status", "--name", name)
    assert r.returncode == 0, r.stderr
    assert all(len(line) <= 80 for line in r.stdout.splitlines()), r.stdout
    out = "\n".join(line.rstrip() for line in r.stdout.splitlines())
    assert "  root: " not in out.split("Fill %: outgoing/incoming ring")[1], out
    assert re.search(r"^  child1: 1 disk\n  Bus\s+Size\s+Ops r/w\s+Bytes r/w\s+Traps\s+Err\s+"
                     r"Image\n  ─+\n  scsi\s+1.0GiB\s+64/0\s+256KiB/0B\s+-\s+0\s+"
                     r"\S*/child1-disk0\.img$", out, re.M), out
    assert re.search(r"^  child2: 1 disk\n.*\n.*\n  ide\s+1.0GiB\s+0/0\s+0B/0B\s+\d+\s+0\s+"
                     r"\S*/child2-disk0\.img$", out, re.M), out
    assert re.search(r"^Bus: scsi synthetic \(VMBus\), ide emulated \(trapped\)", out, re.M)

    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_no_leaks(env, name, all_pids(st))
    # the images are the user's data: they stay
    assert os.path.exists(d1.path) and os.path.exists(d2.path)
