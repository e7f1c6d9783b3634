"""A rogue partition, as a real process, against the hypervisor services.

The test process plays the supervisor (hv.router, hv.synic,
hv.memory, driven by a small selector loop; the real supervisor process
wires the same objects) and the root partition's SynIC.  The rogue child
gets its own socket, SynIC and memory, and then tries what it must not:
post to a connection it may not use, signal someone else's event, share
pages it does not own, send malformed hypercalls, pass fds to the
supervisor, shrink its memfds, and finally send garbage.  Each attempt gets
an error status and nothing more: no message delivered, no flag set, no
grant made, no fd kept, and the supervisor carries on.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from hv import wire as W
from hv.abi import HvStatus
from hv.memory import GuestMemory
from hv.router import Connection, ConnectionKind, HypercallRouter
from hv.synic import SynicGuest, SynicHost
from hv.wire import FrameDecoder, WireError

ROOT, CHILD1, ROGUE = 0, 1, 2
MiB = 1 << 20

ROGUE_SCRIPT = textwrap.dedent(
    """
    import json, os, socket, struct, sys
    from hv.proc import die_with_parent
    die_with_parent()
    from hv import wire as W
    from hv.abi import HvStatus
    from hv.client import HypercallClient
    from hv.wire import FrameKind
    from hv.partition_memory import GuestMemoryView
    from hv.synic import SynicGuest

    sock_fd, page_fd, irq_fd, eom_fd = map(int, sys.argv[1:5])
    sock = socket.socket(fileno=sock_fd)
    hc = HypercallClient(sock, timeout=5.0)
    out = {}

    # its memory arrives as a MEMORY frame with a memfd
    (frame,) = hc.poll(5.0)
    mem_fd = os.dup(frame.fds[0])
    view = GuestMemoryView()
    view.apply_frame(frame)
    out["visible"] = view.visible_bytes
    for fd in (mem_fd, page_fd):
        try:
            os.ftruncate(fd, 0)
            out.setdefault("truncated", []).append(fd)
        except PermissionError:
            out.setdefault("truncate_refused", 0)
            out["truncate_refused"] += 1
    os.close(mem_fd)
    def targets():
        for f in os.listdir("/proc/self/fd"):
            try:
                yield os.readlink(f"/proc/self/fd/{f}")
            except OSError:  # the fd listdir itself used
                pass
    out["foreign_memfds"] = [t for t in targets() if "viridian-mem-" in t and "rogue" not in t]
    syn = SynicGuest(page_fd, irq_fd, eom_fd)

    s = lambda x: int(x)
    out["post_root_conn"] = s(hc.post_message(1, 1, b"evil"))          # child1's connection
    out["post_child1"] = s(hc.post_message(0x101, 1, b"evil"))         # root -> child1 only
    out["post_unknown"] = s(hc.post_message(0x777, 1, b"evil"))
    out["post_bad_type"] = s(hc.post_message(0x30, 0x80000001, b"x"))   # hypervisor type
    out["signal_child1s"] = s(hc.signal_event(0x10, 0))                 # child1's event
    out["signal_own"] = s(hc.signal_event(0x20, 0))                     # its own: allowed
    out["signal_own_bad_flag"] = s(hc.signal_event(0x20, 1))
    out["share_not_owned"] = s(hc.share_pages([0, 1 << 40])[0])
    out["share_beyond"] = s(hc.share_pages([255, 256])[0])              # 1 MiB = 256 pages
    out["share_twice"] = s(hc.share_pages([3, 3])[0])
    out["bad_input"] = s(hc.call(0x5C, b"short")[0])
    out["bad_code"] = s(hc.call(0x4242, b"")[0])
    # a hypercall frame carrying an fd: the supervisor must not keep it
    ev = os.eventfd(0)
    body = struct.pack("<Q", W.encode_control(0x5D)) + W.encode_signal_event(0x10, 0)
    W.send_frame(sock, W.Frame(FrameKind.HYPERCALL, 999, body, [ev]))
    while True:
        got = [f for f in hc.poll(5.0) if f.kind == FrameKind.REPLY and f.seq == 999]
        if got:
            out["with_fd"] = int(W.result_status(int.from_bytes(got[0].body[:8], "little")))
            break
    os.close(ev)
    # garbage on its hypercall channel: a frame with a 2 GiB length
    sock.send(b"\\xff\\xff\\xff\\x7f" + bytes(12))
    try:
        hc.post_message(0x30, 1, b"after garbage")
        out["after_garbage"] = "answered"
    except ConnectionError:  # EOF or EPIPE: the supervisor dropped it
        out["after_garbage"] = "disconnected"
    except TimeoutError:
        out["after_garbage"] = "timeout"
    print(json.dumps(out), flush=True)
    syn.close()
    view.close()
    """
)


class MiniSupervisor:
    """The routing part of a supervisor: one socket per partition, a
    selector, the router; replies and outbox frames sent back."""

    def __init__(self, router: HypercallRouter) -> None:
        self.router = router
        self.sel = selectors.DefaultSelector()
        self.dropped: list[tuple[int, str]] = []

    def add(self, pid_: int, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, (pid_, FrameDecoder()))

    def run_until(self, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, "timed out"
            for key, _ in self.sel.select(min(left, 0.5)):
                pid_, dec = key.data
                sock = key.fileobj
                try:
                    frames = W.recv_frames(sock, dec)
                except BlockingIOError:
                    continue
                except WireError as e:  # a broken partition: drop its connection, carry on
                    self.dropped.append((pid_, str(e)))
                    self.sel.unregister(sock)
                    sock.close()
                    continue
                if frames is None:
                    self.sel.unregister(sock)
                    sock.close()
                    continue
                for f in frames:
                    reply = self.router.handle_frame(pid_, f)
                    if reply is not None:
                        sock.setblocking(True)
                        W.send_frame(sock, reply)
                        sock.setblocking(False)

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.multiprocess
def test_rogue_partition_gets_statuses_and_nothing_else():
    router = HypercallRouter(root_id=ROOT)
    root_syn, child1_syn, rogue_syn = SynicHost(ROOT), SynicHost(CHILD1), SynicHost(ROGUE)
    mem1 = GuestMemory(CHILD1, 1 * MiB, name="child1")
    memr = GuestMemory(ROGUE, 1 * MiB, name="rogue")
    root_guest = SynicGuest(*(os.dup(fd) for fd in root_syn.handles()))
    child1_guest = SynicGuest(*(os.dup(fd) for fd in child1_syn.handles()))
    router.add_partition(ROOT, root_syn)
    router.add_partition(CHILD1, child1_syn, memory=mem1)
    router.add_partition(ROGUE, rogue_syn, memory=memr)
    msg, ev = ConnectionKind.MESSAGE, ConnectionKind.EVENT
    router.add_connection(Connection(1, ROOT, msg, {CHILD1}))
    router.add_connection(Connection(0x30, ROOT, msg, {ROGUE}))
    router.add_connection(Connection(0x10, ROOT, ev, {CHILD1}, flag_base=5))
    router.add_connection(Connection(0x20, ROOT, ev, {ROGUE}, flag_base=6))
    router.add_connection(Connection(0x101, CHILD1, msg, {ROOT}))
    sup = MiniSupervisor(router)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = None
    try:
        W.send_frame(mine, memr.map_message().frame())  # its memory, before it starts
        fds = (theirs.fileno(), *rogue_syn.handles())
        proc = subprocess.Popen(
            [sys.executable, "-c", ROGUE_SCRIPT, *(str(f) for f in fds)],
            pass_fds=fds,
            stdout=subprocess.PIPE,
            text=True,
        )
        theirs.close()
        sup.add(ROGUE, mine)
        fds_before = open_fds()
        sup.run_until(lambda: sup.dropped or proc.poll() is not None, timeout=30)
        out = json.loads(proc.communicate(timeout=30)[0])
        fds_after = open_fds()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        sup.close()

    S = HvStatus
    assert out["visible"] == 1 * MiB
    assert out["truncate_refused"] == 2 and "truncated" not in out
    assert out["foreign_memfds"] == []
    assert out["post_root_conn"] == S.INVALID_CONNECTION_ID
    assert out["post_child1"] == S.INVALID_CONNECTION_ID
    assert out["post_unknown"] == S.INVALID_CONNECTION_ID
    assert out["post_bad_type"] == S.INVALID_PARAMETER
    assert out["signal_child1s"] == S.INVALID_CONNECTION_ID
    assert out["signal_own"] == S.SUCCESS
    assert out["signal_own_bad_flag"] == S.INVALID_PARAMETER
    assert out["share_not_owned"] == S.ACCESS_DENIED
    assert out["share_beyond"] == S.ACCESS_DENIED
    assert out["share_twice"] == S.INVALID_PARAMETER
    assert out["bad_input"] == S.INVALID_HYPERCALL_INPUT
    assert out["bad_code"] == S.INVALID_HYPERCALL_CODE
    assert out["with_fd"] == S.INVALID_CONNECTION_ID
    assert out["after_garbage"] == "disconnected"
    assert [p for p, _ in sup.dropped] == [ROGUE]

    # ... and nothing else happened
    assert root_guest.read_message() is None  # no message delivered to the root
    assert child1_guest.read_message() is None  # nor to child1
    assert root_guest.take_events() == [6]  # only the rogue's own flag; child1's (5) untouched
    assert child1_guest.take_events() == []
    assert router.take_outbox() == []  # no grant went to the root
    assert mem1.grants == {} and memr.grants == {}
    assert fds_after <= fds_before  # the fd it passed was not kept
    assert router.denied(ROGUE) >= 6

    # the supervisor carries on: child1's legitimate traffic still flows
    assert router.post_message(CHILD1, 1, 1, b"hello root") == S.SUCCESS
    assert router.signal_event(CHILD1, 0x10) == S.SUCCESS
    m = root_guest.read_message()
    assert (m.payload, m.origination_id) == (b"hello root", CHILD1)
    assert root_guest.take_events() == [5]
    st, gid = router.share_pages(CHILD1, [0, 1])
    assert st == S.SUCCESS and gid
    ((to, _frame),) = router.take_outbox()
    assert to == ROOT
    for obj in (root_guest, child1_guest, root_syn, child1_syn, rogue_syn, mem1, memr):
        obj.close()


@pytest.mark.multiprocess
def test_rogue_flooding_its_own_synic_only_hurts_itself():
    """A partition that never consumes (or fakes an occupied slot) makes
    posts to it fail with INSUFFICIENT_BUFFERS; others are unaffected."""
    router = HypercallRouter(root_id=ROOT)
    syn = {p: SynicHost(p) for p in (ROOT, CHILD1, ROGUE)}
    guests = {p: SynicGuest(*(os.dup(fd) for fd in syn[p].handles())) for p in (CHILD1, ROGUE)}
    try:
        for p, s in syn.items():
            router.add_partition(p, s)
        router.add_connection(Connection(0x100 + ROGUE, ROGUE, ConnectionKind.MESSAGE, {ROOT}))
        router.add_connection(Connection(0x100 + CHILD1, CHILD1, ConnectionKind.MESSAGE, {ROOT}))
        # the rogue writes a fake MessageType into its free VMBus slot and never clears it
        with open(f"/proc/self/fd/{syn[ROGUE].handles().page_fd}", "r+b") as f:
            f.seek(2 * 256)
            f.write(b"\x01\x00\x00\x00")
        statuses = [router.post_message(ROOT, 0x100 + ROGUE, 1, b"%d" % i) for i in range(20)]
        assert statuses.count(HvStatus.SUCCESS) == 16
        assert statuses[16:] == [HvStatus.INSUFFICIENT_BUFFERS] * 4
        for i in range(16):  # child1 is served normally meanwhile
            assert router.post_message(ROOT, 0x100 + CHILD1, 1, b"%d" % i) == HvStatus.SUCCESS
            assert guests[CHILD1].read_message().payload == b"%d" % i
    finally:
        for g in guests.values():
            g.close()
        for s in syn.values():
            s.close()
