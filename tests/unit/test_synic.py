"""SynIC: HV_MESSAGE bytes (spec §4.1), the slot / MessagePending / EOM
protocol, 16 buffers per port, event flags (§4.4), and a hostile partition.

The protocol tests at the end run the partition side in a real second
process, once per atomics backend, and check that nothing is lost or stalls.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import subprocess
import sys
import textwrap

import pytest

from hv import _atomic
from hv.abi import HvStatus
from hv.synic import (
    EVENT_PAGE_OFFSET,
    SYNIC_BYTES,
    SynicError,
    SynicGuest,
    SynicHost,
    decode_hv_message,
    encode_hv_message,
)

BACKENDS = _atomic.available_backends()


@pytest.fixture(params=BACKENDS)
def pair(request):
    """A host and a guest SynIC in this process (the guest on dup'd fds)."""
    host = SynicHost(3, atomics=request.param)
    guest = SynicGuest(*(os.dup(fd) for fd in host.handles()), atomics=request.param)
    yield host, guest
    guest.close()
    host.close()


def page_of(host):
    """A second, independent mapping of the host's SynIC pages."""
    return mmap.mmap(host.handles().page_fd, SYNIC_BYTES, mmap.MAP_SHARED)


def test_hv_message_bytes():
    # MessageType u32 @0, PayloadSize u8 @4, MessageFlags u8 @5, reserved u16 @6,
    # OriginationId u64 @8, Payload[240] @16
    raw = encode_hv_message(1, b"abc", flags=1, origination_id=0x0102)
    assert raw == bytes.fromhex("01000000" "03" "01" "0000" "0201000000000000") + b"abc" + bytes(
        237
    )
    m = decode_hv_message(raw, 2)
    assert (m.sint, m.message_type, m.payload, m.pending, m.origination_id) == (
        2,
        1,
        b"abc",
        True,
        0x102,
    )
    with pytest.raises(SynicError):
        decode_hv_message(bytes(256))  # MessageType 0: an empty slot
    with pytest.raises(SynicError):
        decode_hv_message(raw[:4] + b"\xf1" + raw[5:])  # PayloadSize 241
    with pytest.raises(SynicError):
        decode_hv_message(raw[:255])


def test_post_writes_the_slot_of_its_sint(pair):
    host, guest = pair
    assert host.post(5, 0x42, b"payload", 7, "p") == HvStatus.SUCCESS
    with page_of(host) as page:
        assert page[5 * 256 : 6 * 256] == encode_hv_message(0x42, b"payload", origination_id=7)
        assert page[2 * 256 : 3 * 256] == bytes(256)  # other SINTs untouched
    assert guest.wait(0)  # the interrupt fired
    assert guest.read_message(2) is None
    m = guest.read_message(5)
    assert (m.message_type, m.payload, m.origination_id, m.pending) == (0x42, b"payload", 7, False)
    assert guest.read_message(5) is None


def test_seventeenth_message_gets_insufficient_buffers(pair):
    host, guest = pair
    for i in range(16):
        assert host.post(2, 1, b"%d" % i, 1, "child1") == HvStatus.SUCCESS
    assert host.post(2, 1, b"16", 1, "child1") == HvStatus.INSUFFICIENT_BUFFERS
    assert host.buffers_in_use("child1") == 16 and host.queued(2) == 15
    # another port (another sender) has its own 16 buffers
    assert host.post(2, 1, b"other", 2, "child2") == HvStatus.SUCCESS
    # the partition takes one: MessagePending was set, so it signals EOM
    m = guest.read_message()
    assert m.payload == b"0" and m.pending
    assert host.eom.wait(0)
    host.service()
    assert host.buffers_in_use("child1") == 15
    assert host.post(2, 1, b"16", 1, "child1") == HvStatus.SUCCESS
    got = [m.payload]
    while len(got) < 18:
        m = guest.read_message()
        if m is None:
            assert host.eom.wait(1), "stalled: no EOM although messages are queued"
            host.service()
            continue
        got.append(m.payload)
    assert got == [b"%d" % i for i in range(16)] + [b"other", b"16"]
    assert host.buffers_in_use("child1") == 0 and host.queued(2) == 0


def test_slot_consumed_without_eom_is_reaped_by_the_next_post(pair):
    host, guest = pair
    assert host.post(2, 1, b"a", 0, "p") == HvStatus.SUCCESS
    assert guest.read_message().payload == b"a"
    assert not host.eom.wait(0)  # nothing was pending: no EOM needed
    for _ in range(16):  # all 16 free again
        assert host.post(2, 1, b"b", 0, "p") == HvStatus.SUCCESS


def test_a_message_of_the_default_port_frees_its_buffer_when_taken(pair):
    # Found by tests/fuzz/fuzz_synic.py: a message posted with port=None (the
    # default) was taken for an empty slot once delivered, so its buffer was
    # never given back and the 17th such message was refused.
    host, guest = pair
    for i in range(40):
        assert host.post(2, 1, b"%d" % i, 0) == HvStatus.SUCCESS, i
        assert guest.read_message().payload == b"%d" % i
    assert host.buffers_in_use(None) == 0
    host.post(2, 1, b"held", 0)
    assert host.drop_queued() == 0 and host.buffers_in_use(None) == 0


def test_pending_is_set_when_a_message_queues_behind_an_occupied_slot(pair):
    host, guest = pair
    host.post(2, 1, b"first", 0, "p")
    with page_of(host) as page:
        assert page[2 * 256 + 5] == 0  # alone: no MessagePending
        host.post(2, 1, b"second", 0, "p")
        assert page[2 * 256 + 5] == 1  # set while the slot was occupied
    assert guest.read_message().payload == b"first"
    assert host.eom.wait(0)
    assert host.service() == 1
    assert guest.read_message().payload == b"second"


def test_event_flags_test_and_clear(pair):
    host, guest = pair
    for flag in (0, 7, 8, 31, 32, 1000, 2047):
        assert host.signal_event(2, flag) == HvStatus.SUCCESS
    host.signal_event(2, 7)  # coalesces
    with page_of(host) as page:
        base = EVENT_PAGE_OFFSET + 2 * 256
        # flag n is bit n % 8 of byte n / 8
        assert page[base] == 0x81 and page[base + 1] == 0x01 and page[base + 3] == 0x80
        assert page[base + 4] == 0x01 and page[base + 125] == 0x01 and page[base + 255] == 0x80
    assert host.event_flags(2) == {0, 7, 8, 31, 32, 1000, 2047}
    assert guest.wait(0)
    assert guest.take_events(2) == [0, 7, 8, 31, 32, 1000, 2047]
    assert guest.take_events(2) == []
    assert host.event_flags(2) == set()
    assert host.signal_event(2, 2048) == HvStatus.INVALID_PARAMETER
    assert host.signal_event(16, 0) == HvStatus.INVALID_PARAMETER


def test_disabled_synic_and_bad_arguments(pair):
    host, _guest = pair
    assert host.post(2, 1, bytes(241), 0, "p") == HvStatus.INVALID_PARAMETER
    host.enabled = False
    assert host.post(2, 1, b"x", 0, "p") == HvStatus.INVALID_SYNIC_STATE
    assert host.signal_event(2, 1) == HvStatus.INVALID_SYNIC_STATE


def test_hostile_partition_only_hurts_itself(pair):
    host, guest = pair
    with page_of(host) as page:
        # garbage MessageType in a free slot: the host sees it occupied
        page[2 * 256 : 2 * 256 + 4] = b"\xff\xff\xff\xff"
        for _ in range(16):
            assert host.post(2, 1, b"x", 0, "p") == HvStatus.SUCCESS
        assert host.post(2, 1, b"x", 0, "p") == HvStatus.INSUFFICIENT_BUFFERS
        assert host.eom.wait(0) is False
        # a bogus EOM storm changes nothing
        for _ in range(100):
            guest.eom.signal()
        assert host.service() == 0
        # a slot the partition filled with a bad PayloadSize is dropped by its reader
        page[3 * 256 : 4 * 256] = bytes([1, 0, 0, 0, 250]) + bytes(251)
    assert guest.read_message(3) is None and guest.malformed == 1
    # the partition cannot shrink or grow its SynIC memfd under the host
    fd = host.handles().page_fd
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    with pytest.raises(PermissionError):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)


