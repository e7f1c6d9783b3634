"""Dynamic Memory between real partitions: hot-add while the child allocates,
balloon returning memory to the OS, every limit, hostile children.

Clusters here start from the default config with dynamic memory as each test
needs it; the root's DM VSP, the child's DM VSC and the supervisor's memory
calls are the real ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from clusterenv import Env, _unique, all_pids, assert_no_leaks, fds_at_most, settled_fds

from hv.config import default_config, dump_toml
from hv.control import ControlError

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]

MiB = 1 << 20
HERE = str(Path(__file__).resolve().parent)


def config(env: Env, *, dynamic: bool, minimum: int = 64, maximum: int = 1024,
           devices: tuple[str, ...] = ("echo", "dynmem")) -> str:
    c = default_config()
    parts = [c.partitions[0]] + [
        p.model_copy(update={"devices": list(devices), "memory": p.memory.model_copy(update={
            "dynamic": dynamic, "minimum": minimum * MiB, "maximum": maximum * MiB})})
        for p in c.partitions[1:]]
    path = env.base / f"dm-{dynamic}-{minimum}-{maximum}-{'-'.join(devices)}.toml"
    path.write_text(dump_toml(c.model_copy(update={"partitions": parts})))
    return str(path)


def hooks(env: Env, rogue: str) -> None:
    env.env["VIRIDIAN_PARTITION_HOOK"] = "dm_hooks:run"
    env.env["VIRIDIAN_DM_ROGUE"] = rogue
    env.env["PYTHONPATH"] = os.pathsep.join(x for x in (HERE, env.env.get("PYTHONPATH")) if x)


def mem(st: dict[str, Any], name: str = "child1") -> dict[str, Any]:
    return next(p for p in st["partitions"] if p["name"] == name)["memory"]


def dm(st: dict[str, Any], name: str = "child1") -> dict[str, Any] | None:
    p = next(p for p in st["partitions"] if p["name"] == name)
    for c in p["channels"]:
        if c["class"] == "dynmem" and c["state"] == "open" and c.get("device", {}).get(
                "state") == "ready":
            return c["device"]
    return None


def request(env: Env, cluster: str, op: str, **args: Any) -> dict[str, Any]:
    with env.client(cluster) as c:
        c.timeout = 20.0
        return c.request(op, **args)


def test_hot_add_while_the_child_allocates(env: Env) -> None:
    name = _unique()
    env.up(name, "--config", config(env, dynamic=True))
    env.wait_status(name, lambda s: dm(s) is not None)
    r = request(env, name, "workload", name="child1", device="dynmem", action="bursts",
                args={"peak_mb": 480, "step_mb": 96, "period_s": 0.25})
    assert r["ok"]
    # the balancer grows the child past its 256 MiB startup as the workload needs it
    st = env.wait_status(name, lambda s: dm(s) and dm(s)["workload_pages"] * 4096 > 300 * MiB,
                         timeout=30)
    # past what unballooning its startup memory could give: hot-added
    assert mem(st)["assigned_bytes"] > 300 * MiB and dm(st)["hot_adds"] >= 1
    # ... and shrinks it when the workload lets go, the data checked page by page
    st = env.wait_status(name, lambda s: dm(s)["verified_pages"] * 4096 > 300 * MiB
                         and mem(s)["assigned_bytes"] < 200 * MiB, timeout=30)
    assert dm(st)["corrupt_pages"] == 0
    assert mem(st)["assigned_bytes"] >= mem(st)["minimum_bytes"]
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stderr
    assert_no_leaks(env, name, all_pids(st))


def test_add_and_balloon_by_hand_and_memory_goes_back_to_the_os(env: Env) -> None:
    name = _unique()
    env.up(name, "--config", config(env, dynamic=False))
    st = env.wait_status(name, lambda s: dm(s) is not None)
    child = psutil.Process(next(p["pid"] for p in st["partitions"] if p["name"] == "child1"))
    t0 = time.monotonic()
    r = request(env, name, "memory.add", name="child1", bytes=128 * MiB)
    assert r["ok"] and r["assigned_bytes"] == 384 * MiB and r["pages"] == 32768
    assert time.monotonic() - t0 < 5
    # the child uses all of it: the workload touches every page it gets
    request(env, name, "workload", name="child1", device="dynmem", action="bursts",
            args={"peak_mb": 360, "step_mb": 360, "period_s": 5})
    st = env.wait_status(name, lambda s: dm(s)["workload_pages"] * 4096 >= 350 * MiB)
    rss_full = child.memory_info().rss
    assert mem(st)["resident_bytes"] >= 350 * MiB
    request(env, name, "workload", name="child1", device="dynmem", action="stop")
    r = request(env, name, "memory.balloon", name="child1", bytes=256 * MiB)
    assert r["ok"] and r["assigned_bytes"] == 128 * MiB
    st = env.wait_status(name, lambda s: mem(s)["guest_visible_bytes"] == 128 * MiB
                         and dm(s)["workload_pages"] == 0)
    # the pages really went back: the supervisor's accounting and the child's RSS fall
    assert mem(st)["resident_bytes"] <= 128 * MiB
    assert mem(st)["ballooned_bytes"] == 256 * MiB
    assert child.memory_info().rss < rss_full - 200 * MiB
    assert dm(st)["corrupt_pages"] == 0 and dm(st)["verified_pages"] > 0
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stderr
    assert_no_leaks(env, name, all_pids(st))


def test_every_limit_is_refused_with_its_reason(env: Env) -> None:
    name = _unique()
    env.up(name, "--config", config(env, dynamic=False, minimum=128, maximum=512))
    st = env.wait_status(name, lambda s: dm(s) is not None and dm(s, "child2") is not None
                         and dm(s)["max_pages"] is not None)
    assert dm(st)["max_pages"] == 512 * MiB // 4096  # DM_INFO from the root
    with env.client(name) as c:
        with pytest.raises(ControlError, match="above its maximum of 512 MiB"):
            c.request("memory.add", name="child1", bytes=384 * MiB)
        with pytest.raises(ControlError, match="below its minimum of 128 MiB"):
            c.request("memory.balloon", name="child1", bytes=160 * MiB)
        with pytest.raises(ControlError, match="not enough host memory"):
            c.request("memory.set", name="child1", maximum=1 << 40)  # allowed ...
            c.request("memory.add", name="child1", bytes=(1 << 40) - 256 * MiB)  # ... not
        with pytest.raises(ControlError, match="startup <= maximum"):
            c.request("memory.set", name="child2", maximum=128 * MiB)  # startup is 256 MiB
        with pytest.raises(ControlError, match="the root"):
            c.request("memory.add", name="root", bytes=128 * MiB)
        r = c.request("memory.set", name="child2", maximum=256 * MiB, buffer=50, weight=100)
        assert r["ok"] and r["memory"]["maximum_bytes"] == 256 * MiB
        with pytest.raises(ControlError, match="above its maximum of 256 MiB"):
            c.request("memory.add", name="child2", bytes=2 * MiB)
    st = env.status(name)
    assert mem(st)["assigned_bytes"] == mem(st, "child2")["assigned_bytes"] == 256 * MiB
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stderr
    assert_no_leaks(env, name, all_pids(st))


def test_without_a_dm_channel_the_error_says_so(env: Env) -> None:
    name = _unique()
    env.up(name, "--config", config(env, dynamic=False, devices=("echo",)))
    st = env.wait_status(name, lambda s: all(p["state"] == "running" for p in s["partitions"]))
    with pytest.raises(ControlError, match="dynamic memory channel of child1 is not open"):
        request(env, name, "memory.add", name="child1", bytes=128 * MiB)
    assert mem(env.status(name))["assigned_bytes"] == 256 * MiB
    env.cli("down", "--name", name)
    assert_no_leaks(env, name, all_pids(st))


def test_a_child_killed_during_hot_add_leaves_exact_accounting(env: Env) -> None:
    name = _unique()
    hooks(env, "die_on_hot_add")
    env.up(name, "--config", config(env, dynamic=False))
    st = env.wait_status(name, lambda s: dm(s) is not None)
    sup = psutil.Process(st["supervisor_pid"])
    fds = settled_fds(sup)
    old_pid = next(p["pid"] for p in st["partitions"] if p["name"] == "child1")
    with pytest.raises(ControlError, match=r"closed|exited|went down|not running"):
        request(env, name, "memory.add", name="child1", bytes=128 * MiB)
    st = env.wait_status(name, lambda s: next(
        p for p in s["partitions"] if p["name"] == "child1")["pid"] not in (None, old_pid)
        and dm(s) is not None)
    # restarted with its startup memory; the range mapped for the dead child is gone
    assert mem(st)["assigned_bytes"] == 256 * MiB
    assert mem(st)["guest_visible_bytes"] == 256 * MiB
    assert fds_at_most(sup, fds), sup.num_fds()
    assert mem(st, "child2")["assigned_bytes"] == 256 * MiB
    env.cli("down", "--name", name)
    assert_no_leaks(env, name, all_pids(st))


def test_a_lying_or_unhelpful_child_cannot_push_past_any_limit(env: Env) -> None:
    name = _unique()
    hooks(env, "liar")
    env.up(name, "--config", config(env, dynamic=True, maximum=640))
    # it claims 64 GiB of demand: the balancer gives it memory up to its maximum, no more
    st = env.wait_status(name, lambda s: mem(s)["assigned_bytes"] == 640 * MiB, timeout=30)
    deadline = time.monotonic() + 2.5  # a few more balancer rounds
    while time.monotonic() < deadline:
        assert mem(env.status(name))["assigned_bytes"] <= 640 * MiB
        time.sleep(0.25)
    env.cli("down", "--name", name)
    assert_no_leaks(env, name, all_pids(st))

    name = _unique()
    hooks(env, "ignore_balloon")
    env.up(name, "--config", config(env, dynamic=False))
    st = env.wait_status(name, lambda s: dm(s) is not None)
    with pytest.raises(ControlError, match="did not answer"):
        request(env, name, "memory.balloon", name="child1", bytes=64 * MiB)
    st = env.status(name)
    assert mem(st)["assigned_bytes"] == 256 * MiB  # nothing taken, nothing lost
    env.cli("down", "--name", name)
    assert_no_leaks(env, name, all_pids(st))
