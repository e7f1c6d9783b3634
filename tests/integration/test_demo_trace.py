"""The channel CLI through the real ``viridian`` command: demo, trace, status's channels.

``viridian demo`` owns its cluster (foreground) and must leave nothing behind;
``viridian trace`` turns a partition's decoded control messages and packet
headers into tcpdump-like lines; ``viridian status`` shows each partition's
channels.  Every wait polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from clusterenv import LEAVES_LINE, Env, _unique, all_pids, assert_no_leaks

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

PROGRESS = re.compile(r"^\[\s*[\d.]+ s\] (.*)$", re.M)
STREAM_ITEM = re.compile(r"(\w+) relid (\d+) (\w+): .*?echoes (\d+) mismatches (\d+)")
ASSIGNED = re.compile(r"\| assigned: (\w+) (\d+(?:\.\d+)?[KMG]iB), (\w+) (\d+(?:\.\d+)?[KMG]iB)$")
DISKS_ITEM = re.compile(r"\| disks: child1 scsi (?:-|(\S+) read/s (\S+) write/s (\S+) MB/s), "
                        r"child2 ide (?:-|(\S+) read/s (\S+) write/s (\S+) MB/s (\S+) traps/s) \|")
DISK_SUMMARY = re.compile(r"^  (child\d) disk0 (scsi|ide), (synthetic|emulated): ([\d,]+) ops "
                          r"\(([\d,]+) reads, ([\d,]+) writes\), (\S+) read, (\S+) written, "
                          r"(?:no traps|([\d,]+) traps? \(([\d.]+) per op\))"
                          r"(?:; ([\d,]+) benche?s?, median (\S+) ops/s, p50 \S+)?$", re.M)
DM_SUMMARY = re.compile(r"^  (child\d) relid \d+ dynmem: (\d+) hot-adds?, (\d+) balloons?, "
                        r"(\d+) corrupt pages?; assigned (\S+) to (\S+) \(startup 256MiB\)$",
                        re.M)


def chan(st: dict[str, Any], partition: str, child: str | None = None,
         cls: str = "echo") -> dict[str, Any] | None:
    """``partition``'s entry for its ``cls`` channel (for the root: towards ``child``)."""
    p = next(p for p in st["partitions"] if p["name"] == partition)
    for c in p["channels"]:
        if c.get("class") == cls and (child is None or c.get("child") == child):
            return c
    return None


def is_open(st: dict[str, Any], child: str) -> bool:
    a, b = chan(st, "root", child), chan(st, child)
    return bool(a and b and a["state"] == "open" and b["state"] == "open")


def workload(env: Env, name: str, child: str, action: str = "stream") -> None:
    with env.client(name) as c:
        c.request("workload", name=child, device="echo", action=action,
                  args={"size": 1024, "window": 8, "seconds": 0})


def read_until(stream: Any, pattern: str, timeout: float) -> str:
    """What a subprocess writes to ``stream`` up to a line matching ``pattern``
    (raw reads of its fd: a buffered reader would hide lines from select)."""
    fd, buf = stream.fileno(), b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, buf.decode(errors="replace"), re.M):
        left = deadline - time.monotonic()
        assert left > 0, f"no line matching {pattern!r} within {timeout} s: {buf[-3000:]!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 65536)
            assert chunk, f"the process ended first: {buf[-3000:]!r}"
            buf += chunk
    return buf.decode(errors="replace")


def trace_proc(env: Env, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "partitions.cli", "trace", *args],
                            env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- demo -------------------------------------------------------------------------------------


