"""CPU used by an idle reader (issue 2 §8: must stay below 1 %).

A reader process (pinned to the consumer CPU) calls
``IncomingRing.wait_readable(doorbell, VIRIDIAN_BENCH_IDLE_S)`` on an empty
ring with the default spin: it spins briefly, unmasks interrupts and blocks on
its eventfd doorbell until the timeout.  The parent measures the reader's CPU
time with psutil (user + system) over that wait; /proc/PID/schedstat gives a
nanosecond cross-check (psutil counts in clock ticks).  Then the parent writes
one packet and checks that the doorbell wakes the reader.
"""

from __future__ import annotations

import time

import psutil
import pytest

from . import transports as tr
from .harness import PyPair

# A failure before the measurement would add a second, misleading error.
NOT_USED_OK = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")


def _schedstat_ns(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.multiprocess
@NOT_USED_OK
def test_idle_reader_cpu(benchmark, bench_cfg, bench_store):
    from vmbus.ring import DEFAULT_SPIN_NS

    cfg = bench_cfg
    benchmark.group = "idle reader"
    setup, writer = tr.idle_setup(cfg.ring_data)
    try:
        pair = PyPair("idle", 0, cfg, setup, ("idle", None), {})
    except BaseException:
        setup.cleanup()
        raise
    out: dict = {}
    try:
        proc = psutil.Process(pair.pids[0])

        def idle_op() -> None:
            _, pid = pair.idle("idle", cfg.idle_s)
            c0, s0, w0 = proc.cpu_times(), _schedstat_ns(pid), time.monotonic()
            res = pair.idle_done("idle", cfg.idle_s)
            c1, s1, w1 = proc.cpu_times(), _schedstat_ns(pid), time.monotonic()
            wall = w1 - w0
            out.update(
                psutil_cpu_s=(c1.user + c1.system) - (c0.user + c0.system),
                wall_s=wall,
                schedstat_cpu_s=(s1 - s0) / 1e9 if s0 is not None and s1 is not None else None,
                reader=res,
            )

        benchmark.extra_info.update(kind="idle", transport="viridian", msg_size=0,
                                    msgs_per_op=0, bytes_per_op=0, spin_ns=DEFAULT_SPIN_NS,
                                    pinning={"reader_cpu": cfg.cpus[1],
                                             "reported": pair.ready})
        benchmark.pedantic(idle_op, rounds=1, warmup_rounds=0, iterations=1)

        # The doorbell must still wake it: one packet from the parent.
        pair.idle("wake", 10.0)
        t0 = time.monotonic()
        assert writer.try_write(b"w" * 64)
        woke = pair.idle_done("wake", 10.0)
        out["wake"] = {**woke, "parent_wait_s": time.monotonic() - t0}
        out["pinning"] = pair.ready
    finally:
        pair.close()
    assert not out["reader"]["woke"], "the idle reader woke up with nothing to read"
    assert out["wake"]["woke"] and out["wake"]["payload"] == 64, out["wake"]
    pct = 100.0 * out["psutil_cpu_s"] / out["wall_s"]
    sched = out["schedstat_cpu_s"]
    out.update(cpu_percent=pct,
               schedstat_percent=100.0 * sched / out["wall_s"] if sched is not None else None,
               idle_s=cfg.idle_s, spin_ns=DEFAULT_SPIN_NS)
    benchmark.extra_info.update(cpu_percent=pct, schedstat_percent=out["schedstat_percent"])
    bench_store["idle"] = out
