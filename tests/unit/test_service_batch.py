"""``Endpoint.service``'s data path: the batch handed over as it was drained,
and the short poll of the ring after a call that read packets (the channel
benchmark's findings, benchmarks/bench_channels.py)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from partitions.devices import framework as base
from partitions.devices.framework import Vsp
from vmbus.channel import Channel, init_channel_buffer
from vmbus.doorbell import Doorbell
from vmbus.packet import PacketType
from vmbus.ring import PacketBatch

PAGE = 4096


class Recorder(Vsp):
    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.batches: list[Any] = []

    def on_packets(self, pkts: Any) -> None:
        self.batches.append(pkts)


@pytest.fixture
def ends():
    buf = bytearray(8 * PAGE)
    init_channel_buffer(buf, 4)
    to_root = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    to_child = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    child = Channel(buf, 4, host=False, own_doorbell=Doorbell(to_child),
                    peer_doorbell=Doorbell(to_root))
    root = Channel(buf, 4, host=True, own_doorbell=Doorbell(os.dup(to_root)),
                   peer_doorbell=Doorbell(os.dup(to_child)))
    yield child, root
    child.close()
    root.close()


def test_the_device_gets_the_drained_batch_itself(ends):
    child, root = ends
    vsp = Recorder(root)
    for i in range(5):
        assert child.try_send(bytes([i]) * 8, trans_id=i)
    assert not vsp.service()
    (batch,) = vsp.batches
    assert isinstance(batch, PacketBatch) and len(batch) == 5  # no Packet made yet
    assert [(p.trans_id, p.payload) for p in batch] == [(i, bytes([i]) * 8) for i in range(5)]
    assert vsp.last_activity == 5


def test_completions_of_our_requests_are_still_picked_out(ends):
    child, root = ends
    vsp = Recorder(root)
    got = []
    tid = vsp.request(b"question", got.append)
    assert child.try_recv().trans_id == tid  # the child reads the request
    assert child.try_send(b"other...", trans_id=99)
    assert child.try_send(b"answer..", trans_id=tid, packet_type=PacketType.COMP)
    vsp.service()
    assert [p.payload for p in got] == [b"answer.."]
    assert [[p.trans_id for p in b] for b in vsp.batches] == [[99]]


def test_a_service_that_read_nothing_does_not_poll(ends, monkeypatch):
    child, root = ends
    vsp = Recorder(root)
    polls = []
    real = root.incoming.wait_readable
    monkeypatch.setattr(root.incoming, "wait_readable",
                        lambda *a, **k: polls.append(1) or real(*a, **k))
    vsp.service()
    assert polls == []  # an idle channel costs nothing
    child.try_send(b"x" * 8)
    vsp.service()
    assert polls == [1]


def test_the_poll_catches_what_comes_meanwhile_and_leaves_signals_on(ends, monkeypatch):
    child, root = ends
    monkeypatch.setattr(base, "SERVICE_SPIN_NS", 200_000_000)  # poll up to 0.2 s
    vsp = Recorder(root)
    assert child.try_send(b"first...")
    root.doorbell.clear()

    def late() -> None:
        time.sleep(0.02)
        child.try_send(b"second..")

    t = threading.Thread(target=late)
    t.start()
    vsp.service()  # reads "first", polls, finds "second" (the C poll lets the thread run)
    t.join()
    assert [p.payload for b in vsp.batches for p in b] == [b"first...", b"second.."]
    assert not root.doorbell.clear()  # masked while polling: the writer did not ring
    # ... and unmasked again when service returned: the next packet rings
    child.try_send(b"third...")
    assert root.doorbell.clear()
