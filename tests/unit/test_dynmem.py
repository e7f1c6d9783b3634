"""Dynamic Memory in one process: the DM VSP and VSC over a real channel, a
real ``GuestMemory`` behind a stand-in for the supervisor, and the balancer.

The multi-process path is tests/integration/test_dynamic_memory.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_memory import deliver  # a MEMORY frame over a socketpair

from hv.abi import HvStatus
from hv.memory import GuestMemory, MemoryLimitError
from hv.memwire import GuestMemoryError
from hv.partition_memory import GuestMemoryView
from partitions.devices.dynmem import protocol as D
from partitions.devices.dynmem.balancer import BLOCK_BYTES, ChildMemory, plan
from partitions.devices.dynmem.device import DmVsc, DmVsp
from partitions.devices.framework import DeviceResources
from partitions.guestmem import PageAllocator

MiB = 1 << 20
PAGE = 4096


class FakeSupervisor:
    """The root's hypercalls on one child's real GuestMemory (the router's
    checks, without the wire); MAP / BALLOON frames go to the child's view."""

    def __init__(self, mem: GuestMemory, view: GuestMemoryView, alloc: Any) -> None:
        self.mem, self.view, self.alloc = mem, view, alloc
        self.deliver_map = True

    def memory_hot_add(self, child: int, nbytes: int):
        try:
            msg = self.mem.hot_add(nbytes, align_bytes=128 * MiB)
        except MemoryLimitError:
            return HvStatus.OPERATION_DENIED, 0, 0
        if self.deliver_map:
            deliver(msg, self.view)
        return HvStatus.SUCCESS, msg.segments[0].gpa_pfn, msg.segments[0].npages

    def memory_balloon(self, child: int, ranges):
        try:
            msg = self.mem.balloon(ranges)
        except MemoryLimitError:
            return HvStatus.OPERATION_DENIED, 0
        except GuestMemoryError:
            return HvStatus.ACCESS_DENIED, 0
        deliver(msg, self.view)
        for p, n in ranges:
            self.alloc.withdraw(p, n)
        return HvStatus.SUCCESS, sum(n for _, n in ranges)

    def memory_unballoon(self, child: int, max_pages: int):
        rr = self.mem.ballooned_runs(max_pages, 510)
        if rr:
            deliver(self.mem.unballoon(rr), self.view)
        return HvStatus.SUCCESS, rr


class FakePartition:
    def __init__(self) -> None:
        self.timers: list[tuple[float, Any]] = []
        self.sent: list[dict] = []
        self.hv: Any = None
        self.memory: Any = None
        self.vmbus: Any = None
        self.features: dict[str, Any] = {}

    def call_later(self, delay: float, fn: Any) -> None:
        self.timers.append((delay, fn))

    def send(self, obj: dict) -> None:
        self.sent.append(obj)

    def pump_link(self) -> None:
        pass


class Rig:
    """A child with 64 MiB (max 512 MiB, min 32 MiB) and its DM channel to the root."""

    def __init__(self) -> None:
        from test_channel import Pair

        self.mem = GuestMemory(1, 64 * MiB, minimum_bytes=32 * MiB, maximum_bytes=512 * MiB,
                               name="child1")
        self.view = GuestMemoryView()
        deliver(self.mem.map_message(), self.view)
        self.alloc = PageAllocator(self.view)
        self.pair = Pair(8, 8)
        self.child_rt = FakePartition()
        self.child_rt.memory = self.view
        self.child_rt.vmbus = type("Bus", (), {"alloc": self.alloc})()
        self.root_rt = FakePartition()
        self.sup = FakeSupervisor(self.mem, self.view, self.alloc)
        self.root_rt.hv = self.sup
        ud = DmVsc.open_userdata({})
        self.vsp = DmVsp(self.pair.root, {}, child=1, userdata=ud, resources=DeviceResources(
            hypercalls=self.sup, call_later=self.root_rt.call_later))
        self.vsc = DmVsc(self.pair.child, {}, resources=DeviceResources(
            memory=self.alloc, call_later=self.child_rt.call_later,
            pump_link=self.child_rt.pump_link, notify=self.child_rt.send))
        self.vsc.on_open()
        self.pump()

    def pump(self, rounds: int = 6) -> None:
        for _ in range(rounds):
            self.vsp.service()
            self.vsc.service()

    def close(self) -> None:
        self.pair.close()
        self.view.close()
        self.mem.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_negotiation_and_pressure_reports(rig):
    assert rig.vsp.ready and rig.vsp.version == D.DmVersion.WIN10
    assert rig.vsc.state == "ready"
    used = rig.alloc.alloc(1000)
    rig.vsc._report_now()
    rig.pump()
    assert rig.vsp.committed_pages == rig.alloc.used_pages == 1000
    assert rig.vsp.avail_pages == rig.alloc.free_pages
    rig.alloc.free(used)


