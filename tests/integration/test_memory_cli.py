"""``viridian memory``: show a partition's memory, hot-add, balloon, change its
settings, through the real CLI and a real cluster.

Clusters start with dynamic memory off (``Env.up``), so memory moves only
when a test moves it; ``wait_channels`` waits until each child's Dynamic
Memory channel is negotiated.  Every wait has a deadline; nothing sleeps.
"""

from __future__ import annotations

import json
import re

import pytest
from clusterenv import Env, _unique, all_pids, assert_no_leaks

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(30)]

MiB = 1 << 20
MEMORY_KEYS = {"assigned_bytes", "guest_visible_bytes", "demand_bytes", "pressure_percent",
               "ballooned_bytes", "resident_bytes", "startup_bytes", "minimum_bytes",
               "maximum_bytes", "buffer_percent", "weight", "dynamic"}


def field(out: str, key: str) -> str:
    """The value of one line of ``viridian memory PARTITION``'s block."""
    m = re.search(rf"^  {re.escape(key)}\s+(.*?)\s*$", out, re.M)
    assert m, f"no {key!r} line in:\n{out}"
    return m.group(1)


def one_line_error(r, cmd: str) -> str:  # type: ignore[no-untyped-def]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"viridian {cmd}: "), r.stderr
    return lines[0]


def memory_json(env: Env, name: str, partition: str) -> dict:  # type: ignore[type-arg]
    r = env.cli("memory", "--name", name, "--json", partition)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert isinstance(m, dict)
    return m


def test_memory_shows_a_partition(env: Env) -> None:
    name = _unique()
    env.up(name)
    env.wait_channels(name)
    r = env.cli("memory", "--name", name, "child1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.match(r"child1 \(id 1, child, running\)\n", out), out
    assert field(out, "assigned").startswith("256 MiB")
    assert field(out, "visible").startswith("256 MiB")
    assert re.match(r"(\d[\d.]* [KMG]?i?B|-)", field(out, "demand")), out
    assert field(out, "ballooned") == "0 B"
    assert field(out, "limits") == "startup 256 MiB · minimum 64 MiB · maximum 1 GiB"
    assert field(out, "buffer") == "20 %"
    assert field(out, "weight") == "5000"
    assert field(out, "dynamic").startswith("off")
    assert re.match(r"relid \d+ open \(ready\): 0 hot-adds, 0 balloons, 0 corrupt pages$",
                    field(out, "DM channel")), out
    assert all(len(line) <= 80 for line in out.splitlines()), out

    # --json: the raw memory object of the status, wherever the options go
    m = memory_json(env, name, "child1")
    assert set(m) >= MEMORY_KEYS, m
    assert m["assigned_bytes"] == m["startup_bytes"] == 256 * MiB
    assert m["maximum_bytes"] == 1024 * MiB and m["dynamic"] is False
    r = env.cli("memory", "child1", "--json", "--name", name)
    assert r.returncode == 0 and json.loads(r.stdout)["startup_bytes"] == 256 * MiB, r.stderr
    # an id works too (the root is 0)
    r = env.cli("memory", "-n", name, "0")
    assert r.returncode == 0 and r.stdout.startswith("root (id 0, root, running)"), r.stdout

    # no such partition / cluster: exit 3, one line
    r = env.cli("memory", "--name", name, "child9")
    assert r.returncode == 3
    assert one_line_error(r, "memory") == "viridian memory: no such partition: child9"
    r = env.cli("memory", "--name", _unique("none"), "child1")
    assert r.returncode == 3 and "no such cluster" in one_line_error(r, "memory")
    # the group: its commands, and a usage error without a partition
    r = env.cli("memory", "--help")
    assert r.returncode == 0 and re.search(r"^  add\s", r.stdout, re.M), r.stdout
    assert re.search(r"^  balloon\s", r.stdout, re.M) and re.search(r"^  set\s", r.stdout, re.M)
    r = env.cli("memory", "--name", name)
    assert r.returncode == 2 and "Missing argument 'PARTITION'" in r.stderr, r.stderr

    st = env.status(name)
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stderr
    assert_no_leaks(env, name, all_pids(st))


def test_memory_add_and_balloon(env: Env) -> None:
    name = _unique()
    env.up(name)
    env.wait_channels(name)
    r = env.cli("memory", "add", "--name", name, "child1", "128M")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"✓ child1\s+hot-added 128 MiB \(32768 pages\) in [\d.]+ ms: 384 MiB "
                     r"assigned$", r.stdout, re.M), r.stdout
    r = env.cli("memory", "--name", name, "child1")
    assert r.returncode == 0 and field(r.stdout, "assigned").startswith("384 MiB"), r.stdout

    # refused: above the maximum (nothing changes), exit 1 with the reason in one line
    r = env.cli("memory", "add", "--name", name, "child1", "2G")
    assert r.returncode == 1, r.stdout + r.stderr
    err = one_line_error(r, "memory add")
    assert "above its maximum" in err and "1 GiB" in err, err
    r = env.cli("memory", "add", "--name", name, "root", "128M")
    assert r.returncode == 1 and "the root" in one_line_error(r, "memory add")
    assert memory_json(env, name, "child1")["assigned_bytes"] == 384 * MiB

    r = env.cli("memory", "balloon", "child1", "256M", "--name", name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"✓ child1\s+ballooned 256 MiB \(65536 pages\) in [\d.]+ ms: 128 MiB "
                     r"assigned$", r.stdout, re.M), r.stdout
    m = memory_json(env, name, "child1")
    assert m["assigned_bytes"] == 128 * MiB and m["ballooned_bytes"] == 256 * MiB, m
    r = env.cli("memory", "balloon", "--name", name, "child1", "128M")
    assert r.returncode == 1 and "below its minimum" in one_line_error(r, "memory balloon")

    # exit 3 for no such partition; a size that is not one is a usage error (2)
    r = env.cli("memory", "add", "--name", name, "child9", "128M")
    assert r.returncode == 3
    assert one_line_error(r, "memory add") == "viridian memory add: no such partition: child9"
    r = env.cli("memory", "balloon", "--name", name, "child9", "128M")
    assert r.returncode == 3, r.stderr
    for bad in ("12345", "lots", "-1G"):
        r = env.cli("memory", "add", "--name", name, "child1", bad)
        assert r.returncode == 2 and "SIZE" in r.stderr, (bad, r.stderr)

    st = env.status(name)
    assert next(p for p in st["partitions"] if p["name"] == "child2")["memory"][
        "assigned_bytes"] == 256 * MiB  # only child1 moved
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stderr
    assert_no_leaks(env, name, all_pids(st))


