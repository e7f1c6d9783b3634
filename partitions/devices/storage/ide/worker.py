"""The per-child device worker: emulates a child's IDE controller in a root process.

Layer: partitions (root).  Hyper-V's design runs device emulation for a child
in a *VM worker process* in the root, never in the hypervisor.  The root
starts one of these per child that has an ``ide`` disk::

    python -m partitions.root.ideworker --cluster C --child child2 \\
        --image /path/disk.img --size 1073741824 --fds 3,4,5,6 --log RUN/logs/...

fds: the worker's intercept slot page, its request eventfd and its done
eventfd (from the supervisor, via the root), and a socket to the root.  Each
trapped port access of the child arrives in the slot (hv/intercept/); the
worker runs it through ``IdeController`` and answers; the supervisor resumes
the child.  DMA goes straight between the image and the child's pages: the
root forwards every grant the child makes (MEMORY frames with the child's
memfds) over the socket, and the controller may touch only granted pages.

The worker dies with the root (PR_SET_PDEATHSIG) and exits when the socket
closes.  Statistics go to the root over the socket (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from hv.intercept import OUT
from hv.intercept.server import InterceptServer
from hv.jsonlog import JsonLog
from hv.partition_memory import GpaError, GrantTable
from hv.proc import die_with_parent
from hv.wire import FrameDecoder, WireError, recv_frames

from ..disk import open_image
from .ata import IdeController

__all__ = ["GrantedMemory", "main"]

STATS_EVERY_S = 0.25


class GrantedMemory:
    """The child's memory as the worker may touch it: only pages the child
    granted, a range only if it is one contiguous run inside one grant."""

    def __init__(self) -> None:
        self.grants = GrantTable()
        self.owner: int | None = None  # the child (every grant the root forwards is its)

    def apply_frame(self, frame: Any) -> None:
        self.owner = self.grants.apply_frame(frame).owner

    def view(self, gpa: int, length: int) -> memoryview:
        if length <= 0 or gpa < 0:
            raise GpaError(f"bad DMA range {gpa:#x}+{length}")
        first, last = gpa >> 12, (gpa + length - 1) >> 12
        loc = self.grants.locate(self.owner, first) if self.owner is not None else None
        if loc is None:
            raise GpaError(f"GPA {gpa:#x} is not in memory the child granted")
        g, i = loc
        # pages i.. of one mapping hold consecutive pfns; past the grant or across
        # two mappings GrantMapping.pages refuses (GpaError)
        return g.pages(i, last - first + 1)[gpa & 0xFFF :][:length]

    def close(self) -> None:
        self.grants.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m partitions.root.ideworker")
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--child", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--fds", required=True, help="page,request,done,socket")
    ap.add_argument("--log", default=None)
    args = ap.parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from setproctitle import setproctitle

        setproctitle(f"viridian[{args.cluster}]: ide-worker {args.child}")
    except ImportError:  # pragma: no cover
        pass
    log = JsonLog(args.log, partition=f"{args.child}.ide-worker", pid=os.getpid())
    page_fd, request_fd, done_fd, sock_fd = (int(x) for x in args.fds.split(","))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=sock_fd)
    server = InterceptServer(page_fd, request_fd, done_fd)
    memory = GrantedMemory()
    try:
        os.makedirs(os.path.dirname(args.image) or ".", mode=0o700, exist_ok=True)
        image = open_image(args.image, args.size, create=True)
    except (OSError, ValueError) as e:
        log("cannot open the disk image", level="error", error=str(e))
        sock.send(json.dumps({"op": "error", "error": str(e)}).encode())
        return 1
    irq = [False]
    ctl = IdeController(image, memory, irq=lambda: irq.__setitem__(0, True))

    def handle(op: int, port: int, size: int, value: int) -> tuple[int, bool]:
        irq[0] = False
        if op == OUT:
            ctl.io_write(port, size, value)
            return 0, irq[0]
        return ctl.io_read(port, size), irq[0]

    decoder = FrameDecoder()
    p = select.poll()
    p.register(server.fileno(), select.POLLIN)
    p.register(sock, select.POLLIN)
    sock.send(json.dumps({"op": "ready"}).encode())
    log("ready", image=args.image, size=args.size)
    last_stats: dict[str, int] = {}
    next_stats = 0.0
    served_before = 0
    try:
        while True:
            if server.pending():
                server.serve_one(handle)
                # the next access of a busy driver comes within microseconds:
                # spin for it before sleeping (the channels' spin-then-block).
                # Only the spin: the sleep is the poll below, which must also
                # watch the root's socket.
                server.spin()
                continue
            now = time.monotonic()
            if server.served != served_before and now >= next_stats:
                served_before = server.served
                stats = ctl.stats.as_dict()
                if stats != last_stats:
                    last_stats = stats
                    sock.send(json.dumps({"op": "stats", **stats}).encode())
                next_stats = now + STATS_EVERY_S
            timeout = -1 if server.served == served_before else int(STATS_EVERY_S * 1000)
            for fd, ev in p.poll(timeout):
                if fd == server.fileno():
                    try:  # consume the ring; the slot's sequence word says what is new
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                elif ev & (select.POLLHUP | select.POLLERR) and not ev & select.POLLIN:
                    return 0
                else:
                    try:
                        frames = recv_frames(sock, decoder)
                    except (WireError, OSError) as e:
                        log("bad frame from the root", level="error", error=str(e))
                        return 1
                    if frames is None:
                        return 0  # the root closed the socket: the child is gone
                    for fr in frames:
                        try:
                            memory.apply_frame(fr)
                        except (WireError, ValueError) as e:
                            log("bad grant", level="warning", error=str(e))
    finally:
        log("exit", **ctl.stats.as_dict())
        server.close()
        memory.close()
        image.close()
        sock.close()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