def test_demo_streams_echoes_and_leaves_nothing(env: Env) -> None:
    name = _unique("d")
    env.started.append(name)  # the fixture cleans up should the demo fail
    r = env.cli("demo", "--seconds", "3", "--name", name, "--size", "512", timeout=45)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    for part in ("supervisor", "root", "child1", "child2"):
        assert re.search(rf"✓ {part}\s+pid \d+", out), out
    pids = [int(p) for p in re.findall(r"✓ \w+\s+pid (\d+)", out)]
    # Not a terminal: one plain progress line per second, each child's stream in it.
    lines = PROGRESS.findall(out)
    assert 2 <= len(lines) <= 5, out
    last = {m[0]: m for m in STREAM_ITEM.findall(lines[-1])}
    assert set(last) == {"child1", "child2"}, lines[-1]
    for _child, relid, state, echoes, mismatches in last.values():
        assert state == "open" and relid == "1", lines[-1]
        assert int(echoes) > 0 and mismatches == "0", lines[-1]
    assert all(m[4] == "0" for line in lines for m in STREAM_ITEM.findall(line)), out
    # ... and the children's assigned memory (the demo runs the DM bursts workload)
    m = ASSIGNED.search(lines[-1])
    assert m and (m[1], m[3]) == ("child1", "child2"), lines[-1]
    # ... and both disks' rates side by side (the demo benches each child's disk)
    disks = [DISKS_ITEM.search(line) for line in lines]
    assert all(disks), lines
    assert any(d[1] not in (None, "0") for d in disks if d), lines  # scsi reads/s
    # The summary: per channel packets, bytes, mean rate, mismatches; then nothing left.
    summary = re.findall(r"^  (child\d) relid 1 echo: ([\d,]+) packets, .* (\d+) mismatches$",
                         out, re.M)
    assert {s[0] for s in summary} == {"child1", "child2"}, out
    assert all(int(s[1].replace(",", "")) > 0 and s[2] == "0" for s in summary), out
    # Dynamic Memory per child: what its DM channel did, nothing corrupted, memory moved
    # (the balancer balloons the idle start, then hot-adds as the bursts grow)
    dm = DM_SUMMARY.findall(out)
    assert {d[0] for d in dm} == {"child1", "child2"}, out
    for _child, hot_adds, balloons, corrupt, least, most in dm:
        assert corrupt == "0" and int(hot_adds) + int(balloons) >= 1, out
        assert least != most, out
    # Disks per child: the demo's random reads, as the root counted them; traps for ide
    ds = {d[0]: d for d in DISK_SUMMARY.findall(out)}
    assert set(ds) == {"child1", "child2"}, out
    c1, c2 = ds["child1"], ds["child2"]
    assert c1[1:3] == ("scsi", "synthetic") and c2[1:3] == ("ide", "emulated"), out
    for d in (c1, c2):
        ops, reads, writes = (int(x.replace(",", "")) for x in d[3:6])
        assert ops > 0 and ops == reads and writes == 0, out  # reads only: user data
        assert d[7] == "0B" and int(d[10].replace(",", "")) >= 1, out  # written; benches
    assert c1[8] == "" and int(c2[8].replace(",", "")) >= int(c2[3].replace(",", "")), out
    assert re.search(r"^  4 KiB random reads: scsi \S+ ops/s, ide-dma \S+ ops/s \(\d+x\), "
                     r"as each child timed them$", out, re.M), out
    m = LEAVES_LINE.search(out)
    assert m and m.group(1) == "3", out
    assert "\x1b[" not in out  # no live view, no colour when piped
    assert_no_leaks(env, name, pids)


def test_demo_bad_options_are_usage_errors(env: Env) -> None:
    r = env.cli("demo", "--size", "1M", "--name", _unique("d"))
    assert r.returncode == 2 and "--size" in r.stderr, r.stderr
    r = env.cli("demo", "--window", "0")
    assert r.returncode == 2, r.stderr


# -- trace ------------------------------------------------------------------------------------


