"""The ring between two real OS processes: memfd rings and eventfd doorbells
passed as fds, a child that dies with its parent, a GiB streamed each way
through 64 KiB rings, and the two wake-ups (data available, space available)
across the process boundary.  Every wait has a timeout."""

from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from ring_peer import RING_BYTES, SPINS, recv_stream, send_stream

from vmbus.doorbell import Doorbell
from vmbus.ring import IncomingRing, OutgoingRing, init_ring, packet_bytes
from vmbus.shm import SharedMemory

pytestmark = pytest.mark.multiprocess

GIB = 1 << 30
DSIZE = RING_BYTES - 4096


def u32(buf: Any, off: int) -> int:
    return int.from_bytes(buf[off : off + 4], "little")


class Peer:
    """A ring_peer child: JSON lines from its stdout, each read with a timeout."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._buf = b""

    def line(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no report from the peer in {timeout} s")
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"peer exited early: {self.finish(10)}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode(errors="replace")
        assert rc == 0, f"peer failed (exit {rc}):\n{err}"
        return rc

    def wait_blocked(self, ready: Any, timeout: float = 20) -> None:
        """Until ready() holds and the peer sleeps in the kernel (its poll)."""
        proc = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout
        while not (ready() and proc.status() == psutil.STATUS_SLEEPING):
            assert self.proc.poll() is None, "the peer exited"
            assert time.monotonic() < deadline, "the peer never blocked"


@contextmanager
def peer(
    mode: str, *args: object
) -> Iterator[tuple[Peer, SharedMemory, SharedMemory, Doorbell, Doorbell]]:
    with ExitStack() as stack:
        ring_a = stack.enter_context(SharedMemory.create(RING_BYTES))  # parent -> child
        ring_b = stack.enter_context(SharedMemory.create(RING_BYTES))  # child -> parent
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
            [
                sys.executable,
                "-m",
                "ring_peer",
                mode,
                str(os.getpid()),
                *map(str, fds),
                *map(str, args),
            ],
            pass_fds=fds,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            yield Peer(proc), ring_a, ring_b, parent_bell, child_bell
        except BaseException as e:  # say why the peer went away, if it did
            if proc.poll() not in (None, 0) and proc.stderr is not None:
                err = proc.stderr.read().decode(errors="replace")
                e.add_note(f"the peer exited with {proc.returncode}:\n{err}")
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()


def test_stream_a_gibibyte_each_way_through_64k_rings() -> None:
    seed = 20261124
    t0 = time.monotonic()
    with peer("stream", seed, GIB) as (p, ring_a, ring_b, parent_bell, child_bell):
        with OutgoingRing(ring_a.map, on_signal=child_bell.ring) as out:
            sent = send_stream(out, ring_a, parent_bell, seed, GIB)
        with IncomingRing(ring_b.map, on_signal=child_bell.ring) as inc:
            got = recv_stream(inc, ring_b, parent_bell, seed + 1, GIB)
        report = p.line(60)
        p.finish(30)
    elapsed = time.monotonic() - t0
    # both ends agree on every packet, byte and checksum, in both directions
    assert report["received"] == sent
    assert report["sent"] == got
    for leg in (sent, got):
        assert leg["body_bytes"] >= GIB
        # each packet is smaller than the ring, so an index wraps exactly once
        # per data-size of ring bytes; both ends saw every wrap
        assert leg["wraps"] == leg["ring_bytes"] // DSIZE
        assert leg["wraps"] >= GIB // DSIZE
    assert elapsed < 60, f"took {elapsed:.1f} s"


def test_idle_reader_blocked_in_wait_readable_wakes_when_the_peer_writes() -> None:
    with peer("idle-reader") as (p, ring_a, _b, _pbell, child_bell):
        assert p.line(30) == {"ready": True}
        p.wait_blocked(lambda: True)
        assert u32(ring_a.map, 8) == 0  # it unmasked before it slept: it wants a signal
        with OutgoingRing(ring_a.map, on_signal=child_bell.ring) as out:
            assert out.try_write(b"wake up!", trans_id=1)
        assert child_bell.rings == 1  # empty -> non-empty with the mask clear
        report = p.line(30)
        p.finish(30)
    assert report["ok"] is True
    assert report["payload"] == b"wake up!".hex()
    assert report["waits"] == 1  # it slept on its doorbell and woke from it, once


def test_writer_blocked_on_a_full_ring_wakes_once_the_reader_frees_space() -> None:
    size = 3000
    need = packet_bytes(size)  # 3024 ring bytes
    with peer("blocked-writer", size) as (p, ring_a, _b, parent_bell, child_bell):
        full = p.line(30)
        assert full["free"] <= need  # no room for one more
        # the writer publishes pending_send_sz = its need, then sleeps
        p.wait_blocked(lambda: u32(ring_a.map, 12) == need)
        with IncomingRing(ring_a.map, on_signal=child_bell.ring, readahead_packets=1) as inc:
            free, reads = full["free"], 0
            while child_bell.rings == 0:
                q = inc.try_read()
                assert q is not None and q.trans_id == reads
                reads += 1
                free += need
                assert reads <= full["full"], "the reader never signalled the writer"
            # exactly at the crossing: free space went from <= need to > need
            assert free - need <= need < free
            report = p.line(30)
            assert report["ok"] is True and report["waits"] >= 1
            rest = []
            while len(rest) < full["full"] - reads + 1:
                q = inc.read(parent_bell, 10)
                assert q is not None, "timed out draining"
                rest.append(q)
            assert child_bell.rings == 1  # one wake-up, not one per packet
        p.finish(30)
        assert u32(ring_a.map, 12) == 0  # its write withdrew pending_send_sz
    assert [q.trans_id for q in rest] == list(range(reads, full["full"] + 1))
    assert rest[-1].payload == b"\xbb" * size + bytes(-size % 8)


@pytest.mark.parametrize("mode", ["membarrier", "adaptive", "fences"])
def test_a_reader_that_keeps_going_to_sleep_as_packets_come_is_always_woken(mode: str) -> None:
    """The wake-up race, many times over: the reader spins 10 us, then unmasks
    and sleeps; the writer's gaps (0-60 us) put its writes around that moment.
    A lost wake-up (a writer that read a stale mask) would leave a packet in
    the ring and the reader asleep until its timeout, which is counted.

    ``membarrier``: the reader promises on every sleep (no gap between
    barriers), so every sleep runs the asymmetric protocol.  ``adaptive``: the
    default, at most one barrier per ms, fences in between: the reader keeps
    switching between the two protocols.  ``fences``: the reader behaves as on
    a kernel without membarrier(2); it withdraws the promise an earlier reader
    left in the control page, and the writer must then fence on every write."""
    promise = mode != "fences"
    if promise and not OutgoingRing(_fresh_ring()).debug_info()["heavy_barrier"]:
        pytest.skip("this kernel offers no membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)")

    class Bell:  # the doorbell, counting sleeps that ended without a ring
        def __init__(self, bell: Doorbell) -> None:
            self.bell, self.timeouts = bell, []

        def wait(self, timeout: float) -> bool:
            rung = self.bell.wait(timeout)
            if not rung:
                self.timeouts.append(seq)
            return rung

    n = 40_000
    with peer("jitter-writer", n, 7) as (p, ring_a, _b, parent_bell, child_bell):
        assert p.line(30) == {"ready": True}
        bell = Bell(parent_bell)
        if not promise:
            ring_a.map[0x80:0x84] = (1).to_bytes(4, "little")  # an earlier reader's
        with IncomingRing(ring_a.map, on_signal=child_bell.ring) as inc:
            if mode == "fences":
                inc._r.heavy = 0  # fault injection: no membarrier here
            elif mode == "membarrier":
                inc._r.heavy_gap_ns = 0
            for seq in range(n):
                q = inc.read(bell, 1.0, spin_ns=10_000)  # type: ignore[arg-type]
                assert q is not None and q.trans_id == seq
                assert not bell.timeouts, f"lost wake-ups, first at packet {bell.timeouts[0]}"
            slept = parent_bell.waits
        report = p.line(30)
        p.finish(30)
        if mode != "adaptive":  # the promise as the reader left it
            assert u32(ring_a.map, 0x80) == int(promise)
    assert report["sent"] == n
    # the race was exercised: the reader slept (and was signalled) many times
    assert slept > n // 10 and report["signals"] > n // 10


def test_exchange_round_trips_with_a_peer_that_answers_with_exchange() -> None:
    """Requests and answers through IncomingRing.exchange on both ends: the
    one-call path while the other end polls, and the signalled and blocking
    paths when it does not (random spins on each side, random gaps of work in
    the answerer).  Every answer must be its request reversed, in order, and
    both kinds of round trip must have happened many times."""
    n = 20_000
    rng = random.Random(11)
    with peer("exchange-answerer", n, 12) as (p, ring_a, ring_b, parent_bell, child_bell):
        assert p.line(30) == {"ready": True}
        with (
            OutgoingRing(ring_a.map, on_signal=child_bell.ring) as out,
            IncomingRing(ring_b.map, on_signal=child_bell.ring) as inc,
        ):
            inc.bind_reply_ring(out)
            for seq in range(n):
                req = rng.randbytes(rng.randrange(2000)) + seq.to_bytes(4, "little")
                answer = inc.exchange(req, parent_bell, 10.0, spin_ns=rng.choice(SPINS))
                assert answer == (req + bytes(-len(req) % 8))[::-1], f"round trip {seq}"
            sent = out.debug_info()
        report = p.line(30)
        p.finish(30)
    assert report["answered"] == n and sent["packets"] == n
    # the requests found the answerer asleep (signalled) and polling (not),
    # each many times (the split depends on timing: 1.9k-14k of 20k seen)
    assert min(sent["signals"], sent["signals_suppressed"]) > n // 100
    assert report["signals"] > n // 100  # and the answers found the parent asleep


def _fresh_ring() -> bytearray:
    buf = bytearray(8192)
    init_ring(buf)
    return buf