def test_memory_set_is_reflected(env: Env) -> None:
    name = _unique()
    env.up(name)
    env.wait_channels(name)
    r = env.cli("memory", "set", "--name", name, "child1", "--max", "512M", "--buffer", "30",
                "--weight", "100")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"✓ child1\s+minimum 64 MiB, maximum 512 MiB, buffer 30 %, weight 100, "
                     r"dynamic off$", r.stdout, re.M), r.stdout
    r = env.cli("memory", "--name", name, "child1")
    assert field(r.stdout, "limits") == "startup 256 MiB · minimum 64 MiB · maximum 512 MiB"
    assert field(r.stdout, "buffer") == "30 %" and field(r.stdout, "weight") == "100"
    m = memory_json(env, name, "child1")
    assert (m["maximum_bytes"], m["buffer_percent"], m["weight"]) == (512 * MiB, 30, 100)
    # the new maximum holds: 256 + 384 MiB is above it
    r = env.cli("memory", "add", "--name", name, "child1", "384M")
    assert r.returncode == 1 and "above its maximum of 512 MiB" in one_line_error(
        r, "memory add")

    # --min and --dynamic/--static; child2 is untouched by child1's settings
    r = env.cli("memory", "set", "--name", name, "child2", "--min", "128M", "--dynamic")
    assert r.returncode == 0, r.stdout + r.stderr
    m2 = memory_json(env, name, "child2")
    assert m2["minimum_bytes"] == 128 * MiB and m2["dynamic"] is True, m2
    assert m2["maximum_bytes"] == 1024 * MiB
    r = env.cli("memory", "set", "--name", name, "child2", "--static")
    assert r.returncode == 0 and r.stdout.rstrip().endswith("dynamic off"), r.stdout
    assert memory_json(env, name, "child2")["dynamic"] is False

    # refusals: a limit that breaks minimum <= startup <= maximum (1), out of range (2),
    # nothing to set (2), no such partition (3)
    r = env.cli("memory", "set", "--name", name, "child1", "--max", "128M")
    assert r.returncode == 1 and "startup <= maximum" in one_line_error(r, "memory set")
    r = env.cli("memory", "set", "--name", name, "child1", "--buffer", "3")
    assert r.returncode == 2, r.stderr
    r = env.cli("memory", "set", "--name", name, "child1")
    assert r.returncode == 2 and "give at least one of" in r.stderr, r.stderr
    r = env.cli("memory", "set", "--name", name, "child9", "--weight", "1")
    assert r.returncode == 3
    assert one_line_error(r, "memory set") == "viridian memory set: no such partition: child9"
    assert memory_json(env, name, "child1")["maximum_bytes"] == 512 * MiB

    st = env.status(name)
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stderr
    assert_no_leaks(env, name, all_pids(st))