def test_hot_add_is_usable_at_once_and_data_survives(rig):
    a = rig.alloc
    old = a.alloc(a.free_pages)  # the child filled its memory
    mv = a.view_of(old, 1)
    mv[:4] = b"old!"
    results = []
    rig.vsp.hot_add(128 * MiB, results.append)
    rig.pump()
    assert results and results[0]["ok"] and results[0]["pages"] == 32768
    new = a.alloc(32768)  # all of it, right away
    nv = a.view_of(new, 32768)
    nv[-4:] = b"new!"
    assert bytes(mv[:4]) == b"old!" and bytes(nv[-4:]) == b"new!"
    assert rig.mem.assigned_bytes == 192 * MiB
    assert rig.vsc.hot_adds == 1 and rig.vsc.last_hot_add_ms is not None
    mv.release()
    nv.release()


def test_hot_add_above_the_maximum_says_why(rig):
    results = []
    rig.vsp.hot_add(1024 * MiB, results.append)
    assert results == [{"ok": False, "error": results[0]["error"], "action": "hot-add",
                        "ms": results[0]["ms"]}]
    assert "above the maximum" in results[0]["error"]
    assert rig.mem.assigned_bytes == 64 * MiB and not rig.vsp.busy


def test_a_guest_that_cannot_see_the_pages_refuses_and_the_host_takes_them_back(rig):
    rig.sup.deliver_map = False  # the MAP frame never reaches the child
    results = []
    rig.vsp.hot_add(128 * MiB, results.append)
    rig.view.close()  # (the child's view must not be asked to balloon a range it lacks)
    rig.sup.view = type("Null", (), {"apply_frame": lambda self, f: f.close_fds()})()
    rig.pump()
    assert not results[0]["ok"] and "the guest refused" in results[0]["error"]
    assert rig.mem.assigned_bytes == 64 * MiB  # exact: the unaccepted range went back


def test_balloon_returns_the_highest_free_pages(rig):
    results = []
    rig.vsp.balloon(16 * MiB, results.append)
    rig.pump()
    assert results[0]["ok"] and results[0]["pages"] == 4096
    assert rig.mem.assigned_bytes == 48 * MiB and rig.mem.ballooned_bytes == 16 * MiB
    assert rig.alloc.ballooned_pages == 4096
    # unballoon gives them back to the allocator
    results.clear()
    rig.vsp.unballoon(8 * MiB, results.append)
    rig.pump()
    assert results[0]["ok"] and results[0]["pages"] == 2048
    assert rig.alloc.ballooned_pages == 2048 and rig.mem.assigned_bytes == 56 * MiB


def test_an_unballoon_the_child_never_hears_of_goes_back_to_the_host(rig, monkeypatch):
    results: list[dict] = []
    rig.vsp.balloon(16 * MiB, results.append)
    rig.pump()
    assert results[0]["ok"] and rig.vsp.ballooned_pages == 4096
    monkeypatch.setattr(rig.vsp, "post", lambda data: False)  # the child stopped reading
    rig.vsp.unballoon(8 * MiB, results.append)
    assert not results[1]["ok"] and "does not read" in results[1]["error"]
    # the supervisor had given 8 MiB back; the host took them again
    assert rig.mem.assigned_bytes == 48 * MiB and rig.mem.ballooned_bytes == 16 * MiB
    assert rig.vsp.ballooned_pages == 4096  # and the root agrees