def test_trace_shows_control_messages_and_packets(env: Env) -> None:
    name = _unique()
    env.up(name)
    env.wait_status(name, lambda s: is_open(s, "child1") and is_open(s, "child2"))

    count = 300
    proc = trace_proc(env, "--name", name, "root", "--count", str(count))
    try:
        read_until(proc.stderr, r"tracing root \(running\)", 10)  # the trace is on
        # A restart makes child1 open its channels again: control messages.
        r = env.cli("partition", "restart", "child1", "--name", name)
        assert r.returncode == 0, r.stdout + r.stderr
        env.wait_status(name, lambda s: is_open(s, "child1"))
        workload(env, name, "child1")  # then packets, until --count ends the trace
        out, err = finish(proc, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == count, out[-2000:]
    ts = r"\d\d:\d\d:\d\d\.\d{6}"
    assert re.search(rf"^{ts} root   < child1 INITIATE_CONTACT vmbus_version_requested=0x",
                     out, re.M), out[:3000]
    assert re.search(rf"^{ts} root   < child1 OPENCHANNEL child_relid=1 openid=1 "
                     r"ringbuffer_gpadlhandle=0x[0-9a-f]+ downstream_ringbuffer_pageoffset=\d+",
                     out, re.M), out[:3000]
    assert re.search(rf"^{ts} root   > child1 OPENCHANNEL_RESULT child_relid=1 openid=1 "
                     r"status=0$", out, re.M), out[:3000]
    assert re.search(rf"^{ts} root   - child1 relid 1 channel open class=echo$", out, re.M)
    assert re.search(rf"^{ts} root   < child1 relid 1 packet type=0x6 flags=0x1 "
                     r"trans_id=\d+ len=1024$", out, re.M), out[-2000:]
    assert re.search(rf"^{ts} root   > child1 relid 1 packet type=0xb flags=0x0 "
                     r"trans_id=\d+ len=1024$", out, re.M), out[-2000:]
    m = re.search(r"viridian trace: (\d+) events shown, (\d+) dropped by root", err)
    assert m and int(m.group(1)) == count, err

    # --json: the raw event objects, one per line; the child's own view of its channel.
    proc = trace_proc(env, "--name", name, "child1", "--json", "--count", "5")
    out, err = finish(proc, 15)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 5, out
    for ev in events:
        assert ev["what"] == "packet" and ev["peer"] == "root" and ev["relid"] == 1
        assert ev["dir"] in ("in", "out") and isinstance(ev["t"], float)
        assert ev["type"] in (0x6, 0xB) and ev["len"] == 1024
    assert re.search(r"5 events shown, \d+ dropped by child1", err), err

    # Errors: one line, exit 3 for no such partition or cluster.
    r = env.cli("trace", "--name", name, "child9")
    assert r.returncode == 3 and r.stderr.strip() == "viridian trace: no such partition: child9"
    r = env.cli("trace", "--name", _unique("none"), "root")
    assert r.returncode == 3 and "no such cluster" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    workload(env, name, "child1", "stop")
    st = env.status(name)
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_no_leaks(env, name, all_pids(st))


def test_trace_follows_a_partition_through_its_restart(env: Env) -> None:
    name = _unique()
    env.up(name)
    env.wait_status(name, lambda s: is_open(s, "child1"))
    proc = trace_proc(env, "--name", name, "child1")
    try:
        read_until(proc.stderr, r"tracing child1", 10)
        r = env.cli("partition", "restart", "child1", "--name", name)
        assert r.returncode == 0, r.stdout + r.stderr
        out = read_until(proc.stdout, r"OPENCHANNEL_RESULT child_relid=1 .*$", 15)
        proc.send_signal(signal.SIGINT)  # Ctrl+C ends it, with the count on stderr
        rest, err = finish(proc, 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out += rest
    assert proc.returncode == 0, err
    assert re.search(r" child1 - exited \(traced again once it runs\)$", out, re.M), out
    assert re.search(r" child1 > root   OPENCHANNEL child_relid=1 openid=1 ", out, re.M), out
    assert re.search(r" child1 < root   OPENCHANNEL_RESULT child_relid=1 openid=1 status=0$",
                     out, re.M), out
    m = re.search(r"viridian trace: (\d+) events shown, \d+ dropped by child1$", err, re.M)
    assert m and int(m.group(1)) == len(out.splitlines()) - 1, (out, err)  # not "exited"
    st = env.status(name)
    assert next(p for p in st["partitions"] if p["name"] == "child1")["restarts"] == 1
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_no_leaks(env, name, all_pids(st))


# -- status -----------------------------------------------------------------------------------


def test_status_shows_each_partitions_channels(env: Env) -> None:
    name = _unique()
    env.up(name)
    env.wait_status(name, lambda s: is_open(s, "child1") and is_open(s, "child2"))
    workload(env, name, "child1")
    env.wait_status(name, lambda s: chan(s, "child1")["device"]["echoes"] > 1000)
    workload(env, name, "child1", "stop")
    st = env.wait_status(name, lambda s: chan(s, "child1")["device"]["in_flight"] == 0)

    r = env.cli("status", "--name", name)
    assert r.returncode == 0, r.stderr
    assert all(len(line) <= 80 for line in r.stdout.splitlines()), r.stdout
    out = "\n".join(line.rstrip() for line in r.stdout.splitlines())
    assert re.search(r"^  root: \d+ channels$", out, re.M), out
    assert re.search(r"^  Relid Child\s+Class\s+State\s+Packets in/out\s+Bytes in/out\s+"
                     r"Fill %\s+Signals$", out, re.M), out
    # the root's end towards each child, then each child's own end
    busy = re.search(r"^\s+1 child1\s+echo\s+open\s+(\S+)/(\S+)\s+(\S+)/(\S+)\s+\d+/\d+\s+"
                     r"\S+/\S+$", out, re.M)
    assert busy and busy.group(1) != "0" and busy.group(3) != "0B", out
    assert re.search(r"^\s+1 child2\s+echo\s+open\s+0/0\s+0B/0B\s", out, re.M), out
    for child in ("child1", "child2"):
        assert re.search(rf"^  {child}: \d+ channels?$", out, re.M), out
    own = re.search(r"^  child1: .*?\n(?:.*\n){2}\s+1 echo\s+open\s+(\S+)/(\S+)\s", out, re.M)
    assert own and own.group(2) != "0", out
    # JSON is unchanged: each partition's own report, with the documented keys
    r = env.cli("status", "--name", name, "--json")
    c1 = chan(json.loads(r.stdout), "child1")
    assert c1 is not None and c1["packets_out"] == chan(st, "child1")["packets_out"]
    r = env.cli("down", "--name", name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_no_leaks(env, name, all_pids(st))
