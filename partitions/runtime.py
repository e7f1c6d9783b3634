"""The partition side of the cluster: bootstrap, the hypercall client, the idle loop.

Layer: partitions.  ``python -m partitions.root`` and ``python -m
partitions.child`` both run ``main`` here; the supervisor (hv/supervisor.py)
starts them with their partition link as fd 3 (hv/link.py)::

    python -m partitions.child --cluster NAME --partition child1 --id 1 --fd 3 \\
        --log RUN/logs/child1.jsonl

Bootstrap, in order: die with the supervisor (PR_SET_PDEATHSIG, so kill -9 of
the supervisor ends every partition), ignore SIGINT (only the supervisor stops
a partition), set the process title ``viridian[CLUSTER]: NAME``, wait for the
supervisor's ``boot`` message, map the memory it granted (memfds that came
with it), answer ``hello`` with the bytes it can see, then sleep in a
selector until a message arrives: an idle partition uses no CPU.  A ``stop``
message, or the link closing, ends it with exit status 0.

Trust: the partition trusts its supervisor (the hypervisor); it validates
only what it needs to run (message shapes, fd counts).
"""

from __future__ import annotations

import argparse
import mmap
import os
import selectors
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from hv.jsonlog import JsonLog
from hv.link import KIND_CONTROL, KIND_HYPERCALL, Link, close_fds
from hv.proc import die_with_parent

__all__ = ["BOOT_TIMEOUT_S", "GuestMemoryView", "HvClient", "PartitionRuntime", "main"]

BOOT_TIMEOUT_S = 15.0
HYPERCALL_TIMEOUT_S = 5.0


class GuestMemoryView:
    """The partition's view of its guest-physical memory: the ranges it was granted.

    Each range is a memfd the supervisor sent, mapped shared; its GPA base is
    in the boot message.  ``guest_visible_bytes`` is what this partition can use.
    """

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, mmap.mmap]] = []  # (gpa, bytes, mapping)

    def add(self, gpa: int, fd: int, nbytes: int) -> None:
        """Map ``nbytes`` of memfd ``fd`` at ``gpa`` (adopts and closes the fd)."""
        try:
            if os.fstat(fd).st_size < nbytes:
                raise ValueError(f"grant at gpa {gpa:#x} is smaller than announced")
            m = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.ranges.append((gpa, nbytes, m))

    @property
    def guest_visible_bytes(self) -> int:
        return sum(n for _, n, _ in self.ranges)

    def close(self) -> None:
        for _, _, m in self.ranges:
            m.close()
        self.ranges.clear()


class HvClient:
    """Hypercalls from this partition, over its link to the supervisor.

    Each call sends one ``H`` message and waits for the reply; control messages
    that arrive meanwhile are queued for the runtime's loop (``pending``).
    The encoding is hv/hypercalls.py's when it is installed, else the spec's
    input layout behind a little-endian u16 call code (replies: u16 status).
    """

    POST_MESSAGE = 0x5C
    SIGNAL_EVENT = 0x5D

    def __init__(self, link: Link) -> None:
        self.link = link
        self.pending: deque[tuple[int, bytes, list[int]]] = deque()
        try:
            from hv import hypercalls
        except ImportError:
            hypercalls = None  # type: ignore[assignment]
        self._hc: Any = hypercalls

    def call(self, request: bytes, timeout: float = HYPERCALL_TIMEOUT_S) -> bytes:
        """Send an encoded hypercall and return the encoded reply.

        Raises:
            TimeoutError: no reply within ``timeout``.
            ConnectionError: the supervisor is gone.
        """
        self.link.send_hypercall(request)
        deadline = time.monotonic() + timeout
        sock = self.link.sock
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no hypercall reply from the supervisor")
            sock.settimeout(left)
            try:
                msg = self.link.recv()
            except TimeoutError:
                raise TimeoutError("no hypercall reply from the supervisor") from None
            finally:
                sock.setblocking(False)
            if msg is None:
                raise ConnectionError("the supervisor closed the partition link")
            if msg[0] == KIND_HYPERCALL:
                close_fds(msg[2])
                return msg[1]
            self.pending.append(msg)

    def post_message(self, connection_id: int, message_type: int, payload: bytes) -> int:
        """HvPostMessage (0x5C): the HvStatus the supervisor answered."""
        hc = self._hc
        if hc is not None and hasattr(hc, "encode_post_message"):
            return int(hc.decode_reply(self.call(
                hc.encode_post_message(connection_id, message_type, payload))))
        body = struct.pack("<HIIII", self.POST_MESSAGE, connection_id, 0, message_type,
                           len(payload)) + payload[:240].ljust(240, b"\0")
        return self._status(self.call(body))

    def signal_event(self, connection_id: int, flag_number: int = 0) -> int:
        """HvSignalEvent (0x5D): the HvStatus the supervisor answered."""
        hc = self._hc
        if hc is not None and hasattr(hc, "encode_signal_event"):
            return int(hc.decode_reply(self.call(
                hc.encode_signal_event(connection_id, flag_number))))
        return self._status(self.call(struct.pack("<HIHH", self.SIGNAL_EVENT, connection_id,
                                                  flag_number, 0)))

    @staticmethod
    def _status(reply: bytes) -> int:
        if len(reply) < 2:
            raise ConnectionError("malformed hypercall reply")
        return int(struct.unpack_from("<H", reply)[0])