def test_balloon_never_goes_below_the_minimum(rig):
    results = []
    rig.vsp.balloon(40 * MiB, results.append)  # 64 - 40 < 32
    rig.pump()
    assert not results[0]["ok"] and "below the minimum" in results[0]["error"]
    assert rig.mem.assigned_bytes == 64 * MiB


def test_a_guest_that_names_pages_it_does_not_own_gets_nothing(rig):
    results = []
    rig.vsp.balloon(2 * MiB, results.append)
    # a lying guest: answers with pages outside its memory
    lie = D.BalloonResponse((D.PageRange(1 << 30, 512),))
    rig.pair.child.try_send(lie.encode(rig.vsp.op["tid"]))
    rig.vsp.service()
    assert not results[0]["ok"] and "not its own" in results[0]["error"]
    assert rig.mem.assigned_bytes == 64 * MiB


def test_one_operation_at_a_time_and_timeouts(rig):
    results = []
    rig.vsp.balloon(2 * MiB, results.append)
    rig.vsp.hot_add(128 * MiB, results.append)
    assert not results[0]["ok"] and "already in progress" in results[0]["error"]
    # the guest never answers: the timer fails the operation
    _delay, fire = rig.root_rt.timers[-1]
    fire()
    assert not results[1]["ok"] and "did not answer" in results[1]["error"]


def test_malformed_messages_close_the_channel():
    from partitions.devices.framework import DeviceError

    r = Rig()
    try:
        r.pair.child.try_send(b"\x05\x00\xff\x00" + bytes(4))  # size 255 > payload
        with pytest.raises(DeviceError):
            r.vsp.service()
    finally:
        r.close()


# --- the balancer ---------------------------------------------------------------------------


def child(name="c", visible=256, committed=100, minimum=64, maximum=1024, **kw):
    return ChildMemory(name, visible * MiB, committed * MiB, minimum * MiB, maximum * MiB, **kw)


def test_balancer_adds_a_block_when_demand_plus_buffer_exceeds_memory():
    [a] = plan([child(visible=256, committed=250)], 8 << 30)
    assert (a.op, a.bytes) == ("hot-add", BLOCK_BYTES)


def test_balancer_unballoons_before_hot_adding():
    [a] = plan([child(visible=256, committed=250, ballooned=100 * MiB)], 8 << 30)
    assert a.op == "unballoon" and a.bytes == 44 * MiB  # 250 x 1.2 = 300 wanted - 256


def test_balancer_balloons_surplus_but_not_below_minimum_and_leaves_small_gaps():
    [a] = plan([child(visible=512, committed=10)], 8 << 30)
    assert a.op == "balloon" and a.bytes == 256 * MiB  # one step at most
    [a] = plan([child(visible=160, committed=10)], 8 << 30)
    assert a.op == "balloon" and a.bytes == 96 * MiB  # down to the 64 MiB minimum
    assert plan([child(visible=100, committed=10)], 8 << 30) == []  # 36 MiB over: leave it
    assert plan([child(visible=256, committed=200)], 8 << 30) == []  # 240 wanted: close enough


def test_balancer_respects_maximum_host_memory_and_weight():
    [a] = plan([child(visible=900, committed=1000, maximum=1024)], 8 << 30)
    assert a.op == "hot-add" and a.bytes == 124 * MiB  # up to the maximum only
    # the host can give 14 MiB of the 44 wanted: nothing (no half measures)
    assert plan([child(visible=256, committed=250)], 270 * MiB) == []
    low = child("low", visible=256, committed=250, weight=100)
    high = child("high", visible=256, committed=250, weight=9000)
    acts = plan([low, high], 256 * MiB + BLOCK_BYTES)  # room for one block
    assert [(a.child, a.op) for a in acts] == [("high", "hot-add")]
    assert plan([child(visible=256, committed=250, busy=True)], 8 << 30) == []


# --- a hostile child cannot reach the root or another child ---------------------------------


def _stop_reading(rig: Rig) -> None:
    """The child stops reading its DM channel: the root's ring and backlog fill."""
    while rig.vsp.post(D.InfoMessage.max_page_count(1).encode(0)):
        pass
    assert rig.vsp.backlog


