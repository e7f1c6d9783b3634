"""VMBus channels between real partitions: open, stream, faults, rescind, no leftovers.

Each child of the default cluster opens an echo channel to the root: ring
pages in its own guest memory, a GPADL over pages it shared through the
supervisor, per-channel doorbells.  These tests drive it through the control
socket (the ``workload`` and ``channel.rescind`` ops) and read both ends'
channel reports from ``status``.
"""

from __future__ import annotations

from typing import Any

import psutil
import pytest
from clusterenv import (
    Env,
    _log_records,
    _unique,
    all_pids,
    assert_no_leaks,
    fds_at_most,
    settled_fds,
)

from hv.control import ControlError

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

STREAM = {"size": 512, "window": 16, "seconds": 0}


def chan(st: dict[str, Any], partition: str, child: str | None = None) -> dict[str, Any] | None:
    """The echo channel entry ``partition`` reports (for the root: towards ``child``)."""
    p = next(p for p in st["partitions"] if p["name"] == partition)
    for c in p["channels"]:
        if c["class"] == "echo" and (child is None or c.get("child") == child):
            return c
    return None


def is_open(st: dict[str, Any], child: str) -> bool:
    a, b = chan(st, "root", child), chan(st, child)
    return bool(a and b and a["state"] == "open" and b["state"] == "open")


def echoes(st: dict[str, Any], child: str) -> int:
    c = chan(st, child)
    return c["device"]["echoes"] if c and "device" in c else 0


def stream(env: Env, name: str, child: str, action: str = "stream") -> None:
    with env.client(name) as c:
        r = c.request("workload", name=child, device="echo", action=action, args=STREAM)
    assert r["ok"], r


def test_channels_open_and_stream_without_the_supervisor(env: Env) -> None:
    name = _unique()
    env.up(name)
    st = env.wait_status(name, lambda s: is_open(s, "child1") and is_open(s, "child2"))
    root = chan(st, "root", "child1")
    assert root["class"] == "echo" and root["relid"] == 1 and root["end"] == "vsp"
    assert root["class_id"] == "5f1c1a3e-7d0b-4c8e-9a49-76697269646e"
    for key in ("packets_in", "packets_out", "bytes_in", "bytes_out", "out_ring_fill",
                "in_ring_fill", "signals_sent", "signals_suppressed"):
        assert key in root and key in chan(st, "child1"), key
    calls = {p["name"]: p["hypercalls"] for p in st["partitions"]}

    stream(env, name, "child1")
    st = env.wait_status(name, lambda s: echoes(s, "child1") > 2000)
    stream(env, name, "child1", "stop")
    st = env.wait_status(name, lambda s: chan(s, "child1")["device"]["in_flight"] == 0
                         and chan(s, "root", "child1")["packets_in"]
                         == chan(s, "child1")["packets_out"])
    c1, r1 = chan(st, "child1"), chan(st, "root", "child1")
    assert c1["device"]["mismatches"] == 0
    # both ends agree, byte for byte (payloads padded to 8 on the wire)
    assert c1["packets_out"] == r1["packets_in"] == r1["packets_out"] == c1["packets_in"]
    assert c1["bytes_out"] == r1["bytes_in"] == c1["packets_out"] * 512
    # thousands of packets, not one hypercall more than before: the
    # supervisor is off the data path (signals go through the doorbells)
    after = {p["name"]: p["hypercalls"] for p in st["partitions"]}
    assert after == calls
    assert c1["signals_sent"] > 0 and chan(st, "child2")["packets_out"] == 0
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stderr
    assert_no_leaks(env, name, all_pids(st))


def test_child_crash_root_restart_and_rescind(env: Env) -> None:
    name = _unique()
    env.up(name)
    st = env.wait_status(name, lambda s: is_open(s, "child1") and is_open(s, "child2"))
    sup = psutil.Process(st["supervisor_pid"])
    fds_before = settled_fds(sup)
    root_pid = next(p["pid"] for p in st["partitions"] if p["name"] == "root")
    stream(env, name, "child2")

    # kill -9 a child: the root closes its channel and keeps serving child2
    r = env.cli("partition", "kill", "child1", "--name", name)
    assert r.returncode == 0, r.stderr
    st = env.wait_status(name, lambda s: chan(s, "root", "child1")["state"] == "offered")
    n = echoes(st, "child2")
    env.wait_status(name, lambda s: echoes(s, "child2") > n + 500)
    r = env.cli("partition", "start", "child1", "--name", name)
    assert r.returncode == 0, r.stderr
    env.wait_status(name, lambda s: is_open(s, "child1"))

    # the root restarts: children see their channels go and come back
    r = env.cli("partition", "restart", "root", "--name", name)
    assert r.returncode == 0, r.stderr
    st = env.wait_status(name, lambda s: is_open(s, "child1") and is_open(s, "child2")
                         and next(p for p in s["partitions"] if p["name"] == "root")["pid"]
                         != root_pid)
    stream(env, name, "child2")  # a fresh channel: start again
    n = echoes(st, "child2")
    env.wait_status(name, lambda s: echoes(s, "child2") > n + 500)

    # rescind: the root withdraws child1's channel; the child releases it
    with env.client(name) as c:
        assert c.request("channel.rescind", name="child1", relid=1)["ok"]
        with pytest.raises(ControlError) as e:
            c.request("channel.rescind", name="child1", relid="x")
        assert e.value.code == "bad_request"
    st = env.wait_status(name, lambda s: chan(s, "root", "child1") is None
                         and chan(s, "child1") is None)
    assert is_open(st, "child2")
    # the supervisor keeps no copy of any channel's doorbells
    assert fds_at_most(sup, fds_before), sup.num_fds()
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stderr
    assert_no_leaks(env, name, all_pids(st))


def test_child_closes_and_reopens_its_channel(env: Env) -> None:
    """CLOSECHANNEL, GPADL teardown, grant revoked and pages freed on both
    sides; then the same offer opens again on fresh pages."""
    name = _unique()
    env.up(name)
    st = env.wait_status(name, lambda s: is_open(s, "child1"))
    grant = chan(st, "child1")["grant"]
    assert grant > 0 and chan(st, "child1")["ring_pages"] == 66
    stream(env, name, "child1", "close")
    st = env.wait_status(name, lambda s: chan(s, "child1")["state"] == "closed"
                         and chan(s, "child1")["ring_pages"] == 0
                         and chan(s, "root", "child1")["state"] == "offered")
    assert chan(st, "child1")["grant"] == 0
    root_log = [r for r in _log_records(env, name, "root") if r["event"] == "revoke"]
    assert [r["grant_id"] for r in root_log] == [grant]  # the root unmapped those pages
    stream(env, name, "child1", "open")
    st = env.wait_status(name, lambda s: is_open(s, "child1"))
    assert chan(st, "child1")["grant"] not in (0, grant)
    stream(env, name, "child1")
    env.wait_status(name, lambda s: echoes(s, "child1") > 200)
    assert is_open(env.status(name), "child2")
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stderr
    assert_no_leaks(env, name, all_pids(st))