class PartitionRuntime:
    """One partition process: its link, memory, hypercall client and main loop."""

    def __init__(self, link: Link, log: JsonLog, name: str, role: str) -> None:
        self.link = link
        self.log = log
        self.name = name
        self.role = role
        self.memory = GuestMemoryView()
        self.hv = HvClient(link)
        self.boot_info: dict[str, Any] = {}
        self._sel = selectors.DefaultSelector()
        self._stop = False
        self.handlers: dict[str, Callable[[dict[str, Any], list[int]], None]] = {
            "stop": self._on_stop,
            "memory.add": self._on_memory_add,
        }

    def boot(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Wait for the supervisor's ``boot``, map the granted memory, say ``hello``.

        Raises:
            TimeoutError, ConnectionError, ValueError: no usable boot message.
        """
        self.link.sock.settimeout(timeout)
        try:
            msg = self.link.recv()
        finally:
            self.link.sock.setblocking(False)
        if msg is None:
            raise ConnectionError("the supervisor closed the link before boot")
        kind, body, fds = msg
        obj = Link.decode_control(body) if kind == KIND_CONTROL else None
        if obj is None or obj.get("op") != "boot":
            close_fds(fds)
            raise ValueError("the first message was not boot")
        self.boot_info = obj
        self._map(obj.get("memory", []), fds)
        self.link.send_control({"op": "hello", "guest_visible_bytes":
                                self.memory.guest_visible_bytes})
        self.log("booted", role=self.role, guest_visible_bytes=self.memory.guest_visible_bytes,
                 ranges=len(self.memory.ranges))

    def _map(self, ranges: list[dict[str, Any]], fds: list[int]) -> None:
        if len(ranges) != len(fds):
            close_fds(fds)
            raise ValueError(f"{len(ranges)} memory ranges announced, {len(fds)} fds received")
        for r, fd in zip(ranges, fds, strict=True):
            self.memory.add(int(r["gpa"]), fd, int(r["bytes"]))

    def _on_stop(self, obj: dict[str, Any], fds: list[int]) -> None:
        close_fds(fds)
        self.log("stop requested")
        self._stop = True

    def _on_memory_add(self, obj: dict[str, Any], fds: list[int]) -> None:
        self._map(obj.get("memory", []), fds)
        self.report_memory()

    def report_memory(self) -> None:
        self.link.send_control({"op": "memory",
                                "guest_visible_bytes": self.memory.guest_visible_bytes})

    def _dispatch(self, kind: int, body: bytes, fds: list[int]) -> None:
        obj = Link.decode_control(body) if kind == KIND_CONTROL else None
        handler = self.handlers.get(str(obj.get("op"))) if obj else None
        if handler is None or obj is None:
            close_fds(fds)
            self.log("unexpected message", level="warning", kind=kind)
            return
        handler(obj, fds)

    def run(self) -> int:
        """Serve messages until ``stop`` or the link closes; returns the exit status."""
        self._sel.register(self.link.sock, selectors.EVENT_READ)
        while not self._stop:
            while self.hv.pending and not self._stop:
                self._dispatch(*self.hv.pending.popleft())
            if self._stop:
                break
            self._sel.select()  # no timeout: an idle partition sleeps in the kernel
            while not self._stop:
                try:
                    msg = self.link.recv()
                except BlockingIOError:
                    break
                if msg is None:
                    self.log("supervisor closed the link")
                    self._stop = True
                    break
                self._dispatch(*msg)
        self._sel.close()
        return 0

    def close(self) -> None:
        self.memory.close()
        self.link.close()
        self.log.close()


def parse_args(argv: list[str] | None, role: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m partitions.{role}",
                                 description=f"A Viridian {role} partition (started by the "
                                 "supervisor with its link as --fd).")
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--partition", required=True, help="this partition's name")
    ap.add_argument("--id", type=int, default=0)
    ap.add_argument("--fd", type=int, default=3, help="the partition link (SOCK_SEQPACKET)")
    ap.add_argument("--log", default=None, help="the JSON-lines log file")
    return ap.parse_args(argv)


def main(role: str, argv: list[str] | None = None) -> int:
    """Entry point of ``python -m partitions.root`` / ``partitions.child``."""
    args = parse_args(argv, role)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from setproctitle import setproctitle

        setproctitle(f"viridian[{args.cluster}]: {args.partition}")
    except ImportError:  # pragma: no cover - a dependency
        pass
    log = JsonLog(args.log, partition=args.partition, pid=os.getpid())
    try:
        link = Link.from_fd(args.fd)
    except OSError as e:
        log("no partition link", level="error", error=str(e))
        return 2
    rt = PartitionRuntime(link, log, args.partition, role)
    try:
        rt.boot()
        return rt.run()
    except (OSError, ValueError, TimeoutError) as e:
        log("failed", level="error", error=f"{type(e).__name__}: {e}")
        print(f"partition {args.partition}: {e}", file=sys.stderr)
        return 1
    finally:
        log("exit")
        rt.close()