def test_a_child_that_does_not_read_its_channel_gets_refused_not_an_exception(rig):
    _stop_reading(rig)
    results: list[dict] = []
    rig.vsp.hot_add(128 * MiB, results.append)
    rig.vsp.balloon(2 * MiB, results.append)
    rig.vsp.unballoon(2 * MiB, results.append)
    assert [r["ok"] for r in results] == [False, False, False]
    assert all("does not read its dynamic memory channel" in r["error"] for r in results)
    assert rig.mem.assigned_bytes == 64 * MiB and not rig.vsp.busy


class FakeRootRuntime(FakePartition):
    def __init__(self) -> None:
        super().__init__()
        self.logs: list[tuple[str, dict]] = []

    def log(self, event: str, **kw: Any) -> None:
        self.logs.append((event, kw))

    def report_soon(self) -> None:
        pass


def _manager(rig: Rig, **settings: Any) -> Any:
    """The root's MemoryManager over one child (id 1) whose DM VSP is ``rig.vsp``."""
    from types import SimpleNamespace

    from partitions.devices.dynmem.manager import MemoryManager

    rt = FakeRootRuntime()
    rt.hv = rig.sup
    hc = SimpleNamespace(device=SimpleNamespace(name="dynmem"), vsp=rig.vsp)
    host = SimpleNamespace(rt=rt, buses={1: SimpleNamespace(name="child1", channels={1: hc})})
    mem = {"startup": 64 * MiB, "minimum": 32 * MiB, "maximum": 512 * MiB, "dynamic": True,
           **settings}
    mm = MemoryManager(host, [{"id": 1, "name": "child1", "memory": mem}])  # type: ignore[arg-type]
    mm.host_available = lambda: 64 << 30
    rig.vsp.res = DeviceResources(hypercalls=rig.sup, call_later=rt.call_later, service=mm)
    return mm


def test_the_balancer_and_requests_never_raise_for_a_child_that_does_not_read(rig):
    mm = _manager(rig)
    rig.vsp.committed_pages = (400 * MiB) // PAGE  # wants a hot-add
    rig.vsp.reports = 1
    _stop_reading(rig)
    mm.balance()  # (runs inside another child's packet handling: must not raise)
    mm.on_request({"op": "dm", "req": 7, "child": 1, "action": "balloon", "bytes": 2 * MiB})
    sent = [m for m in mm.rt.sent if m.get("op") == "dm.result"]
    assert sent and not sent[0]["ok"] and sent[0]["req"] == 7
    assert "does not read" in sent[0]["error"]
    assert any(e == "balancer hot-add" and not kw["ok"] for e, kw in mm.rt.logs)
    assert rig.mem.assigned_bytes == 64 * MiB and not rig.vsp.busy


def test_an_operation_that_fails_unexpectedly_is_a_result_not_an_exception(rig):
    mm = _manager(rig)

    def broken(child: int, nbytes: int):
        raise RuntimeError("a bug")

    rig.sup.memory_hot_add = broken
    mm.on_request({"op": "dm", "req": 8, "child": 1, "action": "hot-add", "bytes": 128 * MiB})
    [res] = [m for m in mm.rt.sent if m.get("op") == "dm.result"]
    assert not res["ok"] and "RuntimeError" in res["error"]
    assert not rig.vsp.busy  # the next operation may start


def test_a_failing_dm_request_is_logged_and_the_root_goes_on(rig):
    mm = _manager(rig)

    def broken(obj: dict) -> None:
        raise ValueError("from a child's DM VSP")

    mm.on_request = mm.on_settings = broken
    mm.on_frame({"op": "dm", "child": 1}, None)
    mm.on_frame({"op": "dm.settings", "child": 1}, None)
    assert [e for e, _ in mm.rt.logs] == ["dynamic memory request failed"] * 2


def test_pressure_reports_reach_the_supervisor_coalesced(rig):
    from partitions.devices.dynmem.manager import STATUS_EVERY_S

    mm = _manager(rig, dynamic=False)
    rt = mm.rt
    rt.timers.clear()
    for i in range(1000):  # a child flooding STATUS_REPORTs within one service call
        rig.vsp.committed_pages = i
        mm.on_status(rig.vsp)
    assert not [m for m in rt.sent if m.get("op") == "dm.status"]
    assert [d for d, _ in rt.timers] == [STATUS_EVERY_S]
    rt.timers.pop()[1]()
    [st] = [m for m in rt.sent if m.get("op") == "dm.status"]
    assert st["child"] == 1 and st["committed_bytes"] == 999 * PAGE  # the latest values
    mm.on_status(rig.vsp)  # the next interval: one more
    assert len(rt.timers) == 1


