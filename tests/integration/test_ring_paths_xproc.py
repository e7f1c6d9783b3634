"""Every ring path between two real processes, against one plan (issue 14,
point 3: the cross-process half of tests/property/test_ring_paths_model.py).

The parent writes a seeded plan of packets on ring A, each by the write path
the plan names (try_write, write, write_many, the GPA-direct and transfer-page
writes, an event loop's request_space, and a raw peer's packet with a long
in-band extended header); a child (``ring_paths_peer``) reads them, choosing
a read path at random per packet (try_read, read, try_read_payload,
read_payload, drain, drain_into, read_into, peek, exchange, and masking);
its exchange requests come back on ring B, which the parent reads between
its writes.  Each payload carries its sequence number and the crc32 of its
body; both ends check every packet, in order.  Doorbells are real eventfds
passed as fds; every blocking wait has a timeout and nothing sleeps to
synchronise, so a lost wake-up is a timeout and a failure, not a slow pass.

Ring B is as large as ring A, and the parent reads it before every write:
the child sends one request per packet it reads, so it can never have more
than a ring A's worth of packets plus one write's outstanding, and its
exchange never waits for room (which would deadlock with a parent waiting
for room on ring A).
"""

from __future__ import annotations

import json
import os
import random
import select
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from ring_paths_peer import (
    READ_PATHS,
    REQ,
    SPINS,
    WAIT_S,
    WRITE_PATHS,
    Item,
    make_pool,
    payload_of,
    plan,
)
from ringtools import desc, trailer

from vmbus.doorbell import Doorbell
from vmbus.packet import PacketType
from vmbus.ring import IncomingRing, OutgoingRing, init_ring, packet_bytes
from vmbus.shm import SharedMemory

pytestmark = pytest.mark.multiprocess


