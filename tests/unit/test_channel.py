"""Channels and the device framework, in one process: both ends of a channel
over one buffer, with real eventfd doorbells (what the supervisor hands out).

The multi-process path (GPADL, grants, doorbells from the supervisor) is
tests/integration/test_channels.py.
"""

from __future__ import annotations

import os

import pytest

from partitions.devices.echo.device import MODE_SINK, EchoVsc, EchoVsp
from partitions.devices.framework import DeviceClass, DeviceError, Vsc, Vsp, register
from vmbus.channel import Channel, init_channel_buffer, split_channel_buffer
from vmbus.doorbell import Doorbell
from vmbus.packet import PacketType

PAGE = 4096


class Pair:
    """A child end and a root end of one channel over one buffer."""

    def __init__(self, send_pages: int = 4, recv_pages: int = 4) -> None:
        self.buf = bytearray((send_pages + recv_pages) * PAGE)
        init_channel_buffer(self.buf, send_pages)
        to_root = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        to_child = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # each end owns its own copies, as each process does
        self.child = Channel(self.buf, send_pages, host=False, own_doorbell=Doorbell(to_child),
                             peer_doorbell=Doorbell(to_root), relid=1)
        self.root = Channel(self.buf, send_pages, host=True,
                            own_doorbell=Doorbell(os.dup(to_root)),
                            peer_doorbell=Doorbell(os.dup(to_child)), relid=1)

    def close(self) -> None:
        self.child.close()
        self.root.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def test_layout_rules_are_qemus():
    buf = bytearray(8 * PAGE)
    for off in (0, 1, 7, 8):
        with pytest.raises(ValueError):
            split_channel_buffer(buf, off)
    with pytest.raises(ValueError):
        split_channel_buffer(bytearray(8 * PAGE + 1), 4)
    out, inb = split_channel_buffer(buf, 3)
    assert (out.nbytes, inb.nbytes) == (3 * PAGE, 5 * PAGE)


def test_child_writes_the_first_ring_root_the_second(pair):
    assert pair.child.try_send(b"up".ljust(8, b"."), trans_id=5, completion_requested=True)
    assert pair.root.try_send(b"down".ljust(8, b"."), trans_id=6)
    # the child's packet sits in pages [0, 4), the root's in [4, 8)
    assert bytes(pair.buf[PAGE : 2 * PAGE]).find(b"up") >= 0
    assert bytes(pair.buf[5 * PAGE : 6 * PAGE]).find(b"down") >= 0
    p = pair.root.try_recv()
    assert (p.payload, p.trans_id, p.completion_requested) == (b"up......", 5, True)
    q = pair.child.try_recv()
    assert (q.payload, q.trans_id, q.completion_requested) == (b"down....", 6, False)


def test_payloads_are_padded_to_eight_bytes_as_on_the_wire(pair):
    # VMBus carries no exact payload length: a reader gets offset8*8..len8*8
    # (spec §2.1); protocols above carry their own lengths.
    pair.child.try_send(b"abc")
    assert pair.root.try_recv().payload == b"abc\0\0\0\0\0"


def test_first_packet_rings_the_peers_doorbell_once(pair):
    assert not pair.root.doorbell.clear()
    pair.child.try_send(b"a")
    pair.child.try_send(b"b")  # not empty -> non-empty: no second signal
    assert pair.root.doorbell.clear()
    assert not pair.root.doorbell.clear()
    s = pair.child.stats()
    assert (s["packets_out"], s["signals_sent"], s["signals_suppressed"]) == (2, 1, 1)
    assert s["out_ring_fill"] > 0 and s["in_ring_fill"] == 0.0


def test_exchange_sends_then_returns_the_peers_next_packet(pair):
    assert pair.root.try_send(b"answer")  # (already there: one process plays both ends)
    assert pair.child.exchange(b"request", 1.0) == b"answer\0\0"
    assert pair.root.try_recv().payload == b"request\0"
    assert pair.root.doorbell.clear()  # the request woke the root
    assert pair.child.exchange(b"again", 0.01, spin_ns=0) is None  # no answer: timeout
    assert pair.root.try_recv().payload == b"again\0\0\0"


def test_stats_have_the_status_keys(pair):
    keys = {"packets_in", "packets_out", "bytes_in", "bytes_out", "out_ring_fill",
            "in_ring_fill", "signals_sent", "signals_suppressed"}
    assert keys <= set(pair.root.stats())


def test_close_closes_both_doorbells_and_is_idempotent():
    p = Pair()
    fds = [p.child.doorbell.fileno(), p.child.peer_doorbell.fileno()]
    p.child.close()
    p.child.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    p.root.close()


# --- the device framework over a channel ---------------------------------------------


def _echo_pair(mode: int = 0, send_pages: int = 4, recv_pages: int = 4):
    p = Pair(send_pages, recv_pages)
    ud = EchoVsc.open_userdata({"mode": "sink" if mode == MODE_SINK else "echo"})
    vsp = EchoVsp(p.root, {}, child=1, userdata=ud)
    assert vsp.accept() == 0
    vsc = EchoVsc(p.child, {"mode": "sink" if mode == MODE_SINK else "echo"})
    return p, vsp, vsc


