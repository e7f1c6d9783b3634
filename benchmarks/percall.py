"""Per-call costs of the Python ring API, in one process on one CPU.

Not a benchmark of the suite (no peer, no cross-core traffic): it explains the
suite's numbers by pricing each call the producer and the consumer make.

    .venv/bin/python -m benchmarks.percall [--cpu 1] [--repeats 7]

Each line is the median over repeats of (time of a loop of k calls) / k, in
ns per packet, with the ring in a private bytearray.  Writes are timed on an
empty ring that is then drained untimed; reads are timed on a ring that was
filled untimed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from vmbus.packet import Packet, PacketType
from vmbus.ring import IncomingRing, OutgoingRing, init_ring, lib, packet_bytes

from .transports import batch_k

RING = 1 << 20


def _median_ns(run: Callable[[], int], repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        k = run()
        out.append((time.perf_counter_ns() - t0) / k)
    return statistics.median(out)


def measure(size: int, repeats: int) -> dict[str, float]:
    buf = bytearray(4096 + RING)
    init_ring(buf)
    w, r = OutgoingRing(buf), IncomingRing(buf)
    msg = b"\xab" * size
    k = min(256, RING // packet_bytes(size) - 2)
    dst = bytearray(size)
    res: dict[str, float] = {}

    def fill() -> None:
        for _ in range(k):
            assert w.try_write(msg)

    def empty() -> None:
        while len(r.drain(256)):
            pass

    def timed(name: str, setup: Callable[[], None], body: Callable[[], int]) -> None:
        vals = []
        for _ in range(repeats):
            setup()
            vals.append(_median_ns(body, 1))
            empty()
        res[name] = statistics.median(vals)

    def writes() -> int:
        tw = w.try_write
        for _ in range(k):
            tw(msg)
        return k

    def write_many() -> int:
        kk = min(k, batch_k(size, RING))
        chunk = [msg] * kk
        n = 0
        while n + kk <= k:
            n += w.write_many(chunk)
        return n

    def try_read() -> int:
        tr = r.try_read
        for _ in range(k):
            tr()
        return k

    def payload() -> int:
        tr = r.try_read
        for _ in range(k):
            _ = tr().payload
        return k

    def read_into() -> int:
        ri = r.read_into
        for _ in range(k):
            ri(dst)
        return k

    def drain() -> int:
        n = 0
        while n < k:
            n += len(r.drain(256))
        return n

    timed("try_write", empty, writes)
    timed("write_many (per msg)", empty, write_many)
    timed("try_read (no payload)", fill, try_read)
    timed("try_read().payload", fill, payload)
    timed("read_into(bytearray)", fill, read_into)
    timed("drain(256) (per msg)", fill, drain)
    w.close()
    r.close()
    return res


def extras(repeats: int) -> dict[str, float]:
    """Single operations that the hot paths use."""
    buf = bytearray(4096 + RING)
    init_ring(buf)
    w, r = OutgoingRing(buf), IncomingRing(buf)
    w.try_write(b"x" * 64)
    p = r.try_read()
    assert p is not None
    from vmbus.ring import ffi

    ops: dict[str, Callable[[], object]] = {
        "cffi call (vmbr_bytes_readable)": lambda: lib.vmbr_bytes_readable(r._r),
        "Packet.payload (64 B)": lambda: p.payload,
        "Packet.packet_type (an enum)": lambda: p.packet_type,
        "PacketType(6)": lambda: PacketType(6),
        "Packet(raw, pos)": lambda: Packet(p.raw(), 0),
        "ffi.from_buffer + release (bytearray)": lambda: ffi.release(ffi.from_buffer(buf)),
        "try_read() on an empty ring": r.try_read,
        "time.perf_counter_ns()": time.perf_counter_ns,
    }
    out = {}
    n = 20000
    for name, fn in ops.items():

        def loop(fn: Callable[[], object] = fn) -> int:
            for _ in range(n):
                fn()
            return n

        out[name] = _median_ns(loop, repeats)
    # the bare loop + lambda call, to subtract by eye
    out["(loop + lambda overhead)"] = _median_ns(
        lambda: sum(1 for _ in range(n) if (lambda: None)() is None), repeats)
    w.close()
    r.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.cpu})
    sizes = (64, 1024, 16384, 65536)
    rows = {s: measure(s, a.repeats) for s in sizes}
    names = list(next(iter(rows.values())))
    print(f"ns per packet, one process on CPU {a.cpu}, 1 MiB ring, median of {a.repeats}")
    print(f"{'call':<28}" + "".join(f"{s:>10}" for s in sizes))
    for n in names:
        print(f"{n:<28}" + "".join(f"{rows[s][n]:10.0f}" for s in sizes))
    print()
    for name, v in extras(a.repeats).items():
        print(f"{v:8.0f} ns  {name}")


if __name__ == "__main__":
    main()
