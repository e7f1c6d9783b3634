"""The partition side of bench_channels.py (``VIRIDIAN_PARTITION_HOOK``).

``viridian up`` passes ``VIRIDIAN_PARTITION_HOOK=benchmarks.channel_hook:run``
to every partition; each calls ``run(runtime)`` after boot, before its loop.

* Every partition pins itself (``VIRIDIAN_BENCH_CHANNEL_CPUS`` = "P,C": the
  children, which write, on P; the root, which reads, on C), as the bare-ring
  workers of benchmarks/harness.py are pinned.
* A child registers an ``on_channel_open`` callback.  When its echo channel
  opens it does the first round trip at once (in echo mode), so the set-up
  latency is: the child processing OFFERCHANNEL (``GuestChannel.offered_at``)
  -> the first echo completion received over the new channel, with the
  steps between (ring pages allocated, zeroed and shared and the GPADL
  posted; GPADL_CREATED received; OPENCHANNEL_RESULT received).  Then it
  connects to the benchmark's socket (``VIRIDIAN_BENCH_CHANNEL_SOCK``), says
  hello (name, pid, mode, the set-up timestamps) and serves the benchmark's
  commands from its loop (``rt.watch`` on the socket), one JSON line each:

  ``pings``  k timed ``EchoVsc.echo(payload)`` round trips after w untimed ones;
  ``round``  n messages through the channel's outgoing ring with
             ``ViridianBatchProducer`` (``write_many`` of k, ``wait_writable``
             on the channel's doorbell: the bare ring's producer, unchanged),
             then wait until the root has read everything (the ring is empty);
  ``stats``  the channel's counters (``Channel.stats``);
  ``quit``   close the connection.

  A command blocks the child's loop while it runs (nothing else needs it).
* ``VIRIDIAN_BENCH_CHANNEL_PROFILE=DIR`` (diagnostics, not used by the
  benchmark): the root runs its loop under cProfile and writes
  DIR/root-PID.prof when it stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any

ENV_SOCK = "VIRIDIAN_BENCH_CHANNEL_SOCK"
ENV_CPUS = "VIRIDIAN_BENCH_CHANNEL_CPUS"
ENV_PROFILE = "VIRIDIAN_BENCH_CHANNEL_PROFILE"
WAIT_S = 20.0


def _pin(rt: Any) -> list[int]:
    cpus = os.environ.get(ENV_CPUS, "")
    if cpus:
        producer, consumer = (int(x) for x in cpus.split(","))
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {consumer if rt.role == "root" else producer})
    return sorted(os.sched_getaffinity(0))


def run(rt: Any) -> None:
    affinity = _pin(rt)
    if rt.role == "root":
        prof_dir = os.environ.get(ENV_PROFILE)
        if prof_dir:
            _profile_loop(rt, prof_dir)
        return
    rt.start()
    phases = _time_phases(rt.vmbus)
    rt.vmbus.on_channel_open.append(lambda gc: _opened(rt, gc, affinity, phases))


def _time_phases(guest: Any) -> dict[int, dict[str, float]]:
    """Timestamps of the set-up's steps, per relid (wrappers on this
    partition's VmbusGuest instance): ring pages ready, shared and the GPADL
    posted (``_setup`` returns); GPADL_CREATED received."""
    phases: dict[int, dict[str, float]] = {}
    setup, created = guest._setup, guest.gpadl_created

    def timed_setup(gc: Any) -> None:
        setup(gc)
        phases.setdefault(gc.relid, {})["gpadl_sent_at"] = time.monotonic()

    def timed_created(relid: int, gpadl: int, status: int) -> None:
        phases.setdefault(relid, {})["gpadl_created_at"] = time.monotonic()
        created(relid, gpadl, status)

    guest._setup, guest.gpadl_created = timed_setup, timed_created
    return phases


def _profile_loop(rt: Any, prof_dir: str) -> None:
    import cProfile

    inner = rt.run

    def profiled() -> int:
        prof = cProfile.Profile()
        try:
            return prof.runcall(inner)
        finally:
            prof.dump_stats(os.path.join(prof_dir, f"root-{os.getpid()}.prof"))

    rt.run = profiled


def _opened(rt: Any, gc: Any, affinity: list[int], phases: dict[int, dict[str, float]]) -> None:
    vsc = gc.vsc
    setup: dict[str, Any] = {"offered_at": gc.offered_at, "opened_at": gc.opened_at}
    if vsc.mode == 0:  # echo: the first round trip, right now
        vsc.echo(b"\x00" * 64)
        t = time.monotonic()
        ph = phases.get(gc.relid, {})
        sent, created = ph.get("gpadl_sent_at"), ph.get("gpadl_created_at")
        setup.update(first_echo_at=t,
                     offer_to_open_ms=(gc.opened_at - gc.offered_at) * 1e3,
                     open_to_first_echo_ms=(t - gc.opened_at) * 1e3,
                     offer_to_first_echo_ms=(t - gc.offered_at) * 1e3)
        if sent is not None and created is not None:
            setup.update(offer_to_gpadl_sent_ms=(sent - gc.offered_at) * 1e3,
                         gpadl_sent_to_created_ms=(created - sent) * 1e3,
                         gpadl_created_to_open_ms=(gc.opened_at - created) * 1e3)
    path = os.environ.get(ENV_SOCK)
    if not path:
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        rt.log("bench: no benchmark socket", level="warning", error=str(e))
        sock.close()
        return
    peer = _Peer(rt, gc, sock)
    peer.send({"op": "hello", "name": rt.name, "pid": os.getpid(), "relid": gc.relid,
               "mode": "echo" if vsc.mode == 0 else "sink", "setup": setup,
               "affinity": affinity,
               "ring_data_bytes": gc.channel.outgoing.data_bytes,
               "max_payload": gc.channel.outgoing.max_payload_bytes})
    rt.watch(sock.fileno(), peer.on_readable)


class _Peer:
    """The benchmark's connection, served from the child's loop."""

    def __init__(self, rt: Any, gc: Any, sock: socket.socket) -> None:
        self.rt, self.gc, self.sock = rt, gc, sock
        self.rfile = sock.makefile("rb")

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def close(self) -> None:
        self.rt.unwatch(self.sock.fileno())
        self.rfile.close()
        self.sock.close()

    def on_readable(self) -> None:
        line = self.rfile.readline()
        if not line:
            self.close()
            return
        cmd = json.loads(line)
        op = cmd.get("op")
        try:
            if op == "quit":
                self.send({"op": "bye", "stats": self._stats()})
                self.close()
                return
            if self.gc.channel is None or self.gc.vsc is None or self.gc.vsc.closed:
                raise RuntimeError("the channel is gone")
            if op == "pings":
                self.send({"op": "lat", "lat": self._pings(**cmd["args"])})
            elif op == "round":
                self.send({"op": "done", **self._round(**cmd["args"])})
            elif op == "stats":
                self.send({"op": "stats", "stats": self._stats()})
            else:
                raise ValueError(f"unknown command {op!r}")
        except Exception as e:
            import traceback

            self.send({"op": "error", "error": f"{type(e).__name__}: {e}",
                       "trace": traceback.format_exc()})

    def _stats(self) -> dict[str, Any]:
        ch = self.gc.channel
        return ch.stats() if ch is not None and not ch.closed else {}

    def _pings(self, size: int, k: int, w: int) -> list[int]:
        """``EchoVsc.echo`` w + k times; the last k timed (ns)."""
        echo = self.gc.vsc.echo
        msg = b"\x01" * size
        pc = time.perf_counter_ns
        lat: list[int] = []
        app = lat.append
        m = b""
        for _ in range(w + k):
            t0 = pc()
            m = echo(msg)
            app(pc() - t0)
        if m[:size] != msg:
            raise RuntimeError("bad echo")
        return lat[w:]

    def _round(self, size: int, n: int, k: int, rid: int) -> dict[str, Any]:
        """n messages with the bare ring's producer, then wait until the root
        has read them all (our outgoing ring is empty)."""
        from .transports import FILL, ViridianBatchProducer, marked

        ch = self.gc.channel
        out, bell = ch.outgoing, ch.doorbell
        prod = ViridianBatchProducer.on_ring(out, bell, size, k)
        msg = FILL * size
        waits0 = bell.waits
        t0 = time.perf_counter()
        prod.run(n, msg, marked(msg, rid))
        t1 = time.perf_counter()
        # Empty: more than data_bytes - 8 free (indices are 8-aligned).  The
        # reader signals when it crosses that (pending_send_sz).
        if not out.wait_writable(out.data_bytes - 8, bell, WAIT_S):
            raise TimeoutError("the root did not read the ring empty")
        t2 = time.perf_counter()
        return {"n": n, "rid": rid, "write_s": t1 - t0, "drain_s": t2 - t1,
                "secs": t2 - t0, "doorbell_waits": bell.waits - waits0}
