"""The far end of the cross-process ring tests (run as ``python -m ring_peer``).

Usage: ring_peer MODE PARENT_PID RING_A_FD RING_B_FD PARENT_BELL_FD CHILD_BELL_FD [ARGS]

Ring A carries parent -> child, ring B child -> parent.  The child waits on
CHILD_BELL and rings PARENT_BELL; everything arrives as inherited fds.  The
child dies with its parent (PR_SET_PDEATHSIG), and reports one JSON line per
event on stdout.

Modes:
  stream SEED TOTAL    read TOTAL body bytes from A, then send as many on B
  idle-reader          say "ready", block in wait_readable on A, report the packet
  blocked-writer SIZE  fill A, say "full", then block in write() of a SIZE payload
  jitter-writer N SEED  write N 64-byte packets (trans_id = seq) to A with random
                       busy gaps of 0-60 us, so that the reader keeps giving up
                       its spin and going to sleep just as a packet comes

The stream (both directions use it) is a sequence of packets whose sizes and
contents derive from SEED: a 16-byte header {seq u64, body u32, pool offset
u32} and then ``body`` bytes of a pseudo-random pool.  Both ends compute
crc32 over the bodies, check every header, every body and every padding
byte, and count wraps of the index they own.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import struct
import sys
import time
import zlib
from collections.abc import Iterator

from vmbus.doorbell import Doorbell
from vmbus.ring import IncomingRing, OutgoingRing, packet_bytes
from vmbus.shm import SharedMemory

RING_BYTES = 4096 + 64 * 1024
HDR = struct.Struct("<QII")  # seq, body bytes, pool offset
POOL_BYTES = 1 << 22
WAIT_S = 10.0  # every blocking wait is bounded
# exchange() spins in the exchange test: none (the slow path, always), short
# (the answer often comes after it: the read blocks) and the default
SPINS = (0, 2_000, 20_000)


def die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(3)


def make_pool(seed: int) -> bytes:
    return random.Random(seed).randbytes(POOL_BYTES)


def stream_plan(seed: int, total: int, max_body: int) -> Iterator[tuple[int, int]]:
    """(body bytes, pool offset) of each packet, until ``total`` body bytes."""
    rng = random.Random(seed * 7919 + 1)
    sent = 0
    while sent < total:
        r = rng.random()
        if r < 0.3:
            n = rng.randrange(0, 257)
        elif r < 0.55:
            n = rng.randrange(0, 8193)
        else:
            n = rng.randrange(0, max_body + 1)
        yield n, rng.randrange(0, POOL_BYTES - n + 1)
        sent += n


class WrapCounter:
    """Counts wraps of an index we own by watching it go down."""

    def __init__(self, shm: SharedMemory, offset: int) -> None:
        self.map, self.offset = shm.map, offset
        self.last = struct.unpack_from("<I", self.map, offset)[0]
        self.wraps = 0

    def update(self) -> None:
        now = struct.unpack_from("<I", self.map, self.offset)[0]
        if now < self.last:
            self.wraps += 1
        self.last = now


def send_stream(
    out: OutgoingRing, shm: SharedMemory, bell: Doorbell, seed: int, total: int
) -> dict[str, int]:
    pool = memoryview(make_pool(seed))
    max_body = out.max_payload_bytes - HDR.size
    wraps = WrapCounter(shm, 0)  # write_index
    crc = packets = body_bytes = ring_bytes = 0
    batch: list[bytes] = []

    def flush() -> None:
        while batch:
            k = out.write_many(batch)
            del batch[:k]
            wraps.update()
            if batch and not out.wait_writable(packet_bytes(len(batch[0])), bell, WAIT_S):
                raise TimeoutError("writer: no space for 10 s")

    for seq, (n, off) in enumerate(stream_plan(seed, total, max_body)):
        body = pool[off : off + n]
        payload = HDR.pack(seq, n, off) + body
        crc = zlib.crc32(body, crc)
        packets += 1
        body_bytes += n
        ring_bytes += packet_bytes(len(payload))
        if n <= 256:  # small packets go out in batches: one publication each
            batch.append(payload)
            if len(batch) == 8:
                flush()
            continue
        flush()
        while not out.try_write(payload, trans_id=seq):
            if not out.wait_writable(packet_bytes(len(payload)), bell, WAIT_S):
                raise TimeoutError("writer: no space for 10 s")
        wraps.update()
    flush()
    return {
        "crc": crc,
        "packets": packets,
        "body_bytes": body_bytes,
        "ring_bytes": ring_bytes,
        "wraps": wraps.wraps,
    }


def recv_stream(
    inc: IncomingRing, shm: SharedMemory, bell: Doorbell, seed: int, total: int
) -> dict[str, int]:
    pool = make_pool(seed)
    max_body = inc.max_payload_bytes - HDR.size
    wraps = WrapCounter(shm, 4)  # read_index
    buf = bytearray(inc.max_payload_bytes)
    mv = memoryview(buf)
    crc = packets = body_bytes = ring_bytes = 0
    for seq, (n, off) in enumerate(stream_plan(seed, total, max_body)):
        padded = (HDR.size + n + 7) & ~7
        while True:
            # mostly the one-copy path; now and then the batch and zero-copy ones
            if seq % 97 == 1:
                p = inc.try_read()
                got = None if p is None else len(mv_set(mv, p.payload))
            elif seq % 89 == 2:
                view = inc.peek()
                got = None
                if view is not None:
                    with view:
                        got = view.copy_into(buf)
            else:
                info = inc.read_into(buf)
                got = None if info is None else info.payload_bytes
            if got is not None:
                break
            if not inc.wait_readable(bell, WAIT_S):
                raise TimeoutError(f"reader: nothing for 10 s (packet {seq})")
        wraps.update()
        if got != padded or HDR.unpack_from(buf) != (seq, n, off):
            raise AssertionError(
                f"packet {seq}: got {HDR.unpack_from(buf)}, {got} bytes; "
                f"expected {(seq, n, off)}, {padded} bytes"
            )
        body = mv[HDR.size : HDR.size + n]
        if buf[HDR.size : HDR.size + n] != pool[off : off + n]:  # (bytes compare: memcmp)
            raise AssertionError(f"packet {seq}: body differs")
        if any(mv[HDR.size + n : padded]):
            raise AssertionError(f"packet {seq}: padding not zero")
        crc = zlib.crc32(body, crc)
        packets += 1
        body_bytes += n
        ring_bytes += padded + 24
    return {
        "crc": crc,
        "packets": packets,
        "body_bytes": body_bytes,
        "ring_bytes": ring_bytes,
        "wraps": wraps.wraps,
    }


def mv_set(mv: memoryview, data: bytes) -> bytes:
    mv[: len(data)] = data
    return data


def say(**kw: object) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    mode, parent = argv[0], int(argv[1])
    die_with_parent(parent)
    fd_a, fd_b, fd_parent_bell, fd_child_bell = map(int, argv[2:6])
    args = argv[6:]
    with (
        SharedMemory.from_fd(fd_a) as ring_a,
        SharedMemory.from_fd(fd_b) as ring_b,
        Doorbell(fd_parent_bell) as parent_bell,
        Doorbell(fd_child_bell) as bell,
    ):
        if mode == "stream":
            seed, total = int(args[0]), int(args[1])
            with IncomingRing(ring_a.map, on_signal=parent_bell.ring) as inc:
                got = recv_stream(inc, ring_a, bell, seed, total)
            with OutgoingRing(ring_b.map, on_signal=parent_bell.ring) as out:
                sent = send_stream(out, ring_b, bell, seed + 1, total)
            say(received=got, sent=sent, waits=bell.waits, rings=parent_bell.rings)
        elif mode == "idle-reader":
            with IncomingRing(ring_a.map, on_signal=parent_bell.ring) as inc:
                say(ready=True)
                t0 = time.monotonic()
                ok = inc.wait_readable(bell, 20.0)
                p = inc.try_read()
                say(
                    ok=ok,
                    waits=bell.waits,
                    elapsed=time.monotonic() - t0,
                    payload=None if p is None else p.payload.hex(),
                )
        elif mode == "blocked-writer":
            size = int(args[0])
            with OutgoingRing(ring_a.map, on_signal=parent_bell.ring) as out:
                n = 0
                while out.try_write(bytes([n & 0xFF]) * size, trans_id=n):
                    n += 1
                say(full=n, free=out.bytes_writable())
                t0 = time.monotonic()
                ok = out.write(b"\xbb" * size, bell, 20.0, trans_id=n)
                say(ok=ok, waits=bell.waits, elapsed=time.monotonic() - t0)
        elif mode == "jitter-writer":
            n, rng = int(args[0]), random.Random(int(args[1]))
            with OutgoingRing(ring_a.map, on_signal=parent_bell.ring) as out:
                say(ready=True)
                clock = time.perf_counter_ns
                for seq in range(n):
                    until = clock() + rng.randrange(60_000)
                    while clock() < until:  # a gap of work, not a wait for anyone
                        pass
                    if not out.write(bytes(64), bell, WAIT_S, trans_id=seq):
                        raise SystemExit("no space for 10 s: the reader stopped")
                say(sent=n, signals=out.debug_info()["signals"])
        elif mode == "exchange-answerer":
            # Answers each request on ring_a with its bytes reversed on ring_b,
            # after a random gap of work (0-60 us: the parent sometimes sleeps),
            # with IncomingRing.exchange: the answer, then the next request.
            n, rng = int(args[0]), random.Random(int(args[1]))
            with (
                IncomingRing(ring_a.map, on_signal=parent_bell.ring) as inc,
                OutgoingRing(ring_b.map, on_signal=parent_bell.ring) as out,
            ):
                inc.bind_reply_ring(out)
                say(ready=True)
                clock = time.perf_counter_ns
                req = inc.read_payload(bell, WAIT_S)
                for seq in range(n):
                    if req is None:
                        raise SystemExit(f"no request {seq} for 10 s")
                    until = clock() + rng.randrange(60_000)
                    while clock() < until:  # a gap of work, not a wait for anyone
                        pass
                    answer = req[::-1]
                    if seq == n - 1:  # the last answer: no request follows
                        if not out.write(answer, bell, WAIT_S):
                            raise SystemExit("no space for the last answer")
                        break
                    req = inc.exchange(answer, bell, WAIT_S, spin_ns=rng.choice(SPINS))
                say(answered=n, signals=out.debug_info()["signals"], waits=bell.waits)
        else:
            raise SystemExit(f"unknown mode {mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
