"""The cluster through the real ``viridian`` CLI: up, status, partition ops, down, faults.

Every test runs real processes (a supervisor, a root, children) in a private
run directory and ends with a leak check: no process of the cluster, no
/dev/shm entry or message queue with its prefix, no socket file, no cgroup.
The ``clusters`` fixture stops every cluster a test started and kills
stragglers by cluster name, even when the test failed.  Waits poll the
control socket or watch its events, always with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from clusterenv import (  # noqa: F401  (re-exported for other test modules)
    CLI_TIMEOUT_S,
    LEAVES_LINE,
    ClusterStatus,
    Env,
    _log_records,
    _unique,
    all_pids,
    assert_no_leaks,
    events_until,
    gone,
)

from hv.control import ControlError

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]


def test_cluster_up_status_down(env: Env) -> None:
    name = _unique()
    r = env.up(name)
    out = r.stdout
    for part in ("supervisor", "root", "child1", "child2"):
        assert re.search(rf"✓ {part}\s", out), out
    assert str(env.rundir(name).path) in out
    assert "viridian status" in out and "viridian down" in out

    st = env.status(name)
    assert st["cluster"] == name and st["schema_version"] >= 1
    assert [p["name"] for p in st["partitions"]] == ["root", "child1", "child2"]
    assert [p["role"] for p in st["partitions"]] == ["root", "child", "child"]
    for p in st["partitions"]:
        assert p["state"] == "running" and p["restarts"] == 0 and p["channels"] == []
        assert psutil.Process(p["pid"]).ppid() == st["supervisor_pid"]
        assert p["memory"]["guest_visible_bytes"] == p["memory"]["assigned_bytes"] > 0
        assert p["cpu"]["weight"] == 100
    assert {p.info["cmdline"][0] for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith(f"viridian[{name}]")}

    # The JSON of the CLI is the same schema.
    r = env.cli("status", "--name", name, "--json")
    assert r.returncode == 0, r.stderr
    import json

    ClusterStatus.model_validate(json.loads(r.stdout))

    # The table fits 80 columns and names every partition.
    r = env.cli("status", "--name", name)
    assert r.returncode == 0, r.stderr
    assert all(len(line) <= 80 for line in r.stdout.splitlines()), r.stdout
    for pname in ("root", "child1", "child2"):
        assert pname in r.stdout

    pids = all_pids(st)
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stdout + r.stderr
    m = LEAVES_LINE.search(r.stdout)
    assert m and m.group(1) == "3", r.stdout
    assert_no_leaks(env, name, pids)

    # down is idempotent; status of a stopped cluster is "no such cluster".
    r = env.cli("down", "--name", name)
    assert r.returncode == 0 and "not running" in r.stdout
    r = env.cli("status", "--name", name)
    assert r.returncode == 3 and "no such cluster" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_kill9_child_is_noticed_and_restarted(env: Env) -> None:
    name = _unique()
    env.up(name)
    before = env.status(name)
    victim = before["partitions"][1]
    with env.client(name) as watch:
        watch.watch()
        os.kill(victim["pid"], signal.SIGKILL)
        seen = events_until(watch, lambda e: e.get("name") == "child1"
                            and e.get("state") == "running")
    states = [e["state"] for e in seen if e.get("name") == "child1"]
    assert states[:2] == ["crashed", "restarting"], seen
    crashed = next(e for e in seen if e["state"] == "crashed")
    assert crashed["exit"]["signal_name"] == "SIGKILL"
    assert crashed["exited_pid"] == victim["pid"]
    st = env.status(name)
    child1 = st["partitions"][1]
    assert child1["restarts"] == 1 and child1["state"] == "running"
    assert child1["pid"] != victim["pid"] and gone(victim["pid"])
    assert child1["last_exit"]["signal_name"] == "SIGKILL"
    # The others were not touched.
    assert st["partitions"][0]["pid"] == before["partitions"][0]["pid"]
    assert st["partitions"][2]["pid"] == before["partitions"][2]["pid"]

    pids = [*all_pids(st), victim["pid"]]
    r = env.cli("down", "--name", name)
    assert LEAVES_LINE.search(r.stdout), r.stdout + r.stderr
    assert_no_leaks(env, name, pids)


def test_kill9_root_is_noticed_and_restarted(env: Env) -> None:
    name = _unique()
    env.up(name)
    before = env.status(name)
    root = before["partitions"][0]
    os.kill(root["pid"], signal.SIGKILL)
    st = env.wait_status(name, lambda s: s["partitions"][0]["restarts"] == 1
                         and s["partitions"][0]["state"] == "running")
    assert st["partitions"][0]["pid"] != root["pid"]
    assert [p["pid"] for p in st["partitions"][1:]] == [p["pid"] for p in before["partitions"][1:]]
    pids = [*all_pids(st), root["pid"]]
    r = env.cli("down", "--name", name)
    assert LEAVES_LINE.search(r.stdout), r.stdout + r.stderr
    assert_no_leaks(env, name, pids)


def test_kill9_supervisor_ends_every_partition(env: Env) -> None:
    name = _unique()
    env.up(name)
    st = env.status(name)
    parts = [p["pid"] for p in st["partitions"]]
    os.kill(st["supervisor_pid"], signal.SIGKILL)
    t0 = time.monotonic()
    while not all(gone(pid) for pid in parts):
        assert time.monotonic() - t0 < 1.0, "a partition outlived its supervisor by 1 s"
        time.sleep(0.01)

    r = env.cli("status", "--name", name)
    assert r.returncode == 3 and "supervisor died" in r.stderr, r.stderr
    # The next up detects and cleans what the dead cluster left, then starts afresh.
    r = env.up(name)
    assert "cleaned up a crashed run" in r.stdout, r.stdout
    assert "sockets" in r.stdout
    st2 = env.status(name)
    assert st2["supervisor_pid"] != st["supervisor_pid"]
    assert (env.rundir(name).path / "logs.prev").is_dir()
    r = env.cli("down", "--name", name)
    assert LEAVES_LINE.search(r.stdout), r.stdout + r.stderr
    assert_no_leaks(env, name, all_pids(st) + all_pids(st2))


def test_kill9_supervisor_then_down_cleans(env: Env) -> None:
    name = _unique()
    env.up(name)
    st = env.status(name)
    os.kill(st["supervisor_pid"], signal.SIGKILL)
    r = env.cli("down", "--name", name)
    assert r.returncode == 0 and "cleaned up" in r.stdout, r.stdout + r.stderr
    assert_no_leaks(env, name, all_pids(st))


def test_partition_commands(env: Env) -> None:
    name = _unique()
    env.up(name)
    old = env.part(name, "child2")["pid"]

    r = env.cli("partition", "stop", "child2", "--name", name)
    assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
    p = env.part(name, "child2")
    assert p["state"] == "stopped" and p["pid"] is None and gone(old)

    r = env.cli("partition", "start", "2", "--name", name)  # by id
    assert r.returncode == 0 and "running" in r.stdout, r.stdout + r.stderr
    p = env.part(name, "child2")
    assert p["state"] == "running" and p["restarts"] == 0

    r = env.cli("partition", "restart", "child2", "--name", name)
    assert r.returncode == 0, r.stdout + r.stderr
    p2 = env.part(name, "child2")
    assert p2["state"] == "running" and p2["restarts"] == 1 and p2["pid"] != p["pid"]

    r = env.cli("partition", "kill", "child1", "--name", name)
    assert r.returncode == 0 and "stays stopped" in r.stdout, r.stdout + r.stderr
    assert env.part(name, "child1")["state"] == "stopped"  # a kill is not restarted

    r = env.cli("partition", "set", "child2", "--cpu-weight", "300", "--cpu-limit", "50",
                "--cpu-reserve", "10", "--name", name)
    assert r.returncode == 0, r.stdout + r.stderr
    cpu = env.part(name, "child2")["cpu"]
    assert (cpu["weight"], cpu["limit_percent"], cpu["reserve_percent"]) == (300, 50, 10)

    st = env.status(name)
    r = env.cli("down", "--name", name)
    m = LEAVES_LINE.search(r.stdout)
    assert m and m.group(1) == "2", r.stdout + r.stderr  # child1 was already off
    assert_no_leaks(env, name, [*all_pids(st), old, p["pid"]])


def test_two_named_clusters_side_by_side(env: Env, tmp_path: Path) -> None:
    a, b = _unique("a"), _unique("b")
    r = env.cli("config", "default")
    assert r.returncode == 0
    cfg = tmp_path / "one-child.toml"
    # The default, read back, minus child2: `config default` output is a valid config.
    cfg.write_text(r.stdout.split('[[partition]]\nname = "child2"')[0])
    env.up(a)
    env.up(b, "--config", str(cfg))
    sa, sb = env.status(a), env.status(b)
    assert len(sa["partitions"]) == 3 and len(sb["partitions"]) == 2
    assert sa["supervisor_pid"] != sb["supervisor_pid"]
    assert not set(all_pids(sa)) & set(all_pids(sb))

    r = env.cli("down", "--name", a)
    assert LEAVES_LINE.search(r.stdout), r.stdout + r.stderr
    assert_no_leaks(env, a, all_pids(sa))
    assert env.status(b)["partitions"][1]["state"] == "running"  # b did not notice
    r = env.cli("down", "--name", b)
    assert LEAVES_LINE.search(r.stdout), r.stdout + r.stderr
    assert_no_leaks(env, b, all_pids(sb))


def test_errors_are_one_line_with_exit_codes(env: Env, tmp_path: Path) -> None:
    missing = _unique("none")
    r = env.cli("status", "--name", missing)
    assert r.returncode == 3 and "no such cluster" in r.stderr
    r = env.cli("partition", "stop", "child1", "--name", missing)
    assert r.returncode == 3 and "no such cluster" in r.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text('[[partition]]\nname = "root"\nrole = "root"\n'
                   '[[partition]]\nname = "c1"\nmemory = { startup = "8M", minimum = "64M" }\n')
    r = env.cli("up", "--detach", "--name", _unique(), "--config", str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    assert str(bad) in r.stderr and "partition[1] (c1).memory" in r.stderr
    assert "minimum <= startup" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad.write_text('[[partition]]\nname = "root"\nrole = "root"\ncpu = { wieght = 5 }\n')
    r = env.cli("up", "--detach", "--name", _unique(), "--config", str(bad))
    assert r.returncode == 1 and "partition[0] (root).cpu.wieght: unknown key" in r.stderr
    r = env.cli("up", "--detach", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 1 and "nope.toml: cannot read" in r.stderr

    r = env.cli("up", "--detach", "--name", "bad name!")
    assert r.returncode == 2
    r = env.cli("partition", "set", "child1", "--cpu-weight", "0")
    assert r.returncode == 2

    name = _unique()
    env.up(name)
    st = env.status(name)
    r = env.cli("up", "--detach", "--name", name)
    assert r.returncode == 1 and "already running" in r.stderr, r.stdout + r.stderr
    assert env.status(name)["supervisor_pid"] == st["supervisor_pid"]
    r = env.cli("partition", "stop", "child9", "--name", name)
    assert r.returncode == 3 and "no such partition: child9" in r.stderr
    r = env.cli("partition", "set", "7", "--cpu-weight", "5", "--name", name)
    assert r.returncode == 3 and "no such partition" in r.stderr
    r = env.cli("partition", "set", "child1", "--name", name)
    assert r.returncode == 2
    r = env.cli("partition", "set", "child1", "--cpu-limit", "10", "--cpu-reserve", "20",
                "--name", name)
    assert r.returncode == 1 and "exceeds" in r.stderr

    r = env.cli("down", "--name", name)
    assert LEAVES_LINE.search(r.stdout), r.stdout + r.stderr
    assert_no_leaks(env, name, all_pids(st))


def test_foreground_up_stops_cleanly_on_sigint(env: Env) -> None:
    name = _unique()
    env.started.append(name)
    proc = subprocess.Popen([sys.executable, "-m", "partitions.cli", "up", "--name", name],
                            env=env.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the cluster did not come up"
            if env.rundir(name).supervisor() is not None:
                try:
                    st = env.status(name)
                except OSError:
                    st = None
                if st and all(p["state"] == "running" for p in st["partitions"]):
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "Gracefully stopping" in out
    assert LEAVES_LINE.search(out), out
    assert_no_leaks(env, name, all_pids(st))


def test_ctrl_c_during_a_foreground_start_stops_cleanly(env: Env) -> None:
    """A Ctrl+C while ``up`` is still starting partitions lets the start
    finish, then stops the cluster: exit 0, nothing left (was: "Aborted!")."""
    import select

    name = _unique()
    env.started.append(name)
    proc = subprocess.Popen([sys.executable, "-m", "partitions.cli", "up", "--name", name],
                            env=env.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        buf, deadline = b"", time.monotonic() + 20
        while b"supervisor" not in buf:  # the first start-up step: children still to come
            left = deadline - time.monotonic()
            assert left > 0, buf
            if select.select([proc.stdout], [], [], left)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
                assert chunk, buf
                buf += chunk
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = (buf + out).decode(errors="replace")
    assert proc.returncode == 0, text
    assert "Aborted" not in text and "Gracefully stopping" in text, text
    assert LEAVES_LINE.search(text), text


def test_hypercalls_between_real_partitions(env: Env) -> None:
    """child1 -> root messages and events are delivered; a child cannot reach another
    child's connections nor share pages it does not own (statuses, nothing more)."""
    from hv.abi import HvStatus

    env.env["VIRIDIAN_PARTITION_HOOK"] = "cluster_probe:run"
    here = str(Path(__file__).resolve().parent)
    env.env["PYTHONPATH"] = os.pathsep.join(
        x for x in (here, env.env.get("PYTHONPATH")) if x)
    name = _unique()
    env.up(name)
    deadline = time.monotonic() + 10
    while True:
        child1 = _log_records(env, name, "child1")
        root = _log_records(env, name, "root")
        calls = {r["call"]: r["status"] for r in child1 if r["event"] == "probe call"}
        got_welcome = any(r["event"] == "probe message" and r["payload"] == "welcome"
                          for r in child1)
        if len(calls) == 6 and got_welcome and any(r["event"] == "grant" for r in root):
            break
        assert time.monotonic() < deadline, (child1, root)
        time.sleep(0.02)
    assert calls == {
        "post_root": HvStatus.SUCCESS,
        "signal_root": HvStatus.SUCCESS,
        "post_other_child": HvStatus.INVALID_CONNECTION_ID,
        "signal_other_child": HvStatus.INVALID_CONNECTION_ID,
        "share_not_mine": HvStatus.ACCESS_DENIED,
        "share_mine": HvStatus.SUCCESS,
    }
    hello = [r for r in root if r["event"] == "probe message"]
    assert [(r["origin"], r["payload"]) for r in hello] == [(1, "hello root")]
    assert any(r["event"] == "probe events" and r["flags"] == [5] for r in root)
    from partitions.devices import DEVICES
    from partitions.devices.storage.guest import DMA_DATA_BYTES
    from partitions.devices.storage.scsi.device import SLOT_BYTES, SLOTS

    ring_pages = {d.send_ring_pages + d.recv_ring_pages for d in DEVICES.values()}
    ring_pages |= {SLOTS * SLOT_BYTES // 4096, 1 + DMA_DATA_BYTES // 4096}  # disk buffers
    # each child's channels' rings and disk buffers are grants too
    grants = [r for r in root if r["event"] == "grant" and r["pages"] not in ring_pages]
    assert [(g["owner"], g["pages"]) for g in grants] == [(1, 3)]
    assert not [r for r in _log_records(env, name, "child2") if r["event"].startswith("probe m")]
    # Nothing else happened: every partition still runs, none restarted.
    st = env.status(name)
    assert all(p["state"] == "running" and p["restarts"] == 0 for p in st["partitions"])
    r = env.cli("down", "--name", name)
    assert LEAVES_LINE.search(r.stdout), r.stdout + r.stderr
    assert_no_leaks(env, name, all_pids(st))


def test_hot_add_and_balloon_a_running_child(env: Env) -> None:
    """Hot-add and balloon through the child's Dynamic Memory channel: the
    supervisor maps or takes back the pages, the child uses them and reports
    what it can see; accounting is exact; limits are refused with the rule."""
    name = _unique()
    env.up(name)
    env.wait_channels(name)
    mib = 1 << 20
    child = env.part(name, "child1")
    assert child["memory"]["assigned_bytes"] == 256 * mib
    pid = child["pid"]
    with env.client(name) as c:
        r = c.request("memory.add", name="child1", bytes=128 * mib)
        assert r["ok"] and r["assigned_bytes"] == 384 * mib
    st = env.wait_status(name, lambda s: next(
        p for p in s["partitions"] if p["name"] == "child1")["memory"]["guest_visible_bytes"]
        == 384 * mib)
    c1 = next(p for p in st["partitions"] if p["name"] == "child1")
    assert c1["memory"]["assigned_bytes"] == 384 * mib and c1["pid"] == pid  # no restart
    with env.client(name) as c:
        r = c.request("memory.balloon", name="child1", bytes=64 * mib)
        assert r["ok"] and r["assigned_bytes"] == 320 * mib
        with pytest.raises(ControlError, match="above its maximum"):
            c.request("memory.add", name="child1", bytes=1024 * mib)
        with pytest.raises(ControlError, match="minimum"):
            c.request("memory.balloon", name="child1", bytes=300 * mib)
        with pytest.raises(ControlError, match="multiple of 4096"):
            c.request("memory.add", name="child1", bytes=1000)
    env.wait_status(name, lambda s: next(
        p for p in s["partitions"] if p["name"] == "child1")["memory"]["guest_visible_bytes"]
        == 320 * mib)
    assert env.part(name, "child2")["memory"]["assigned_bytes"] == 256 * mib
