"""Hypercalls: byte vectors from the spec (§4.2/§4.3), the wire, the router.

The router is driven sans-IO with a recording SynIC stand-in; hv.synic's
own tests cover the real message slots and event flags.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv import wire as W
from hv.abi import POST_MESSAGE_INPUT_SIZE, HvStatus, HypercallCode, Privilege
from hv.client import HypercallClient
from hv.router import Connection, ConnectionKind, HypercallRouter
from hv.wire import Frame, FrameDecoder, FrameKind, FrameWriter, WireError

ROOT, CHILD1, CHILD2 = 0, 1, 2

# --- byte vectors written from the spec --------------------------------------------------


def test_status_and_call_codes_are_the_spec_values():
    assert HypercallCode.POST_MESSAGE == 0x005C
    assert HypercallCode.SIGNAL_EVENT == 0x005D
    expected = {
        "SUCCESS": 0,
        "INVALID_HYPERCALL_CODE": 2,
        "INVALID_HYPERCALL_INPUT": 3,
        "INVALID_ALIGNMENT": 4,
        "INVALID_PARAMETER": 5,
        "ACCESS_DENIED": 6,
        "INSUFFICIENT_MEMORY": 11,
        "INVALID_VP_INDEX": 0x0E,
        "INVALID_PORT_ID": 17,
        "INVALID_CONNECTION_ID": 18,
        "INSUFFICIENT_BUFFERS": 19,
        "INVALID_SYNIC_STATE": 0x18,
    }
    for name, value in expected.items():
        assert HvStatus[name] == value, name


def test_post_message_input_bytes():
    # ConnectionId 1 @0, RsvdZ @4, MessageType 1 @8, PayloadSize 8 @12, Message[240] @16:
    # a REQUESTOFFERS (msgtype 3) header as the payload, zero padded.
    raw = W.encode_post_message(0x000001, 1, bytes.fromhex("0300000000000000"))
    want = bytes.fromhex(
        "01000000" "00000000" "01000000" "08000000" "0300000000000000"
    ) + bytes(232)
    assert len(raw) == 256 == POST_MESSAGE_INPUT_SIZE
    assert raw == want
    pm = W.decode_post_message(want)
    assert (pm.connection_id, pm.rsvdz, pm.message_type, pm.payload_size) == (1, 0, 1, 8)
    assert pm.payload == bytes.fromhex("0300000000000000")


def test_post_message_full_payload_and_wrong_length():
    payload = bytes(range(240))
    raw = W.encode_post_message(0xABCDEF, 0x7FFFFFFF, payload)
    assert raw[:16] == bytes.fromhex("efcdab00" "00000000" "ffffff7f" "f0000000")
    assert raw[16:] == payload
    with pytest.raises(ValueError):
        W.encode_post_message(1, 1, bytes(241))
    with pytest.raises(ValueError):
        W.decode_post_message(raw[:255])


def test_signal_event_input_bytes():
    # ConnectionId u32 @0, FlagNumber u16 @4, RsvdZ u16 @6
    raw = W.encode_signal_event(0x123456, 5)
    assert raw == bytes.fromhex("56341200" "0500" "0000")
    assert W.decode_signal_event(raw) == (0x123456, 5, 0)
    with pytest.raises(ValueError):
        W.decode_signal_event(raw + b"\0")


def test_control_and_result_values():
    # input value: code bits 0-15, fast bit 16, rep count bits 32-43
    assert W.encode_control(0x5C) == 0x5C
    assert W.encode_control(0x5D, fast=True) == 0x1005D
    assert W.encode_control(0x8001, rep_count=3) == 0x0000000300008001
    c = W.decode_control(0x0FFF_0FFF_0001_005C)
    assert (c.code, c.fast, c.rep_count, c.rep_start, c.reserved) == (0x5C, True, 0xFFF, 0xFFF, 0)
    assert W.decode_control(1 << 27).reserved and W.decode_control(1 << 63).reserved
    # output value: status bits 0-15, reps completed bits 32-43
    assert W.encode_result(HvStatus.INSUFFICIENT_BUFFERS) == 0x13
    assert W.encode_result(HvStatus.SUCCESS, 2) == 0x2_0000_0000
    assert W.result_status(0x2_0000_0013) is HvStatus.INSUFFICIENT_BUFFERS
    assert W.result_status(0x77) == 0x77


def test_frame_header_bytes():
    # length u32 (header included), kind u16, nfds u8, flags u8, seq u64, body
    f = Frame(FrameKind.HYPERCALL, seq=0x0102030405060708, body=b"\xaa\xbb", flags=1)
    assert f.encode() == bytes.fromhex("12000000" "0100" "00" "01" "0807060504030201" "aabb")
    req = W.request_signal_event(2, 0, seq=9)
    assert req == bytes.fromhex("20000000" "0100" "00" "00" "0900000000000000") + (
        bytes.fromhex("5d00000000000000") + bytes.fromhex("02000000" "0000" "0000")
    )


# --- the router ---------------------------------------------------------------------


class RecordingSynic:
    """Stands in for hv.synic.SynicHost: records, answers SUCCESS."""

    def __init__(self) -> None:
        self.posts: list[tuple] = []
        self.flags: list[tuple[int, int]] = []
        self.status = HvStatus.SUCCESS

    def post(self, sint, message_type, payload, origination_id, port):
        self.posts.append((sint, message_type, payload, origination_id, port))
        return self.status

    def signal_event(self, sint, flag):
        self.flags.append((sint, flag))
        return self.status


@pytest.fixture
def net():
    """Root + two children; child->root message connection 1 for both
    children, event connections 0x10 (child1->root, flags 64..67) and 0x20
    (child2->root), and root->child1 message connection 0x101."""
    r = HypercallRouter(root_id=ROOT)
    syn = {p: RecordingSynic() for p in (ROOT, CHILD1, CHILD2)}
    for p, s in syn.items():
        r.add_partition(p, s)
    r.add_connection(Connection(1, ROOT, ConnectionKind.MESSAGE, {CHILD1, CHILD2}))
    r.add_connection(
        Connection(0x10, ROOT, ConnectionKind.EVENT, {CHILD1}, flag_base=64, flag_count=4)
    )
    r.add_connection(Connection(0x20, ROOT, ConnectionKind.EVENT, {CHILD2}, flag_base=70))
    r.add_connection(Connection(0x101, CHILD1, ConnectionKind.MESSAGE, {ROOT}))
    return r, syn


def nothing_happened(syn):
    return all(not s.posts and not s.flags for s in syn.values())


def test_post_message_delivers_with_sender_as_origin(net):
    r, syn = net
    assert r.post_message(CHILD2, 1, 1, b"hello") == HvStatus.SUCCESS
    assert syn[ROOT].posts == [(2, 1, b"hello", CHILD2, (1, CHILD2))]
    assert r.post_message(ROOT, 0x101, 1, b"") == HvStatus.SUCCESS
    assert syn[CHILD1].posts == [(2, 1, b"", ROOT, (0x101, ROOT))]


@pytest.mark.parametrize(
    ("mtype", "payload", "status"),
    [
        (0, b"x", HvStatus.INVALID_PARAMETER),
        (0x80000000, b"x", HvStatus.INVALID_PARAMETER),
        (0x80000010, b"x", HvStatus.INVALID_PARAMETER),
        (1, bytes(241), HvStatus.INVALID_PARAMETER),
        (0x7FFFFFFF, bytes(240), HvStatus.SUCCESS),
    ],
)
def test_post_message_parameter_checks(net, mtype, payload, status):
    r, syn = net
    assert r.post_message(CHILD1, 1, mtype, payload) == status
    assert len(syn[ROOT].posts) == (status == HvStatus.SUCCESS)


def test_rogue_post_to_a_connection_it_may_not_use(net):
    r, syn = net
    # child2 tries the root's connection into child1, and an unknown one
    assert r.post_message(CHILD2, 0x101, 1, b"evil") == HvStatus.INVALID_CONNECTION_ID
    assert r.post_message(CHILD2, 0x999, 1, b"evil") == HvStatus.INVALID_CONNECTION_ID
    assert r.post_message(CHILD2, 0x10, 1, b"evil") == HvStatus.INVALID_CONNECTION_ID
    assert r.post_message(CHILD2, 0x1000001, 1, b"x") == HvStatus.INVALID_HYPERCALL_INPUT
    assert nothing_happened(syn)
    assert r.denied(CHILD2) == 3


def test_rogue_signals_someone_elses_event(net):
    r, syn = net
    assert r.signal_event(CHILD2, 0x10, 0) == HvStatus.INVALID_CONNECTION_ID
    assert r.signal_event(CHILD1, 0x20, 0) == HvStatus.INVALID_CONNECTION_ID
    assert nothing_happened(syn)
    assert r.signal_event(CHILD1, 0x10, 3) == HvStatus.SUCCESS
    assert syn[ROOT].flags == [(2, 67)]


def test_signal_event_checks(net):
    r, syn = net
    assert r.signal_event(CHILD1, 0x10, 4) == HvStatus.INVALID_PARAMETER  # flag_count 4
    assert r.signal_event(CHILD1, 1, 0) == HvStatus.INVALID_PORT_ID  # a message connection
    assert r.post_message(CHILD1, 0x10, 1, b"x") == HvStatus.INVALID_PORT_ID  # an event one
    assert nothing_happened(syn)


def test_privileges_and_inactive_targets(net):
    r, syn = net
    r.add_partition(7, RecordingSynic(), privileges=Privilege(0))
    r.add_connection(Connection(0x70, ROOT, ConnectionKind.MESSAGE, {7}))
    assert r.post_message(7, 0x70, 1, b"x") == HvStatus.ACCESS_DENIED
    assert r.signal_event(7, 0x70) == HvStatus.ACCESS_DENIED
    assert r.post_message(99, 1, 1, b"x") == HvStatus.ACCESS_DENIED  # unknown caller
    r.set_synic(ROOT, None)  # the root crashed
    assert r.post_message(CHILD1, 1, 1, b"x") == HvStatus.INVALID_PORT_ID
    assert r.signal_event(CHILD1, 0x10) == HvStatus.INVALID_PORT_ID
    assert nothing_happened(syn)
    r.set_synic(ROOT, syn[ROOT])
    syn[ROOT].status = HvStatus.INSUFFICIENT_BUFFERS  # the SynIC's answer is passed on
    assert r.post_message(CHILD1, 1, 1, b"x") == HvStatus.INSUFFICIENT_BUFFERS


def test_connection_validation():
    with pytest.raises(ValueError):
        Connection(0, ROOT, ConnectionKind.MESSAGE, set())
    with pytest.raises(ValueError):
        Connection(0x1000000, ROOT, ConnectionKind.MESSAGE, set())
    with pytest.raises(ValueError):
        Connection(1, ROOT, ConnectionKind.MESSAGE, set(), sint=16)
    with pytest.raises(ValueError):
        Connection(1, ROOT, ConnectionKind.EVENT, set(), flag_base=2047, flag_count=2)
    r = HypercallRouter()
    r.add_connection(Connection(1, ROOT, ConnectionKind.MESSAGE, set()))
    with pytest.raises(ValueError):
        r.add_connection(Connection(1, ROOT, ConnectionKind.MESSAGE, set()))


def _call(r, caller, code, inp, **kw):
    result, out = r.call(caller, W.encode_control(code, **kw), inp)
    return W.result_status(result), out


def test_call_decodes_the_spec_inputs(net):
    r, syn = net
    st, _ = _call(r, CHILD1, 0x5C, W.encode_post_message(1, 1, b"abc"))
    assert st == HvStatus.SUCCESS and syn[ROOT].posts[-1][2] == b"abc"
    st, _ = _call(r, CHILD1, 0x5D, W.encode_signal_event(0x10, 1))
    assert st == HvStatus.SUCCESS and syn[ROOT].flags == [(2, 65)]


def test_call_rejects_malformed_inputs(net):
    r, syn = net
    good = W.encode_post_message(1, 1, b"abc")
    cases = [
        (0x5C, good[:-1], HvStatus.INVALID_HYPERCALL_INPUT),  # wrong length
        (0x5C, good[:4] + b"\x01" + good[5:], HvStatus.INVALID_HYPERCALL_INPUT),  # RsvdZ
        (0x5C, b"\x01\x00\x00\x01" + good[4:], HvStatus.INVALID_HYPERCALL_INPUT),  # id bit 24
        (0x5C, good[:12] + b"\xf1\x00\x00\x00" + good[16:], HvStatus.INVALID_PARAMETER),  # 241
        (0x5D, W.encode_signal_event(0x10)[:6] + b"\x01\x00", HvStatus.INVALID_HYPERCALL_INPUT),
        (0x5D, b"\x10\x00\x00\x00\x00\x00", HvStatus.INVALID_HYPERCALL_INPUT),
        (0x1234, b"", HvStatus.INVALID_HYPERCALL_CODE),
        (0x8001, b"\x00" * 8, HvStatus.INVALID_HYPERCALL_INPUT),  # share 0 pages
    ]
    for code, inp, status in cases:
        assert _call(r, CHILD1, code, inp)[0] == status, (hex(code), status)
    assert _call(r, CHILD1, 0x5C, good, rep_count=1)[0] == HvStatus.INVALID_HYPERCALL_INPUT
    result, _ = r.call(CHILD1, 0x5C | 1 << 27, good)  # reserved control bit
    assert W.result_status(result) == HvStatus.INVALID_HYPERCALL_INPUT
    result, _ = r.call(CHILD1, 0x5C | 1 << 17, good)  # variable header size
    assert W.result_status(result) == HvStatus.INVALID_HYPERCALL_INPUT
    assert nothing_happened(syn)


@settings(max_examples=300, deadline=None)
@given(control=st.integers(0, 2**64 - 1), inp=st.binary(max_size=300))
def test_call_never_raises(control, inp):
    r = HypercallRouter()
    s = RecordingSynic()
    r.add_partition(ROOT, s)
    r.add_partition(CHILD1, RecordingSynic())
    r.add_connection(Connection(1, ROOT, ConnectionKind.MESSAGE, {CHILD1}))
    result, out = r.call(CHILD1, control, inp)
    assert 0 <= result < 2**64 and isinstance(out, bytes)


def test_handle_frame_echoes_seq_closes_fds_and_honours_no_reply(net):
    r, _syn = net
    fd = os.eventfd(0)
    req = Frame(FrameKind.HYPERCALL, 77, W.encode_request(0x5C, b"")[16:], [fd])
    reply = r.handle_frame(CHILD1, req)
    assert reply.kind == FrameKind.REPLY and reply.seq == 77
    assert W.result_status(int.from_bytes(reply.body[:8], "little")) == 3
    with pytest.raises(OSError):
        os.fstat(fd)  # a partition's fd is never kept
    quiet = W.encode_request(0x5D, W.encode_signal_event(0x10), seq=5, reply=False)
    assert r.handle_bytes(CHILD1, quiet) is None
    bad = W.encode_request(0x5D, W.encode_signal_event(0x20), seq=6, reply=False)
    assert W.decode_reply(r.handle_bytes(CHILD1, bad)) == HvStatus.INVALID_CONNECTION_ID
    with pytest.raises(WireError):
        r.handle_frame(CHILD1, Frame(FrameKind.REPLY, 1, bytes(8)))
    with pytest.raises(WireError):
        r.handle_frame(CHILD1, Frame(FrameKind.HYPERCALL, 1, bytes(7)))


# --- the wire -----------------------------------------------------------------------


def test_decoder_reassembles_byte_by_byte_and_batches():
    frames = [Frame(FrameKind.HYPERCALL, i, bytes([i]) * i) for i in range(1, 6)]
    data = b"".join(f.encode() for f in frames)
    dec = FrameDecoder()
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i : i + 1])
    assert [(f.seq, f.body) for f in got] == [(f.seq, f.body) for f in frames]
    assert [f.seq for f in FrameDecoder().feed(data)] == [1, 2, 3, 4, 5]


def test_decoder_hands_fds_to_their_frames():
    a, b = os.eventfd(0), os.eventfd(0)
    f1 = Frame(FrameKind.HYPERCALL, 1, b"x")
    f2 = Frame(FrameKind.MEMORY, 2, b"y", [a, b])
    data = f1.encode() + f2.encode()
    dec = FrameDecoder()
    out = dec.feed(data[:20], [a, b]) + dec.feed(data[20:])
    assert out[0].fds == [] and out[1].fds == [a, b]
    out[1].close_fds()


@pytest.mark.parametrize(
    "bad",
    [
        bytes.fromhex("0f000000" "0100" "00" "00") + bytes(8),  # length < 16
        bytes.fromhex("01000100" "0100" "00" "00") + bytes(8),  # length > 64 KiB
        bytes.fromhex("10000000" "0100" "11" "00") + bytes(8),  # 17 fds
        bytes.fromhex("10000000" "0100" "00" "80") + bytes(8),  # unknown flag
        bytes.fromhex("10000000" "0000" "00" "00") + bytes(8),  # kind 0
        bytes.fromhex("10000000" "0100" "01" "00") + bytes(8),  # claims an fd that never came
    ],
)
def test_decoder_rejects_malformed_frames(bad):
    dec = FrameDecoder()
    with pytest.raises(WireError):
        dec.feed(bad)
    with pytest.raises(WireError):
        dec.feed(Frame(FrameKind.HYPERCALL, 1).encode())  # broken for good


def test_decoder_closes_unclaimed_fds():
    fd = os.eventfd(0)
    with pytest.raises(WireError):
        FrameDecoder().feed(Frame(FrameKind.HYPERCALL, 1).encode(), [fd])
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("after", [
    b"",  # an fd too many, claimed by no frame
    bytes.fromhex("0f000000" "0100" "00" "00") + bytes(8),  # a malformed frame next
])
def test_decoder_closes_the_fds_of_frames_it_completed_before_failing(after):
    # Found by tests/fuzz/fuzz_hypercall.py (its input, reduced): the fds of a
    # good frame completed in the same feed() as the error were dropped with
    # the frame and never closed (a leak in the supervisor per bad partition).
    a, b = os.eventfd(0), os.eventfd(0)
    good = Frame(FrameKind.HYPERCALL, 1, bytes(8), [a]).encode()
    dec = FrameDecoder()
    assert dec.feed(good[:10]) == []
    with pytest.raises(WireError):
        dec.feed(good[10:] + after, [a, b] if not after else [a])
    for fd in (a, b) if not after else (a,):
        with pytest.raises(OSError):
            os.fstat(fd)
    if after:
        os.close(b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_decoder_only_ever_raises_wire_error(chunks):
    dec = FrameDecoder()
    try:
        for c in chunks:
            for f in dec.feed(c):
                assert f.kind > 0 and not f.fds
    except WireError:
        pass


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET])
def test_frames_and_fds_over_a_socketpair(kind):
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    ev = os.eventfd(0)
    try:
        W.send_frame(a, Frame(FrameKind.MEMORY, 3, b"grant", [ev]))
        W.send_frame(a, Frame(FrameKind.HYPERCALL, 4, b"next"))
        dec = FrameDecoder()
        got: list[Frame] = []
        b.settimeout(5)
        while len(got) < 2:
            got += W.recv_frames(b, dec)
        assert [(f.seq, f.body, len(f.fds)) for f in got] == [(3, b"grant", 1), (4, b"next", 0)]
        os.eventfd_write(got[0].fds[0], 1)  # the received fd is the same eventfd
        assert os.eventfd_read(ev) == 1
        got[0].close_fds()
        a.close()
        assert W.recv_frames(b, dec) is None  # end of stream
    finally:
        os.close(ev)
        a.close()
        b.close()


def test_frame_writer_never_blocks_and_bounds_its_queue():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ev = os.eventfd(0)
    w = FrameWriter(limit=256 * 1024)
    try:
        w.push(Frame(FrameKind.MEMORY, 1, b"m", [ev]))
        for i in range(40):
            w.push(Frame(FrameKind.REPLY, i + 2, bytes(4000)))
        assert not w.flush(a)  # the peer is not reading: would block, so it stops
        with pytest.raises(WireError):
            for _ in range(100):
                w.push(Frame(FrameKind.REPLY, 0, bytes(4000)))
        dec, got = FrameDecoder(), []
        b.settimeout(5)
        while len(got) < 41:
            w.flush(a)
            got += W.recv_frames(b, dec)
        assert [f.seq for f in got[:41]] == list(range(1, 42))
        assert len(got[0].fds) == 1
        got[0].close_fds()
    finally:
        w.close()
        os.close(ev)
        a.close()
        b.close()


def test_client_against_a_router_thread(net):
    r, syn = net
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stop = threading.Event()

    def supervisor():
        dec = FrameDecoder()
        b.settimeout(0.05)
        while not stop.is_set():
            try:
                frames = W.recv_frames(b, dec)
            except TimeoutError:
                continue
            if frames is None:
                return
            for f in frames:
                reply = r.handle_frame(CHILD1, f)
                if f.seq == 2:  # an unsolicited frame before the reply
                    W.send_frame(b, Frame(0x100, 0, b"runtime"))
                if reply is not None:
                    W.send_frame(b, reply)

    t = threading.Thread(target=supervisor, daemon=True)
    t.start()
    client = HypercallClient(a, timeout=5)
    try:
        assert client.post_message(1, 1, b"hi") == HvStatus.SUCCESS
        assert client.signal_event(0x20) == HvStatus.INVALID_CONNECTION_ID
        assert client.signal_event(0x10, 2, wait=False) == HvStatus.SUCCESS
        assert client.post_message(0x101, 1, b"no") == HvStatus.INVALID_CONNECTION_ID
        extra = client.poll(0)
        assert [(f.kind, f.body) for f in extra] == [(0x100, b"runtime")]
        assert syn[ROOT].posts[0][2] == b"hi" and syn[ROOT].flags == [(2, 66)]
    finally:
        stop.set()
        t.join(5)
        client.close()
        a.close()
        b.close()


def test_client_times_out():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        client = HypercallClient(a, timeout=0.05)
        with pytest.raises(TimeoutError):
            client.signal_event(1)
    finally:
        a.close()
        b.close()


def test_poll_zero_reads_frames_already_waiting():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        client = HypercallClient(a, timeout=1)
        assert client.poll(0) == []
        W.send_frame(b, Frame(0x100, 0, b"stop"))
        frames = client.poll(0)  # no time to wait, but the frame is there
        assert [(f.kind, f.body) for f in frames] == [(0x100, b"stop")]
        client.close()
    finally:
        a.close()
        b.close()


# --- channel doorbells (VIRIDIAN_CHANNEL_DOORBELLS) -------------------------------------


def _doorbell_request(child: int, relid: int, seq: int = 7) -> Frame:
    import struct

    body = struct.pack("<Q", W.encode_control(HypercallCode.VIRIDIAN_CHANNEL_DOORBELLS))
    return Frame(FrameKind.HYPERCALL, seq, body + struct.pack("<II", child, relid))


def test_channel_doorbells_reach_root_and_child_and_connect_them(net):
    from hv.link import decode_runtime

    r, _syn = net
    reply = r.handle_frame(ROOT, _doorbell_request(CHILD1, 3))
    assert reply is not None and reply.kind == FrameKind.REPLY and reply.seq == 7
    assert W.result_status(int.from_bytes(reply.body[:8], "little")) == HvStatus.SUCCESS
    assert len(reply.fds) == 2 and reply.close_after_send
    [(to, frame)] = r.take_outbox()
    assert to == CHILD1 and len(frame.fds) == 2 and frame.close_after_send
    obj = decode_runtime(frame)
    assert obj is not None and obj["op"] == "doorbells" and obj["relid"] == 3
    try:
        # The two copies are the same two kernel objects: a signal on the
        # root's copy of "to child" is seen on the child's copy.
        os.eventfd_write(reply.fds[1], 1)
        assert os.eventfd_read(frame.fds[1]) == 1
        os.eventfd_write(frame.fds[0], 1)
        assert os.eventfd_read(reply.fds[0]) == 1
    finally:
        reply.close_fds()
        frame.close_fds()


def test_channel_doorbells_only_for_the_root_and_a_live_child(net):
    r, syn = net
    for caller, child, want in [
        (CHILD1, CHILD2, HvStatus.ACCESS_DENIED),  # a child cannot wire channels
        (CHILD2, CHILD2, HvStatus.ACCESS_DENIED),
        (ROOT, ROOT, HvStatus.INVALID_PARTITION_ID),
        (ROOT, 9, HvStatus.INVALID_PARTITION_ID),  # no such partition
    ]:
        reply = r.handle_frame(caller, _doorbell_request(child, 1))
        assert reply is not None and not reply.fds
        assert W.decode_reply_output(reply.encode())[0] == want, (caller, child)
        assert r.take_outbox() == []
    r.set_synic(CHILD1, None)  # down (restarting)
    reply = r.handle_frame(ROOT, _doorbell_request(CHILD1, 1))
    assert W.decode_reply_output(reply.encode())[0] == HvStatus.INVALID_PARTITION_ID
    assert r.denied(CHILD1) == 1 and r.denied(CHILD2) == 1
    del syn
