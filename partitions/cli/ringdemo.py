"""The ring demo: two OS processes stream packets through one VMBus ring.

Layer: partitions.  The CLI process writes; a consumer process, started with
the ring's memfd and two eventfd doorbells passed as fds, reads, checks every
packet's sequence number and length and every 64th packet's CRC, and reports
per phase.  It shows what the
ring does on this machine before the cluster (hv/) is in the picture.

Run it with ``viridian ringdemo`` (partitions/cli/commands.py), or the consumer side
alone with ``python -m partitions.cli.ringdemo consume RING_FD BELL_FD PEER_FD``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from hv.abi import PAGE_SIZE
from hv.proc import die_with_parent
from vmbus.doorbell import Doorbell
from vmbus.ring import IncomingRing, OutgoingRing, init_ring, packet_bytes
from vmbus.shm import SharedMemory

RING_BYTES = PAGE_SIZE + (1 << 20)  # the control page + 1 MiB of data
_HDR = struct.Struct("<QII")  # sequence number, body bytes, crc32 of the body
CRC_EVERY = 64  # the consumer checks the CRC of every 64th packet (crc32 is slow)
_END = 0xFFFFFFFFFFFFFFFF  # the sequence number of a phase's end marker
WAIT_S = 5.0  # no wait in the demo blocks longer than this

__all__ = ["PhaseResult", "consume", "run"]


@dataclass
class PhaseResult:
    size: int
    packets: int
    seconds: float
    verified: bool
    bad_packets: int

    @property
    def msgs_per_s(self) -> float:
        return self.packets / self.seconds

    @property
    def bytes_per_s(self) -> float:
        return self.packets * self.size / self.seconds


def _make_body(size: int) -> bytes:
    return os.urandom(max(0, size - _HDR.size))


def consume(ring_fd: int, bell_fd: int, peer_fd: int) -> int:
    """The consumer process: read phases until the ring's writer says stop."""
    die_with_parent()
    shm = SharedMemory.from_fd(ring_fd)
    bell, peer = Doorbell(bell_fd), Doorbell(peer_fd)
    ring = IncomingRing(shm.map, on_signal=peer.ring)
    expect, bad = 0, 0
    try:
        while True:
            if not ring.wait_readable(bell, WAIT_S):
                print(json.dumps({"error": "timeout"}), flush=True)
                return 1
            for p in ring.drain(256):
                data = p.payload
                seq, body_len, crc = _HDR.unpack_from(data)
                if seq == _END:
                    size = body_len
                    print(json.dumps({"size": size, "packets": expect, "bad": bad}), flush=True)
                    if size == 0:
                        return 0
                    expect, bad = 0, 0
                    continue
                # The payload is padded to 8 bytes: the body length is in the header.
                ok = seq == expect and _HDR.size + body_len <= len(data)
                if ok and seq % CRC_EVERY == 0:
                    ok = zlib.crc32(data[_HDR.size : _HDR.size + body_len]) == crc
                bad += not ok
                expect += 1
    finally:
        ring.close()
        shm.close()


def run(
    sizes: tuple[int, ...] = (64, 1024, 16384, 65536),
    seconds: float = 1.5,
    progress: Callable[[int, float, int], None] | None = None,
) -> list[PhaseResult]:
    """Stream each size for ``seconds`` and return what the consumer verified.

    ``progress(size, elapsed_s, packets)`` is called a few times a second.
    """
    results: list[PhaseResult] = []
    shm = SharedMemory.create(RING_BYTES, "viridian-demo-ring")
    bell, peer_bell = Doorbell(), Doorbell()  # ours (space), the consumer's (data)
    child = None
    ring = None
    try:
        init_ring(shm.map)
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "partitions.cli.ringdemo",
                "consume",
                str(shm.fd),
                str(peer_bell.fileno()),
                str(bell.fileno()),
            ],
            pass_fds=(shm.fd, peer_bell.fileno(), bell.fileno()),
            stdout=subprocess.PIPE,
            text=True,
        )
        ring = OutgoingRing(shm.map, on_signal=peer_bell.ring)
        for size in sizes:
            body = _make_body(size)
            need = packet_bytes(_HDR.size + len(body))
            crc = zlib.crc32(body)
            n = 0
            t0 = time.perf_counter()
            next_report = t0 + 0.25
            while True:
                # Sequence numbers make every packet distinct and checkable.
                pkt = _HDR.pack(n, len(body), crc) + body
                if not ring.try_write(pkt):
                    if not ring.wait_writable(need, bell, WAIT_S):
                        raise TimeoutError("the consumer stopped reading")
                    continue
                n += 1
                if n & 255 == 0:
                    now = time.perf_counter()
                    if now >= next_report:
                        if progress:
                            progress(size, now - t0, n)
                        next_report = now + 0.25
                        if now - t0 >= seconds:
                            break
            _send_blocking(ring, bell, _HDR.pack(_END, size, 0))
            line = child.stdout.readline() if child.stdout else ""
            elapsed = time.perf_counter() - t0
            if not line:
                raise RuntimeError("the consumer process exited")
            report = json.loads(line)
            results.append(
                PhaseResult(
                    size,
                    n,
                    elapsed,
                    report.get("packets") == n and report.get("bad") == 0,
                    report.get("bad", -1),
                )
            )
        _send_blocking(ring, bell, _HDR.pack(_END, 0, 0))
        if child.stdout:
            child.stdout.readline()
        child.wait(timeout=WAIT_S)
    finally:
        if ring is not None:
            ring.close()
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(timeout=WAIT_S)
        if child is not None and child.stdout:
            child.stdout.close()
        bell.close()
        peer_bell.close()
        shm.close()
    return results


def _send_blocking(ring: OutgoingRing, bell: Doorbell, payload: bytes) -> None:
    if not ring.write(payload, bell, WAIT_S):
        raise TimeoutError("the consumer stopped reading")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "consume":
        sys.exit(consume(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
    sys.exit("usage: python -m partitions.cli.ringdemo consume RING_FD BELL_FD PEER_FD")
