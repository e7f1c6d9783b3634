"""Storage two ways between real partitions: an emulated IDE disk behind traps
(child -> supervisor -> device worker in the root) and a synthetic SCSI disk
over VMBus (storvsc -> storvsp), the same image file, the same block API.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from clusterenv import Env, _log_records, _unique, all_pids, assert_no_leaks

from hv.config import default_config, dump_toml
from hv.control import ControlClient

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

HERE = str(Path(__file__).resolve().parent)
GiB = 1 << 30


def config(env: Env, child1: list[dict[str, Any]], child2: list[dict[str, Any]]) -> str:
    from hv.config import DiskConfig

    c = default_config()
    parts = [c.partitions[0]]
    for p, disks in zip(c.partitions[1:], (child1, child2), strict=True):
        parts.append(p.model_copy(update={
            "disks": [DiskConfig(**d) for d in disks],
            "memory": p.memory.model_copy(update={"dynamic": False})}))
    path = env.base / f"storage-{_unique()}.toml"
    path.write_text(dump_toml(c.model_copy(update={"partitions": parts})))
    return str(path)


def disk_ready(st: dict[str, Any], name: str, bus: str) -> bool:
    p = next(p for p in st["partitions"] if p["name"] == name)
    if p["state"] != "running":
        return False
    if bus == "scsi":
        return any(c["class"] == "storvsc" and c.get("device", {}).get("ready")
                   for c in p["channels"])
    return any(d["bus"] == "ide" and d["attached"] for d in p["disks"])


def run(env: Env, cluster: str, child: str, action: str, wait_event: str,
        timeout: float = 60.0, **args: Any) -> list[dict[str, Any]]:
    """Start a disk workload and wait for the log lines it writes."""
    before = len([r for r in _log_records(env, cluster, child) if r["event"] == wait_event])
    with ControlClient(env.rundir(cluster).control_socket, timeout=10) as c:
        assert c.request("workload", name=child, device="disk", action=action, args=args)["ok"]
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in _log_records(env, cluster, child) if r["event"] == wait_event]
        if len(recs) > before:
            return recs[before:]
        failed = [r for r in _log_records(env, cluster, child)
                  if r["event"] == "disk workload failed"]
        assert not failed, failed
        assert time.monotonic() < deadline, f"no {wait_event!r} from {child}"
        time.sleep(0.05)


def test_both_paths_work_and_data_crosses_them(env: Env) -> None:
    image = str(env.base / "shared.img")
    name = _unique()
    # child1 writes through the synthetic SCSI disk
    env.up(name, "--config", config(env, [{"bus": "scsi", "path": image, "size": "64M"}],
                                     [{"bus": "ide", "size": "64M"}]))
    st = env.wait_status(name, lambda s: disk_ready(s, "child1", "scsi")
                         and disk_ready(s, "child2", "ide"), timeout=20)
    [w] = run(env, name, "child1", "pattern", "disk pattern", path="scsi", mode="write",
              seed=42, tag="w")
    [chk] = run(env, name, "child1", "pattern", "disk pattern", path="scsi", mode="check",
                seed=42, tag="c")
    assert w["bad"] == 0 and chk["bad"] == 0
    # both paths of the same API on the other child, and its status
    for path in ("ide-dma", "ide-pio"):
        [b] = run(env, name, "child2", "bench", "disk bench", path=path, block=4096,
                  ops=3 if path == "ide-pio" else 50)
        # every register access trapped: 14 per DMA op, 8 + 257 per sector by PIO
        assert b["traps"] == b["ops"] * (14 if path == "ide-dma" else 2064), b
    st = env.wait_status(name, lambda s: next(p for p in s["partitions"]
                                              if p["name"] == "child2")["disks"][0][
                                                  "read_ops"] >= 53)  # stats every 0.25 s
    d1 = next(p for p in st["partitions"] if p["name"] == "child1")["disks"][0]
    d2 = next(p for p in st["partitions"] if p["name"] == "child2")["disks"][0]
    assert d1["bus"] == "scsi" and d1["path"] == image and d1["size_bytes"] == 64 << 20
    assert d1["write_ops"] >= 64 and d1["read_ops"] >= 64
    assert d2["bus"] == "ide" and d2["traps"] > 0 and d2["read_ops"] >= 53
    env.cli("down", "--name", name)
    assert_no_leaks(env, name, all_pids(st))

    # the same image, attached to child1 as the emulated IDE disk now
    name2 = _unique()
    env.up(name2, "--config", config(env, [{"bus": "ide", "path": image, "size": "64M"}],
                                      []))
    st = env.wait_status(name2, lambda s: disk_ready(s, "child1", "ide"), timeout=20)
    for path in ("ide-dma", "ide-pio"):
        [r] = run(env, name2, "child1", "pattern", "disk pattern", path=path, mode="check",
                  seed=42, lbas=64 if path == "ide-dma" else 4)
        assert r["bad"] == 0, r
    [r] = run(env, name2, "child1", "pattern", "disk pattern", path="ide-dma", mode="check",
              seed=42)
    assert r["digest"] == chk["digest"]  # byte for byte what the SCSI path read
    env.cli("down", "--name", name2)
    assert_no_leaks(env, name2, all_pids(st))


def test_bad_input_gets_error_status_and_the_root_goes_on(env: Env) -> None:
    env.env["VIRIDIAN_PARTITION_HOOK"] = "storage_rogue:run"
    env.env["PYTHONPATH"] = os.pathsep.join(x for x in (HERE, env.env.get("PYTHONPATH")) if x)
    name = _unique()
    env.up(name, "--config", config(env, [{"bus": "ide", "size": "64M"},
                                          {"bus": "scsi", "size": "64M"}],
                                     [{"bus": "scsi", "size": "64M"}]))
    st = env.wait_status(name, lambda s: disk_ready(s, "child1", "scsi")
                         and disk_ready(s, "child1", "ide") and disk_ready(s, "child2", "scsi"),
                         timeout=20)
    root_pid = next(p["pid"] for p in st["partitions"] if p["name"] == "root")
    run(env, name, "child1", "rogue", "rogue disk done")
    got = {r["attempt"]: r for r in _log_records(env, name, "child1")
           if r["event"] == "rogue disk"}
    assert not [r for r in got.values() if r.get("outcome") in ("accepted", "crashed")], got
    for attempt in ("ide prd table outside memory", "ide prd data outside memory"):
        assert got[attempt]["bm_status"] & 0x02 and got[attempt]["status"] & 0x01  # ERROR, ERR
    assert got["ide past the end"]["error"] & 0x10  # IDNF
    outside = got["scsi gpa range outside memory"]
    assert outside["scsi_status"] == 2 and outside["sense"][4:6] == "05"  # ILLEGAL REQUEST
    past = got["scsi past the end"]
    assert past["scsi_status"] == 2 and past["sense"][24:28] == "2100"  # LBA out of range
    assert got["scsi cdb longer than its field"]["vstor_status"] == 0xC000000D
    # the root and the other child go on; nothing restarted
    [b] = run(env, name, "child2", "bench", "disk bench", path="scsi", block=4096, ops=50)
    assert b["ops_per_s"] > 0
    st = env.status(name)
    assert all(p["restarts"] == 0 and p["state"] == "running" for p in st["partitions"])
    assert next(p["pid"] for p in st["partitions"] if p["name"] == "root") == root_pid
    env.cli("down", "--name", name)
    assert_no_leaks(env, name, all_pids(st))
