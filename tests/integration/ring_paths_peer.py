"""Every ring path between two processes: the plan both ends follow, and the
reading end (run as ``python -m ring_paths_peer``).

Usage: ring_paths_peer PARENT_PID RING_A_FD RING_B_FD PARENT_BELL_FD CHILD_BELL_FD
       SEED PACKETS RING_BYTES

Ring A carries the parent's packets to this child, ring B the requests of
this child's ``exchange`` calls back to the parent.  The parent writes the
plan's packets, each by the write path the plan names; this child reads
them, choosing a read path at random for every packet (or batch), and checks
each against the plan: sequence number, the crc32 of the body, the zero
padding, and where the path shows them, type, flags, trans_id and ranges.
It reports one JSON line at the end (or dies with the first discrepancy on
stderr).  Every blocking call has a timeout; nothing sleeps to synchronise.

A payload is a 16-byte header {seq u64, body bytes u32, crc32 of the body
u32} and a body cut out of a pseudo-random pool.
"""

from __future__ import annotations

import json
import random
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ring_peer import die_with_parent

from vmbus.doorbell import Doorbell
from vmbus.packet import (
    GpaRange,
    PacketType,
    TransferPageRange,
    build_gpa_direct_header,
    build_xfer_pages_header,
)
from vmbus.ring import IncomingRing, OutgoingRing
from vmbus.shm import SharedMemory

HDR = struct.Struct("<QII")  # seq, body bytes, crc32(body)
REQ = struct.Struct("<Q")  # an exchange request: how many the child sent before
POOL_BYTES = 1 << 22
LARGEST_PACKET = 524280
WAIT_S = 10.0  # every blocking wait is bounded
SPINS = (0, 2_000, 20_000)
WRITE_PATHS = ("try_write", "write", "write_many", "gpa", "xfer", "request_space", "forge")
WRITE_WEIGHTS = (20, 20, 14, 8, 8, 10, 4)
READ_PATHS = (
    "try_read", "read", "try_read_payload", "read_payload", "drain", "drain_into",
    "read_into", "peek", "exchange", "mask",
)
READ_WEIGHTS = (12, 14, 8, 12, 8, 8, 10, 8, 14, 2)
#: extended-header bytes of the forged packets: around the read paths' edges
#: (4096 bytes of header; payload offsets of 64 KiB and 128 KiB), and any
EXT_EDGES = (8, 4080, 4088, 65512, 65520, 65528, 131048, 131056, 262128)


def make_pool(seed: int) -> bytes:
    return random.Random(seed).randbytes(POOL_BYTES)


@dataclass(frozen=True)
class Item:
    """One write call's packets: ``bodies`` are (bytes, pool offset) each."""

    seq: int  # the first packet's
    how: str
    bodies: tuple[tuple[int, int], ...]
    ptype: PacketType
    flags: int
    tid: int
    ranges: Any
    ext: bytes  # the extended header (a forged one: its length counts)
    spin: int
    prebuilt: bool


def largest_packet(ring_bytes: int) -> int:
    return min(LARGEST_PACKET, ring_bytes - 4096 - 16)


