"""Port intercepts: child -> supervisor -> worker and back, over real shared
pages and eventfds, with each party in its own thread (the processes of the
real thing are tests/integration/test_storage.py)."""

from __future__ import annotations

import os
import select
import threading

import pytest

from hv.intercept import IN, OUT
from hv.intercept.client import InterceptClient
from hv.intercept.route import InterceptRoute
from hv.intercept.server import InterceptServer


class Rig:
    def __init__(self, attached: bool = True) -> None:
        self.route = InterceptRoute(ports=[(0x1F0, 8)])
        self.route.worker_attached = attached
        self.client = InterceptClient(*[os.dup(fd) for fd in self.route.child_handles()],
                                      timeout=5.0)
        self.server = InterceptServer(*[os.dup(fd) for fd in self.route.worker_handles()])
        self.stop = threading.Event()
        self.regs: dict[int, int] = {}
        self.threads = [threading.Thread(target=self._supervisor, daemon=True),
                        threading.Thread(target=self._worker, daemon=True)]
        for t in self.threads:
            t.start()

    def _supervisor(self) -> None:
        p = select.poll()
        for fd in self.route.fds():
            p.register(fd, select.POLLIN)
        while not self.stop.is_set():
            for fd, _ in p.poll(50):
                (self.route.on_exit if fd == self.route.child_exit_fd else self.route.on_done)()

    def _worker(self) -> None:
        def handler(op: int, port: int, size: int, value: int) -> tuple[int, bool]:
            if op == OUT:
                self.regs[port] = value
                return 0, port == 0x1F7  # a "command" raises the interrupt
            return self.regs.get(port, 0) + 1, False

        while not self.stop.is_set():
            if self.server.wait(0.05):
                self.server.serve_one(handler)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.client.close()
        self.server.close()
        self.route.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_accesses_are_forwarded_and_answered_in_order(rig):
    for i in range(200):
        rig.client.outw(0x1F0, i)
        assert rig.client.inw(0x1F0) == i + 1
    assert rig.client.traps == 400 and rig.route.forwarded == 400 and rig.server.served == 400


def test_sizes_mask_values_and_interrupts_count(rig):
    rig.client.outb(0x1F2, 0x1FF)
    assert rig.regs[0x1F2] == 0xFF
    assert rig.client.irqs == 0
    rig.client.outb(0x1F7, 0x20)
    assert rig.client.irqs == 1


def test_ports_of_no_device_float_without_bothering_the_worker(rig):
    assert rig.client.inb(0x60) == 0xFF
    assert rig.client.inl(0x170) == 0xFFFFFFFF
    rig.client.outb(0x80, 1)
    assert rig.route.unclaimed == 3 and rig.route.forwarded == 0 and rig.server.served == 0


def test_without_a_worker_the_device_is_absent():
    r = Rig(attached=False)
    try:
        assert r.client.inw(0x1F0) == 0xFFFF
        assert r.route.forwarded == 0
    finally:
        r.close()


def test_a_worker_that_goes_away_answers_pending_as_no_device():
    route = InterceptRoute(ports=[(0x1F0, 8)])
    route.worker_attached = True
    client = InterceptClient(*[os.dup(fd) for fd in route.child_handles()], timeout=5.0)
    t = threading.Thread(target=lambda: setattr(t, "result", client.inb(0x1F7)))
    t.start()
    assert route.child.wait(0, 1, route.child_exit_fd, 5.0)  # the child trapped
    route.on_exit()
    assert route.forwarded == 1
    route.worker_gone()  # the root died: nobody will answer
    t.join(5)
    assert t.result == 0xFF  # type: ignore[attr-defined]
    client.close()
    route.close()


def test_nobody_answering_is_a_timeout():
    route = InterceptRoute(ports=[(0x1F0, 8)])
    client = InterceptClient(*[os.dup(fd) for fd in route.child_handles()], timeout=0.2)
    with pytest.raises(TimeoutError):
        client.inb(0x1F7)
    client.close()
    route.close()


def test_a_bad_request_is_answered_as_no_device():
    from hv.intercept import OP, PORT, REQ, SIZE

    route = InterceptRoute(ports=[(0x1F0, 8)])
    route.worker_attached = True
    w = route.child.w
    for op, port, size in ((7, 0x1F0, 1), (IN, 0x1F0, 3), (IN, 0x10000, 1)):
        seq = (w.load(REQ) + 1) & 0xFFFFFFFF
        w.store(OP, op)
        w.store(PORT, port)
        w.store(SIZE, size)
        w.store(REQ, seq)
        route.on_exit()
        assert route.child.w.load(4) == seq  # answered at once
    assert route.forwarded == 0 and route.unclaimed == 3
    route.close()


def test_the_childs_page_cannot_be_truncated_under_the_supervisor():
    route = InterceptRoute(ports=[(0x1F0, 8)])
    try:
        fd = route.child_handles()[0]  # the slot page the child gets
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # (sealed: a SIGBUS in the supervisor otherwise)
        assert os.fstat(fd).st_size == 4096
    finally:
        route.close()


def test_the_root_claims_the_ports_and_nothing_malformed():
    route = InterceptRoute()
    try:
        assert route.ports == []
        for bad in (None, "0x1F0", [[0x1F0]], [[0x1F0, 0]], [[-1, 2]], [[0xFFFF, 2]],
                    [[True, 8]], [[0x1F0, 8.0]], [[0, 1]] * 17):
            assert not route.claim(bad)
            assert route.ports == []
        assert route.claim([[0x1F0, 8], [0x3F6, 1]])
        assert route.ports == [(0x1F0, 8), (0x3F6, 1)]
        assert 0x1F7 in route._claimed and 0x3F6 in route._claimed and 0x1F8 not in route._claimed
    finally:
        route.close()