class Child:
    """The reading child: its one report line, read with a timeout."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def report(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline, buf = time.monotonic() + timeout, b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no report from the child in {timeout} s")
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    self.proc.wait(10)
                    raise AssertionError(f"the child exited: {self.stderr()}")
                buf += chunk
        assert self.proc.wait(30) == 0, self.stderr()
        return dict(json.loads(buf.split(b"\n", 1)[0]))

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the child exited ({self.proc.returncode}): {self.stderr()}")


@contextmanager
def child(
    seed: int, packets: int, ring_bytes: int
) -> Iterator[tuple[Child, SharedMemory, SharedMemory, Doorbell, Doorbell]]:
    with ExitStack() as stack:
        ring_a = stack.enter_context(SharedMemory.create(ring_bytes))  # parent -> child
        ring_b = stack.enter_context(SharedMemory.create(max(ring_bytes, 69632)))  # requests
        init_ring(ring_a.map)
        init_ring(ring_b.map)
        parent_bell = stack.enter_context(Doorbell())
        child_bell = stack.enter_context(Doorbell())
        fds = [ring_a.fd, ring_b.fd, parent_bell.fileno(), child_bell.fileno()]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).parent), env.get("PYTHONPATH")) if p
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "ring_paths_peer", str(os.getpid()), *map(str, fds),
             str(seed), str(packets), str(ring_bytes)],
            pass_fds=fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        try:
            yield Child(proc), ring_a, ring_b, parent_bell, child_bell
        except BaseException as e:  # say why the child went away, if it did
            if proc.poll() not in (None, 0) and proc.stderr is not None:
                e.add_note(f"the child exited with {proc.returncode}:\n{Child(proc).stderr()}")
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()


class Writer:
    """The parent: writes the plan on ring A, reads the requests off ring B."""

    def __init__(
        self, ring_a: SharedMemory, ring_b: SharedMemory, bell: Doorbell,
        child_bell: Doorbell, rng: random.Random, kid: Child,
    ) -> None:
        self.map = ring_a.map
        self.dsize = len(ring_a.map) - 4096
        self.bell, self.child_bell, self.rng, self.kid = bell, child_bell, rng, kid
        self.out = OutgoingRing(self.map, on_signal=child_bell.ring)
        self.inc = IncomingRing(ring_b.map, on_signal=child_bell.ring)
        self.requests = 0
        self.counts = dict.fromkeys(WRITE_PATHS, 0)
        self.buf = bytearray(64)

    def close(self) -> None:
        self.out.close()
        self.inc.close()

    def room(self, need: int, seq: int) -> None:
        if not self.out.wait_writable(need, self.bell, WAIT_S, spin_ns=self.rng.choice(SPINS)):
            self.kid.check_alive()
            raise TimeoutError(f"writer: no room for packet {seq} in {WAIT_S} s")

    def write(self, it: Item, pool: bytes) -> None:
        out, comp = self.out, bool(it.flags)
        kw: dict[str, Any] = {"trans_id": it.tid, "completion_requested": comp}
        payloads = [payload_of(it.seq + i, n, off, pool) for i, (n, off) in enumerate(it.bodies)]
        p = payloads[0]
        if it.how == "try_write":
            while not out.try_write(p, packet_type=it.ptype, **kw):
                self.room(packet_bytes(len(p)), it.seq)
        elif it.how == "write":
            if not out.write(p, self.bell, WAIT_S, spin_ns=it.spin, packet_type=it.ptype, **kw):
                self.kid.check_alive()
                raise TimeoutError(f"write: no room for packet {it.seq} in {WAIT_S} s")
        elif it.how == "write_many":
            rest = payloads
            while rest:
                rest = rest[out.write_many(rest, packet_type=it.ptype, **kw) :]
                if rest:
                    self.room(packet_bytes(len(rest[0])), it.seq)
        elif it.how == "gpa":
            ranges = it.ext if it.prebuilt else it.ranges
            while not out.try_write_gpa_direct(p, ranges, **kw):
                self.room(packet_bytes(len(p), len(it.ext)), it.seq)
        elif it.how == "xfer":
            (pageset,) = struct.unpack_from("<H", it.ext)
            while not out.try_write_xfer_pages(p, pageset, it.ranges, **kw):
                self.room(packet_bytes(len(p), len(it.ext)), it.seq)
        elif it.how == "request_space":  # an event loop: publish the need, sleep, retry
            deadline = time.monotonic() + WAIT_S
            while not out.try_write(p, packet_type=it.ptype, **kw):
                if out.request_space(packet_bytes(len(p))):
                    continue  # room already: no signal will come
                if not self.bell.wait(max(0.0, deadline - time.monotonic())):
                    self.kid.check_alive()
                    raise TimeoutError(f"request_space: no signal in {WAIT_S} s ({it.seq})")
        else:
            self.forge(p, it)
        self.counts[it.how] += 1

    def forge(self, p: bytes, it: Item) -> None:
        """A packet with a long in-band extended header, as a peer's writer
        makes it (ours cannot): written raw at the write index, published,
        signalled unconditionally (a raw writer has no fence: a spurious ring
        is harmless, a missing one is not); then the writer end is attached
        again, as after a hand-over."""
        ext = len(it.ext)
        copied = 16 + ext + ((len(p) + 7) & ~7)
        while self.out.bytes_writable() <= copied + 8:
            self.room(copied + 8, it.seq)
        w = int.from_bytes(self.map[0:4], "little")
        junk = bytes(range(256)) * (ext // 256 + 1)
        body = (
            desc(it.ptype, (16 + ext) // 8, copied // 8, it.flags, it.tid) + junk[:ext]
            + p + bytes(-len(p) % 8) + trailer(w)
        )
        first = min(len(body), self.dsize - w)
        self.map[4096 + w : 4096 + w + first] = body[:first]
        if len(body) > first:
            self.map[4096 : 4096 + len(body) - first] = body[first:]
        # publish (x86 keeps stores in order: the packet is visible first)
        self.map[0:4] = ((w + len(body)) % self.dsize).to_bytes(4, "little")
        self.out.request_space(0)  # withdraw a request a wait for room left
        self.child_bell.ring()
        self.out.close()
        self.out = OutgoingRing(self.map, on_signal=self.child_bell.ring)

    def read_requests(self) -> None:
        """The child's exchange requests so far, by a random read path."""
        inc = self.inc
        while True:
            how = self.rng.randrange(5)
            if how == 0:
                got = [(p.payload, (p.packet_type, p.flags, p.trans_id)) for p in inc.drain(8)]
            elif how == 1:
                infos = inc.drain_into(self.buf, 8)
                got = [
                    (self.buf[o : o + i.payload_bytes], (i.packet_type, i.flags, i.trans_id))
                    for i, o in zip(infos, infos.payload_offsets(), strict=True)
                ]
            elif how == 2:
                b = inc.try_read_payload()
                got = [] if b is None else [(b, None)]
            elif how == 3:
                v = inc.peek()
                got = []
                if v is not None:
                    with v:
                        got = [(b"".join(map(bytes, v.segments)),
                                (v.packet_type, v.flags, v.trans_id))]
            else:
                p = inc.try_read()
                got = [] if p is None else [(p.payload, (p.packet_type, p.flags, p.trans_id))]
            if not got:
                return
            for payload, meta in got:
                assert bytes(payload) == REQ.pack(self.requests), f"request {self.requests}"
                assert meta in (None, (PacketType.DATA_INBAND, 0, 0))
                self.requests += 1