def test_guest_rejects_a_too_small_page_and_closes_the_fds():
    fd = os.memfd_create("small")
    os.ftruncate(fd, 4096)
    a, b = os.eventfd(0), os.eventfd(0)
    with pytest.raises(SynicError):
        SynicGuest(fd, a, b)
    for f in (fd, a, b):
        with pytest.raises(OSError):
            os.fstat(f)


def test_drop_queued_and_close_release_everything():
    host = SynicHost(1)
    for _ in range(5):
        host.post(2, 1, b"x", 0, "p")
    assert host.drop_queued() == 4
    assert host.buffers_in_use("p") == 0
    host.close()
    host.close()  # idempotent
    assert host.post(2, 1, b"x", 0, "p") == HvStatus.INVALID_SYNIC_STATE


# --- the protocol across two processes ----------------------------------------------------

GUEST = textwrap.dedent(
    """
    import json, sys
    from hv.proc import die_with_parent
    from hv.synic import SynicGuest
    die_with_parent()
    page, irq, eom, n, mode, backend = sys.argv[1:]
    n = int(n)
    g = SynicGuest(int(page), int(irq), int(eom), atomics=backend)
    out = {"bad": 0, "got": 0, "flags": [], "stall": False}
    if mode == "messages":
        expect = 0
        while expect < n:
            m = g.read_message(2)
            if m is None:
                if not g.wait(5.0):
                    out["stall"] = True
                    break
                continue
            if int(m.payload) != expect or m.origination_id != expect % 7:
                out["bad"] += 1
            expect += 1
        out["got"] = expect
    else:
        seen = []
        while len(seen) < n:
            f = g.take_events(2)
            if not f:
                if not g.wait(5.0):
                    out["stall"] = True
                    break
                continue
            seen += f
        out["flags"] = seen
    print(json.dumps(out), flush=True)
    """
)


