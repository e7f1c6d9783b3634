"""Hypervisor services (issue 3): HvPostMessage delivery latency, HvSignalEvent
wake latency, and CPU share accuracy.

Latency: three processes.  The sender (this process, first CPU) issues the
hypercall through hv.wire's frames (``HypercallClient``, hv/client.py) to a mini
supervisor process (unpinned: hv.router + hv.synic SynicHost, a
selector loop, exactly the objects the real supervisor wires), which
delivers into the receiver partition's SynIC (message slot, or event flag +
interrupt eventfd).  The receiver (second CPU) blocks on its SynIC interrupt,
copies the message out (or test-and-clears the flag), and reports the time
it got it over a pipe, which is also the sender's go-ahead for the next call
(closed loop: no queueing, so no coordinated omission).  Latency = receiver's
time - sender's time just before the call, both CLOCK_MONOTONIC
(perf_counter_ns).  The hypercall itself waits for the supervisor's reply,
as a hypercall is synchronous; its round trip is reported too.

CPU share: weights 1:3 on two busy processes pinned to one CPU, and a 20 %
limit on a third on the other CPU, for each mechanism available (the
kernel's cgroup controller if writable, and the userspace scheduler);
measured with psutil over the window.

Figures go in ``benchmark.extra_info`` (p50/p99/p99.9/max in µs, shares in
%).  Quick mode (VIRIDIAN_BENCH_QUICK=1 or --benchmark-disable) runs tiny
rounds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from hdrh.histogram import HdrHistogram

from hv.abi import HvStatus
from hv.client import HypercallClient
from hv.cpu import CpuArbiter, CpuSettings, detect_mechanism

NOT_USED_OK = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
SENDER, RECEIVER = 1, 2
MSG_CONN, EVENT_CONN = 0x10, 0x20
STOP_TYPE = 2

SUPERVISOR = textwrap.dedent(
    """
    import selectors, socket, sys
    from hv.proc import die_with_parent
    die_with_parent()
    from hv import wire as W
    from hv.router import Connection, ConnectionKind, HypercallRouter
    from hv.synic import SynicHost
    from hv.wire import Frame, FrameDecoder

    a_fd, b_fd = int(sys.argv[1]), int(sys.argv[2])
    a = socket.socket(fileno=a_fd)
    b = socket.socket(fileno=b_fd)
    router = HypercallRouter(root_id=0)
    syn_a, syn_b = SynicHost(1, label="sender"), SynicHost(2, label="receiver")
    router.add_partition(0, None)
    router.add_partition(1, syn_a)
    router.add_partition(2, syn_b)
    router.add_connection(Connection(0x10, 2, ConnectionKind.MESSAGE, {1}))
    router.add_connection(Connection(0x20, 2, ConnectionKind.EVENT, {1}, flag_base=9))
    W.send_frame(b, Frame(0x100, 0, b"synic", list(syn_b.handles())))
    b.close()
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, "a")
    sel.register(syn_b.eom_fileno(), selectors.EVENT_READ, "eom")
    dec = FrameDecoder()
    while True:
        for key, _ in sel.select(30.0):
            if key.data == "eom":
                syn_b.service()
                continue
            frames = W.recv_frames(a, dec)
            if frames is None:
                sys.exit(0)
            for f in frames:
                reply = router.handle_frame(1, f)
                if reply is not None:
                    W.send_frame(a, reply)
    """
)

RECEIVER_SCRIPT = textwrap.dedent(
    """
    import os, socket, struct, sys, time
    from hv.proc import die_with_parent
    die_with_parent()
    from hv import wire as W
    from hv.synic import SynicGuest
    boot_fd, pipe_fd, cpu = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    os.sched_setaffinity(0, {cpu})
    boot = socket.socket(fileno=boot_fd)
    boot.settimeout(10)
    (frame,) = W.recv_frames(boot, W.FrameDecoder())
    boot.close()
    g = SynicGuest(*frame.fds)
    os.write(pipe_fd, struct.pack("<q", 0))  # ready
    now = time.perf_counter_ns
    while True:
        if not g.wait(30.0):
            sys.exit(3)
        t = now()
        m = g.read_message(2)
        if m is not None:
            if m.message_type == 2:
                sys.exit(0)
            os.write(pipe_fd, struct.pack("<q", t))
            continue
        if g.take_events(2):
            os.write(pipe_fd, struct.pack("<q", t))
    """
)


class Rig:
    """Sender (this process), mini supervisor, receiver partition."""

    def __init__(self, cpus: tuple[int, int]) -> None:
        self.cpus = cpus
        self.a, sa = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        boot_s, boot_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pipe_r, pipe_w = os.pipe()
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", SUPERVISOR, str(sa.fileno()), str(boot_s.fileno())],
                    pass_fds=(sa.fileno(), boot_s.fileno()),
                )
            )
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        RECEIVER_SCRIPT,
                        str(boot_b.fileno()),
                        str(pipe_w),
                        str(cpus[1]),
                    ],
                    pass_fds=(boot_b.fileno(), pipe_w),
                )
            )
        finally:
            for x in (sa, boot_s, boot_b):
                x.close()
            os.close(pipe_w)
        self.old_affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpus[0]})
        self.client = HypercallClient(self.a, timeout=10.0)
        self._read_stamp()  # the receiver is ready

    def _read_stamp(self) -> int:
        import select

        p = select.poll()
        p.register(self.pipe_r, select.POLLIN)
        if not p.poll(10_000):
            raise TimeoutError("the receiver did not answer within 10 s")
        data = os.read(self.pipe_r, 8)
        if len(data) != 8:
            raise ConnectionError("the receiver is gone")
        return int.from_bytes(data, "little", signed=True)

    def round(self, n: int, kind: str) -> tuple[list[int], list[int]]:
        """n closed-loop calls; (delivery latencies, hypercall round trips) in ns."""
        lat, rtt = [], []
        now = time.perf_counter_ns
        client = self.client
        payload = bytes(64)
        for _ in range(n):
            t0 = now()
            if kind == "post":
                st = client.post_message(MSG_CONN, 1, payload)
            else:
                st = client.signal_event(EVENT_CONN, 0)
            t1 = now()
            assert st == HvStatus.SUCCESS, st
            t_recv = self._read_stamp()
            lat.append(t_recv - t0)
            rtt.append(t1 - t0)
        return lat, rtt

    def close(self) -> None:
        os.sched_setaffinity(0, self.old_affinity)
        try:
            self.client.post_message(MSG_CONN, STOP_TYPE, b"", wait=False)
        except OSError:
            pass
        self.client.close()
        self.a.close()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        os.close(self.pipe_r)


def _pct(samples: list[int], prefix: str) -> dict[str, float]:
    h = HdrHistogram(1, 10_000_000_000, 3)
    for s in samples:
        h.record_value(max(1, s))
    return {
        f"{prefix}p50_us": h.get_value_at_percentile(50) / 1e3,
        f"{prefix}p99_us": h.get_value_at_percentile(99) / 1e3,
        f"{prefix}p999_us": h.get_value_at_percentile(99.9) / 1e3,
        f"{prefix}max_us": h.get_max_value() / 1e3,
    }


@pytest.mark.multiprocess
@NOT_USED_OK
@pytest.mark.parametrize("kind", ["post", "signal"])
def test_hypercall_latency(benchmark, kind, bench_cfg):
    cfg = bench_cfg
    n = cfg.lat_pings
    benchmark.group = "hypervisor: hypercall delivery latency"
    rig = Rig(cfg.cpus)
    try:
        rig.round(20, kind)  # warm up (imports, first wakes)
        lats: list[int] = []
        rtts: list[int] = []

        def one_round() -> None:
            lat, rtt = rig.round(n, kind)
            lats.extend(lat)
            rtts.extend(rtt)

        benchmark.pedantic(one_round, rounds=cfg.lat_rounds, iterations=1)
    finally:
        rig.close()
    info = {
        "kind": "hypercall latency",
        "hypercall": "HvPostMessage (64 B payload)" if kind == "post" else "HvSignalEvent",
        "measures": "sender's call -> receiver has the message copied out"
        if kind == "post"
        else "sender's call -> receiver woken and flag test-and-cleared",
        "calls_per_op": n,
        "samples": len(lats),
        "pinning": {"sender_cpu": cfg.cpus[0], "receiver_cpu": cfg.cpus[1], "supervisor": None},
        "wire": "hv.wire frames over SOCK_SEQPACKET, reply awaited",
        **_pct(lats, ""),
        **_pct(rtts, "hypercall_rtt_"),
    }
    benchmark.extra_info.update(info)
    print(
        f"\n{info['hypercall']}: delivery p50 {info['p50_us']:.1f} us, p99 {info['p99_us']:.1f} us"
        f" (hypercall round trip p50 {info['hypercall_rtt_p50_us']:.1f} us)"
    )


# --- CPU share accuracy ---------------------------------------------------------------

BUSY = textwrap.dedent(
    """
    import os, sys, time
    from hv.proc import die_with_parent
    die_with_parent()
    os.sched_setaffinity(0, {int(sys.argv[1])})
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        for _ in range(10000):
            pass
    """
)

KERNEL = detect_mechanism()


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


@pytest.mark.multiprocess
@NOT_USED_OK
@pytest.mark.parametrize("mechanism", sorted({KERNEL, "userspace"}))
def test_cpu_share_accuracy(benchmark, mechanism, bench_cfg):
    cfg = bench_cfg
    window = 1.0 if cfg.quick else 5.0
    benchmark.group = "hypervisor: CPU share accuracy"
    spec = {
        "a": (CpuSettings(weight=1), cfg.cpus[0]),
        "b": (CpuSettings(weight=3), cfg.cpus[0]),
        "c": (CpuSettings(limit_percent=20), cfg.cpus[1]),
    }
    result: dict[str, float] = {}
    with CpuArbiter(f"bench{os.getpid()}", mechanism=mechanism) as arb:
        procs = {}
        try:
            for name, (settings, cpu) in spec.items():
                arb.add_partition(name, settings)
                procs[name] = subprocess.Popen(
                    [sys.executable, "-c", BUSY, str(cpu), str(window + 10)]
                )
                arb.attach(name, procs[name].pid)
            arb.start()
            ps = {n: psutil.Process(p.pid) for n, p in procs.items()}
            time.sleep(0.5)  # settle

            def measure() -> None:
                t0 = {n: _cpu_s(p) for n, p in ps.items()}
                w0 = time.monotonic()
                time.sleep(window)  # the measurement window
                t1 = {n: _cpu_s(p) for n, p in ps.items()}
                wall = time.monotonic() - w0
                d = {n: t1[n] - t0[n] for n in t0}
                result["a_share_percent"] = 100 * d["a"] / max(1e-9, d["a"] + d["b"])
                result["c_percent_of_one_cpu"] = 100 * d["c"] / wall
                result["pair_percent_of_one_cpu"] = 100 * (d["a"] + d["b"]) / wall

            benchmark.pedantic(measure, rounds=1, iterations=1)
            result["reported_usage_percent"] = {
                n: u.usage_percent for n, u in arb.usage().items()
            }  # type: ignore[assignment]
        finally:
            for p in procs.values():
                p.kill()
                p.wait()
    result["a_share_error_points"] = abs(result["a_share_percent"] - 25.0)
    benchmark.extra_info.update(
        {
            "kind": "cpu share",
            "mechanism": mechanism,
            "window_s": window,
            "setup": "a weight 1 + b weight 3 busy on one CPU; c limit 20 % busy on another",
            "targets": "a share 25 +- 3 points; c <= 21 %",
            **result,
        }
    )
    print(
        f"\n{mechanism}: weights 1:3 -> {result['a_share_percent']:.1f} / "
        f"{100 - result['a_share_percent']:.1f}; 20 % limit -> "
        f"{result['c_percent_of_one_cpu']:.1f} %"
    )