def test_request_is_echoed_and_matched_by_trans_id():
    p, vsp, vsc = _echo_pair()
    got = []
    t1 = vsc.request(b"one.....", got.append)
    t2 = vsc.request(b"two.....", got.append)
    assert t1 != t2 and vsc.in_flight == 2
    vsp.service()
    vsc.service()
    assert [(g.trans_id, g.payload, g.packet_type) for g in got] == [
        (t1, b"one.....", PacketType.COMP), (t2, b"two.....", PacketType.COMP)]
    assert vsc.in_flight == 0 and vsp.echoed == 2
    p.close()


def test_echo_refuses_bad_userdata():
    p = Pair()
    for ud in (bytes(120), b"viridian-echo\0\x07".ljust(120, b"\0"),
               b"viridian-echo\0\x00junk".ljust(120, b"\0")):
        assert EchoVsp(p.root, {}, child=1, userdata=ud).accept() != 0
    with pytest.raises(ValueError):
        EchoVsc.open_userdata({"mode": "loud"})
    p.close()


def test_sink_mode_counts_without_answering():
    p, vsp, _vsc = _echo_pair(MODE_SINK)
    assert p.child.outgoing.write_many([b"x" * 64] * 100) == 100
    vsp.service()
    assert vsp.dropped == 100 and vsp.echoed == 0
    assert p.child.try_recv() is None
    p.close()


def test_echo_vsp_rejects_a_non_inband_packet():
    p, vsp, _vsc = _echo_pair()
    p.child.try_send(b"", packet_type=PacketType.COMP, trans_id=9)
    with pytest.raises(DeviceError):
        vsp.service()
    p.close()


def test_full_ring_is_backpressure_then_on_writable():
    p, vsp, vsc = _echo_pair(send_pages=2)  # one data page child -> root
    woken = []
    vsc.on_writable = lambda: woken.append(True)  # type: ignore[method-assign]
    n = 0
    while vsc.send(b"z" * 200):
        n += 1
    assert 0 < n < 4096 // 200
    assert not vsc.send(b"z" * 200)
    p.child.doorbell.clear()
    vsp.service()  # drains; pending_send_sz was crossed: the child is rung
    assert p.child.doorbell.clear()
    p.child.doorbell.signal()
    vsc.service()
    assert woken == [True]
    p.close()


def test_vsp_backlog_stops_reading_until_the_child_reads():
    # completions do not fit the small root -> child ring: the VSP queues
    # them and reads no more requests until the child makes room
    p, vsp, vsc = _echo_pair(send_pages=16, recv_pages=2)
    done = []
    for _ in range(30):
        assert vsc.request(b"q" * 504, done.append) is not None
    vsp.service()
    assert vsp.backlog > 0
    for _ in range(5):  # more requests arrive while completions are queued
        assert vsc.request(b"q" * 504, done.append) is not None
    left = p.root.incoming.bytes_readable()
    vsp.service()  # the backlog cannot move: nothing is read (backpressure)
    assert left > 0 and p.root.incoming.bytes_readable() == left
    for _ in range(40):
        vsc.service()
        vsp.service()
        if len(done) == 35:
            break
    assert len(done) == 35 and vsp.backlog == 0
    assert all(d.payload == b"q" * 504 for d in done)
    p.close()


def test_post_queues_in_order_behind_a_full_ring():
    p = Pair(send_pages=2)
    vsc = Vsc(p.child, {})
    vsp = Vsp(p.root, {})
    seen: list[bytes] = []
    vsp.on_packet = lambda pkt: seen.append(pkt.payload)  # type: ignore[method-assign]
    msgs = [bytes([i + 1]) * 304 for i in range(30)]
    for m in msgs:
        assert vsc.post(m)
    assert vsc.backlog > 0
    for _ in range(60):
        vsp.service()
        vsc.service()
        if len(seen) == 30:
            break
    assert seen == msgs
    p.close()


def test_register_refuses_a_second_device_with_the_same_class():
    from partitions.devices.echo.device import ECHO, ECHO_CLASS_ID

    assert register(ECHO) is ECHO  # idempotent for the same object
    with pytest.raises(ValueError):
        register(DeviceClass("echo2", ECHO_CLASS_ID, Vsp, Vsc))
    with pytest.raises(ValueError):
        DeviceClass("tiny", ECHO_CLASS_ID, Vsp, Vsc, send_ring_pages=1)


def test_device_spec_parses_config_entries():
    from partitions.devices import device_spec

    assert device_spec("echo") == ("echo", {})
    assert device_spec({"type": "echo", "mode": "sink"}) == ("echo", {"mode": "sink"})
    for bad in ("nope", {"mode": "sink"}, 3):
        with pytest.raises(ValueError):
            device_spec(bad)


def test_the_documented_device_example_works():
    """docs/channels.md's "Writing a device" example, run as written."""
    import re
    from pathlib import Path

    from partitions.devices.framework import DEVICES

    doc = (Path(__file__).resolve().parents[2] / "docs" / "channels.md").read_text()
    code = re.search(r"## Writing a device.*?```python\n(.*?)```", doc, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "docs/channels.md", "exec"), ns)
    try:
        dc = DEVICES["upper"]
        p = Pair(dc.send_ring_pages, dc.recv_ring_pages)
        logged = []
        vsp = dc.vsp(p.root, {}, child=1)
        vsc = dc.vsc(p.child, {}, lambda ev, **kw: logged.append((ev, kw)))
        vsc.on_open()
        vsp.service()
        vsc.service()
        assert logged == [("upper", {"reply": "HELLO"})]
        p.child.try_send(b"no reply wanted")
        with pytest.raises(DeviceError):
            vsp.service()
        p.close()
    finally:
        DEVICES.pop("upper", None)