def run_guest(host, n, mode, backend):
    fds = host.handles()
    return subprocess.Popen(
        [sys.executable, "-c", GUEST, *(str(f) for f in fds), str(n), mode, backend],
        pass_fds=tuple(fds),
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", BACKENDS)
def test_messages_across_processes_in_order_without_stalls(backend):
    n = 10000
    with SynicHost(9, atomics=backend) as host:
        proc = run_guest(host, n, "messages", backend)
        try:
            i = 0
            while i < n:
                st = host.post(2, 1, b"%d" % i, i % 7, "sender")
                if st == HvStatus.INSUFFICIENT_BUFFERS:
                    # 16 in use: the partition must EOM once it frees the slot
                    assert host.eom.wait(5.0), "no EOM within 5 s with messages queued"
                    host.service()
                    continue
                assert st == HvStatus.SUCCESS
                i += 1
            while host.queued(2):
                assert host.eom.wait(5.0), "queued messages stranded"
                host.service()
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
    res = json.loads(out)
    assert res == {"bad": 0, "got": n, "flags": [], "stall": False}
    assert host.rejected_full > 0  # the test really exercised full queues


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", BACKENDS)
def test_event_flags_across_processes_none_lost(backend):
    with SynicHost(9, atomics=backend) as host:
        proc = run_guest(host, 2048, "events", backend)
        try:
            # interleave flags so that the same words are set and cleared concurrently
            for flag in sorted(range(2048), key=lambda f: (f % 32, f)):
                assert host.signal_event(2, flag) == HvStatus.SUCCESS
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
    res = json.loads(out)
    assert not res["stall"]
    assert sorted(res["flags"]) == list(range(2048))  # each exactly once