@pytest.mark.parametrize("again", [D.VersionRequest(D.DmVersion.WIN10), D.CapabilitiesReport()])
def test_negotiating_again_once_ready_closes_the_channel(again):
    from partitions.devices.framework import DeviceError

    r = Rig()
    try:
        assert r.vsp.ready
        r.pair.child.try_send(again.encode(99))
        with pytest.raises(DeviceError, match="after dynamic memory was negotiated"):
            r.vsp.service()
    finally:
        r.close()


def test_a_balloon_that_fails_halfway_counts_what_the_host_took(rig):
    calls = []
    real = rig.sup.memory_balloon

    def second_call_fails(child: int, ranges):
        calls.append(len(ranges))
        return real(child, ranges) if len(calls) == 1 else (HvStatus.ACCESS_DENIED, 0)

    rig.sup.memory_balloon = second_call_fails
    results: list[dict] = []
    rig.vsp.balloon(600 * PAGE, results.append)
    # the guest names 600 single pages: more than one supervisor call's worth
    pages = [D.PageRange(2 + 2 * i, 1) for i in range(600)]
    tid = rig.vsp.op["tid"]
    rig.pair.child.try_send(D.BalloonResponse(tuple(pages[:500]), more_pages=True).encode(tid))
    rig.pair.child.try_send(D.BalloonResponse(tuple(pages[500:])).encode(tid))
    rig.vsp.service()
    assert calls == [510, 90]
    assert not results[0]["ok"] and results[0]["pages"] == 510
    assert rig.vsp.ballooned_pages == 510 == rig.mem.ballooned_bytes // PAGE


def test_a_hot_add_the_guest_never_answers_still_counts_the_mapped_range(rig):
    results: list[dict] = []
    rig.vsp.hot_add(128 * MiB, results.append)
    assert rig.mem.assigned_bytes == 192 * MiB  # the supervisor mapped it
    _delay, fire = rig.root_rt.timers[-1]
    fire()  # the guest did not answer in time
    assert not results[0]["ok"] and "did not answer" in results[0]["error"]
    assert rig.vsp.hot_added_pages * PAGE == 128 * MiB  # the root agrees with the supervisor


@pytest.mark.parametrize("stop_first", [False, True])
def test_starting_bursts_again_leaves_one_tick_loop(rig, stop_first):
    timers = rig.child_rt.timers
    args = {"peak_mb": 8, "step_mb": 2, "period_s": 0.5}
    rig.vsc.workload("bursts", args)
    if stop_first:
        rig.vsc.workload("stop", {})
    rig.vsc.workload("bursts", args)  # within one period
    for _ in range(3):  # three periods: each pending tick fires
        pending = [fn for d, fn in timers if d == 0.5]
        timers[:] = [(d, fn) for d, fn in timers if d != 0.5]
        for fn in pending:
            fn()
        assert len([d for d, _ in timers if d == 0.5]) == 1  # one loop
    assert sum(n for _, n in rig.vsc.workload_pages) == 8 * MiB // PAGE  # the peak
    rig.vsc.workload("stop", {})


def test_a_hot_add_the_host_cannot_take_back_stays_counted_as_the_childs(rig, monkeypatch):
    """The child never heard of the range (its ring is full) and the supervisor
    refuses to take it back: it stays mapped in the child, so it is counted."""
    monkeypatch.setattr(rig.vsp, "post", lambda data: False)  # the child stopped reading
    monkeypatch.setattr(rig.sup, "memory_balloon",
                        lambda child, ranges: (HvStatus.ACCESS_DENIED, 0))
    results: list[dict] = []
    rig.vsp.hot_add(128 * MiB, results.append)
    assert not results[0]["ok"]
    assert rig.mem.assigned_bytes == 192 * MiB  # still mapped
    assert rig.vsp.hot_added_pages * PAGE == 128 * MiB  # and the root agrees
