"""64 B round-trip latency between two pinned processes (issue 2 §8).

Closed-loop ping-pong: the pinger (first CPU) writes 64 B, waits for the echo
from the ponger (second CPU) and times each round trip with
perf_counter_ns / CLOCK_MONOTONIC.  One measured op = one round of
VIRIDIAN_BENCH_LAT_PINGS round trips, after VIRIDIAN_BENCH_LAT_SKIP unrecorded
ones (they absorb the ponger's wake-up from the idle gap between rounds, an
artefact of the harness).  Percentiles pool every timed round trip.

Rows: Viridian with the default spin-then-block wait: ``IncomingRing.exchange``
on both sides (the request/answer call: the write and the spinning read of the
answer in one C call while the peer polls), the same round trip as two calls
(``try_write`` + ``read_payload``), and again with ``read`` (a Packet per
message: ~0.2 us more per side, see docs/ring.md); blocking only (spin_ns=0,
``try_write`` + ``read_payload``); the same C ring driven from C with both
waits; and two blocking eventfds in C, the floor for any blocking hand-off
between two CPUs.
"""

from __future__ import annotations

import pytest

from . import transports as tr
from .harness import CPair, PyPair, QuietGate, percentiles

# A failure before the measurement would add a second, misleading error.
NOT_USED_OK = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")

ROWS = {
    "viridian-spin": "Viridian, spin then block (default spin)",
    "viridian-spin-2call": "  the same, try_write + read_payload",
    "viridian-spin-packet": "  the same, try_write + read() -> Packet",
    "viridian-block": "Viridian, blocking only (spin_ns=0)",
    "c-ring-spin": "C ring from C, spin then block",
    "c-ring-block": "C ring from C, blocking only",
    "c-eventfd": "C eventfd ping-pong (floor)",
}
# How each Viridian row makes a round trip (transports.ViridianPingEnd).
CALLS = {"viridian-spin": "exchange", "viridian-spin-2call": "read_payload",
         "viridian-spin-packet": "read", "viridian-block": "read_payload"}


def _open(key, cfg, ring_bench):
    from vmbus.ring import DEFAULT_SPIN_NS

    if key.startswith("c-"):
        if ring_bench is None:
            pytest.skip("gcc could not build benchmarks/c/ring_bench.c")
        mode = "eventfd" if key == "c-eventfd" else "ring"
        spin = 0 if key != "c-ring-spin" else DEFAULT_SPIN_NS
        return CPair(ring_bench, ["pingpong", mode, str(cfg.cpus[0]), str(cfg.cpus[1]),
                                  str(spin), str(cfg.ring_data)], cfg, key), spin
    spin = 0 if key == "viridian-block" else None
    setup = tr.viridian_pingpong_setup(cfg.ring_data)
    try:
        pair = PyPair(key, 64, cfg, setup, ("pinger", "ponger"),
                      {"spin_ns": spin, "calls": CALLS[key]})
    except BaseException:
        setup.cleanup()
        raise
    return pair, DEFAULT_SPIN_NS if spin is None else spin


@pytest.mark.multiprocess
@NOT_USED_OK
@pytest.mark.parametrize("key", list(ROWS))
def test_latency(benchmark, key, bench_cfg, bench_store, ring_bench, placement):
    cfg = bench_cfg
    benchmark.group = "latency 64 B round trip"
    pair, spin = _open(key, cfg, ring_bench)
    try:
        info = {
            "kind": "latency",
            "transport": key,
            "label": ROWS[key],
            "msg_size": 64,
            "msgs_per_op": cfg.lat_pings,
            "bytes_per_op": 64 * cfg.lat_pings,
            "spin_ns": spin if key != "c-eventfd" else None,
            "calls": CALLS.get(key, "C"),
            "pinning": {"pinger_cpu": cfg.cpus[0], "ponger_cpu": cfg.cpus[1],
                        "reported": pair.ready},
        }
        benchmark.extra_info.update(info)
        rounds: list[list[int]] = []
        gate = QuietGate(cfg, pair.pids, placement, min_gap_s=cfg.lat_gap_s)
        benchmark.pedantic(lambda: rounds.append(pair.pings(cfg.lat_pings, cfg.lat_skip)),
                           setup=gate.setup, teardown=gate.teardown, rounds=cfg.lat_rounds,
                           warmup_rounds=0 if cfg.quick else 1, iterations=1)
        machine = gate.summary(cfg.lat_rounds)
    finally:
        pair.close()
    samples = [x for r in rounds[-cfg.lat_rounds:] for x in r]
    pct = percentiles(samples)
    benchmark.extra_info.update(pct, machine=machine)
    bench_store["latency"][key] = {**info, **pct, "worker_stats": pair.bye,
                                   "machine": machine, "rounds": cfg.lat_rounds}