def run(seed: int, packets: int, ring_bytes: int) -> tuple[dict[str, Any], Writer, float]:
    pool = make_pool(seed)
    crc = body_bytes = 0
    t0 = time.monotonic()
    with child(seed, packets, ring_bytes) as (kid, ring_a, ring_b, bell, child_bell):
        writer = Writer(ring_a, ring_b, bell, child_bell, random.Random(seed + 2), kid)
        try:
            for it in plan(seed, packets, ring_bytes):
                writer.read_requests()
                writer.write(it, pool)
                for n, off in it.bodies:
                    crc = zlib.crc32(pool[off : off + n], crc)
                    body_bytes += n
            report = kid.report(60)
            writer.read_requests()
        finally:
            writer.close()
    elapsed = time.monotonic() - t0
    assert report["packets"] == packets
    assert (report["crc"], report["body_bytes"]) == (crc, body_bytes)
    assert writer.requests == report["requests"]
    return report, writer, elapsed


def check_paths(report: dict[str, Any], writer: Writer) -> None:
    """Every read and write path carried packets."""
    assert all(report["paths"][p] > 0 for p in READ_PATHS), report["paths"]
    assert all(writer.counts[p] > 0 for p in WRITE_PATHS), writer.counts
    assert report["requests"] == report["paths"]["exchange"]


@pytest.mark.parametrize(
    ("ring_bytes", "seed"),
    [(8192, 1), (266240, 2)],  # one data page; 256 KiB (offsets past 64 and 128 KiB)
)
def test_every_path_between_two_processes(ring_bytes: int, seed: int) -> None:
    report, writer, elapsed = run(seed, 25_000, ring_bytes)
    check_paths(report, writer)
    assert report["waits"] > 0  # the child slept (and was woken) too
    assert elapsed < 60, f"took {elapsed:.1f} s"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ring_bytes", "seed"), [(12288, 11), (69632, 12), (1052672, 13), (4198400, 14)]
)
def test_every_path_between_two_processes_a_million_packets(ring_bytes: int, seed: int) -> None:
    report, writer, elapsed = run(seed, 1_000_000, ring_bytes)
    check_paths(report, writer)
    print(f"{ring_bytes} bytes: {report['packets']} packets, {report['body_bytes']} body bytes, "
          f"{elapsed:.1f} s, child waits {report['waits']}")