def plan(seed: int, packets: int, ring_bytes: int) -> Iterator[Item]:
    """The packets and how the parent writes them; both ends derive it."""
    rng = random.Random(seed * 7919 + 3)
    largest = largest_packet(ring_bytes)
    seq = 0
    while seq < packets:
        how = rng.choices(WRITE_PATHS, WRITE_WEIGHTS)[0]
        k = min(rng.randint(2, 9) if how == "write_many" else 1, packets - seq)
        ranges: Any = None
        ext = b""
        ptype = PacketType.COMP if rng.random() < 0.2 else PacketType.DATA_INBAND
        if how == "gpa":
            ptype = PacketType.DATA_USING_GPA_DIRECT
            ranges = tuple(
                GpaRange(c, o, tuple(rng.getrandbits(40) for _ in range((o + c + 4095) // 4096)))
                for c, o in ((rng.randint(1, 20000), rng.randrange(4096))
                             for _ in range(rng.randint(1, 3)))
            )
            ext = build_gpa_direct_header(ranges)
        elif how == "xfer":
            ptype = PacketType.DATA_USING_XFER_PAGES
            ranges = tuple(
                TransferPageRange(rng.getrandbits(32), rng.getrandbits(32))
                for _ in range(rng.randint(0, 4))
            )
            ext = build_xfer_pages_header(rng.getrandbits(16), ranges)
        elif how == "forge":
            room = largest - 16 - HDR.size - 8
            n = rng.choice([*EXT_EDGES, room, rng.randrange(8, room + 1, 8)])
            ext = bytes(min(n, room) & ~7)
        room = largest - 16 - len(ext) - HDR.size
        bodies = []
        for _ in range(k):
            r = rng.random()
            top = 256 if r < 0.6 else 2048 if r < 0.9 else 16384 if r < 0.98 else room
            n = rng.randint(0, max(0, min(top, room)))
            bodies.append((n, rng.randrange(POOL_BYTES - n + 1)))
        yield Item(
            seq, how, tuple(bodies), ptype, rng.randint(0, 1), rng.getrandbits(64), ranges, ext,
            rng.choice(SPINS), rng.random() < 0.5,
        )
        seq += k


def payload_of(seq: int, n: int, off: int, pool: bytes) -> bytes:
    body = pool[off : off + n]
    return HDR.pack(seq, n, zlib.crc32(body)) + body


class Checker:
    """Checks each delivered packet against the plan, in order."""

    def __init__(self, seed: int, packets: int, ring_bytes: int) -> None:
        self.expected = self._expected(plan(seed, packets, ring_bytes))
        self.seq = 0
        self.packets = packets
        self.crc = 0
        self.body_bytes = 0

    @staticmethod
    def _expected(items: Iterator[Item]) -> Iterator[tuple[int, int, int, Any]]:
        for it in items:
            for _ in it.bodies:
                yield int(it.ptype), it.flags, it.tid, it.ranges

    def check(self, payload: Any, how: str, meta: tuple[int, int, int, Any] | None) -> None:
        """``meta``: (type, flags, trans_id, ranges or ...) when the path gives them."""
        seq = self.seq
        ptype, flags, tid, ranges = next(self.expected)
        where = f"packet {seq} read by {how}"
        if len(payload) < HDR.size:
            raise AssertionError(f"{where}: a {len(payload)}-byte payload")
        got_seq, n, crc = HDR.unpack_from(payload)
        if got_seq != seq:
            raise AssertionError(f"{where}: sequence number {got_seq} (payload {len(payload)} B)")
        padded = (HDR.size + n + 7) & ~7
        if len(payload) != padded:
            raise AssertionError(f"{where}: {len(payload)} payload bytes, not {padded}")
        body = payload[HDR.size : HDR.size + n]
        if zlib.crc32(body) != crc:
            raise AssertionError(f"{where}: the body's crc32 differs")
        if any(payload[HDR.size + n :]):
            raise AssertionError(f"{where}: padding not zero")
        if meta is not None:
            want = (ptype, flags, tid)
            if tuple(meta[:3]) != want:
                raise AssertionError(f"{where}: (type, flags, trans_id) {meta[:3]}, not {want}")
            if meta[3] is not ... and meta[3] != ranges:
                raise AssertionError(f"{where}: ranges {meta[3]}, not {ranges}")
        self.crc = zlib.crc32(body, self.crc)
        self.body_bytes += n
        self.seq += 1


def read_all(
    inc: IncomingRing, bell: Doorbell, checker: Checker, rng: random.Random
) -> dict[str, Any]:
    """Read every packet of the plan, each by a read path chosen at random."""
    counts = dict.fromkeys(READ_PATHS, 0)
    buf = bytearray(inc.max_payload_bytes)
    requests = 0

    def wait(seq: int) -> None:
        if not inc.wait_readable(bell, WAIT_S, spin_ns=rng.choice(SPINS)):
            raise TimeoutError(f"reader: nothing for {WAIT_S} s (packet {seq})")

    while checker.seq < checker.packets:
        how = rng.choices(READ_PATHS, READ_WEIGHTS)[0]
        left = checker.packets - checker.seq
        spin = rng.choice(SPINS)
        seq = checker.seq
        if how == "try_read":
            p = inc.try_read()
            if p is None:
                wait(seq)
                continue
            checker.check(p.payload, how, (p.packet_type, p.flags, p.trans_id, p.ranges))
        elif how == "read":
            p = inc.read(bell, WAIT_S, spin_ns=spin)
            if p is None:
                raise TimeoutError(f"read: nothing for {WAIT_S} s (packet {seq})")
            checker.check(p.payload, how, (p.packet_type, p.flags, p.trans_id, p.ranges))
        elif how == "try_read_payload":
            b = inc.try_read_payload()
            if b is None:
                wait(seq)
                continue
            checker.check(b, how, None)
        elif how == "read_payload":
            b = inc.read_payload(bell, WAIT_S, spin_ns=spin)
            if b is None:
                raise TimeoutError(f"read_payload: nothing for {WAIT_S} s (packet {seq})")
            checker.check(b, how, None)
        elif how == "drain":
            batch = inc.drain(rng.randint(1, min(8, left)))
            if not batch:
                wait(seq)
                continue
            for p in batch:
                checker.check(p.payload, how, (p.packet_type, p.flags, p.trans_id, p.ranges))
        elif how == "drain_into":
            infos = inc.drain_into(buf, rng.randint(1, min(8, left)))
            if not infos:
                wait(seq)
                continue
            for info, off in zip(infos, infos.payload_offsets(), strict=True):
                meta = (info.packet_type, info.flags, info.trans_id, info.ranges)
                checker.check(buf[off : off + info.payload_bytes], how, meta)
        elif how == "read_into":
            info = inc.read_into(buf)
            if info is None:
                wait(seq)
                continue
            checker.check(
                buf[: info.payload_bytes], how,
                (info.packet_type, info.flags, info.trans_id, info.ranges),
            )
        elif how == "peek":
            v = inc.peek()
            if v is None:
                wait(seq)
                continue
            with v:
                b = b"".join(bytes(s) for s in v.segments)
                meta = (v.packet_type, v.flags, v.trans_id, ...)
            checker.check(b, how, meta)
        elif how == "exchange":
            b = inc.exchange(REQ.pack(requests), bell, WAIT_S, spin_ns=spin)
            requests += 1
            if b is None:
                raise TimeoutError(f"exchange: no answer for {WAIT_S} s (packet {seq})")
            checker.check(b, how, None)
        else:  # "mask": poll for a while; the next wait unmasks before it sleeps
            inc.mask_interrupts()
        counts[how] += 1
    return {
        "packets": checker.seq,
        "crc": checker.crc,
        "body_bytes": checker.body_bytes,
        "requests": requests,
        "paths": counts,
    }


def main(argv: list[str]) -> int:
    parent = int(argv[0])
    die_with_parent(parent)
    fd_a, fd_b, fd_parent_bell, fd_child_bell = map(int, argv[1:5])
    seed, packets, ring_bytes = map(int, argv[5:8])
    with (
        SharedMemory.from_fd(fd_a) as ring_a,
        SharedMemory.from_fd(fd_b) as ring_b,
        Doorbell(fd_parent_bell) as parent_bell,
        Doorbell(fd_child_bell) as bell,
        IncomingRing(ring_a.map, on_signal=parent_bell.ring) as inc,
        OutgoingRing(ring_b.map, on_signal=parent_bell.ring) as out,
    ):
        inc.bind_reply_ring(out)
        report = read_all(inc, bell, Checker(seed, packets, ring_bytes), random.Random(seed + 1))
        report["waits"] = bell.waits
        report["signals"] = inc.debug_info()["signals"] + out.debug_info()["signals"]
        sys.stdout.write(json.dumps(report) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
