"""Streaming throughput, one way, between two pinned processes (issue 2 §8).

One measured op = "send N messages and wait until the consumer has all of
them" (N calibrated so that a round lasts about VIRIDIAN_BENCH_ROUND_S); the
worker processes are started once per benchmark and reused for every round.
Before the timed rounds each pair passes a check round (every message numbered
and checked).
"""

from __future__ import annotations

import statistics

import pytest

from .harness import (
    C_ROWS,
    SIZES,
    QuietGate,
    calibrate,
    check_n,
    open_stream_pair,
    size_label,
    skip_unless_available,
    stream_k,
    stream_opts,
)
from .transports import TRANSPORTS

# A failure before the measurement would add a second, misleading error.
NOT_USED_OK = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")

ROWS = [*TRANSPORTS, *C_ROWS]
PARAMS = [pytest.param(key, size, id=f"{size_label(size).replace(' ', '')}-{key}")
          for size in SIZES for key in ROWS]


def _label(key: str) -> str:
    return C_ROWS[key][2] if key in C_ROWS else TRANSPORTS[key].label


def _api(key: str, size: int, opts: dict) -> str:
    if key in C_ROWS:
        w, r, _ = C_ROWS[key]
        return {"write": "vmbr_write", "batch": "vmbr_write_batch(k)"}[w] + " / " + {
            "read": "vmbr_read", "drain": "vmbr_drain(256)"}[r]
    if key == "viridian-packet":
        out = "read_into(preallocated bytearray)" if opts["read_into"] else "try_read_payload()"
        return f"try_write / {out}"
    return TRANSPORTS[key].api


@pytest.mark.multiprocess
@NOT_USED_OK
@pytest.mark.parametrize(("key", "size"), PARAMS)
def test_stream(benchmark, key, size, bench_cfg, bench_store, ring_bench, placement):
    cfg = bench_cfg
    skip_unless_available(key, size, ring_bench)
    t = TRANSPORTS.get(key)

    k = stream_k(key, size, cfg)
    opts = stream_opts(key, size, cfg)
    benchmark.group = f"stream {size_label(size)}"
    with open_stream_pair(key, size, cfg, ring_bench, bench_store["notes"]) as pair:
        pair.check(check_n(size))
        n = calibrate(pair, size, k, cfg)
        info = {
            "kind": "stream",
            "transport": key,
            "label": _label(key),
            "api": _api(key, size, opts),
            "msg_size": size,
            "msgs_per_op": n,
            "bytes_per_op": n * size,
            "batch_k": k,
            "ring_data_bytes": cfg.ring_data if key in C_ROWS or (t and t.ring_bytes) else None,
            "pinning": {"producer_cpu": cfg.cpus[0], "consumer_cpu": cfg.cpus[1],
                        "reported": pair.ready},
        }
        benchmark.extra_info.update(info)
        before = len(pair.timings)
        last: list = []
        gate = QuietGate(cfg, pair.pids, placement)
        benchmark.pedantic(lambda: last.append(pair.round(n)), setup=gate.setup,
                           teardown=gate.teardown, rounds=cfg.rounds,
                           warmup_rounds=cfg.warmup, iterations=1)
        own = pair.timings[before:][-cfg.rounds:]
        machine = gate.summary(cfg.rounds)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats else statistics.median(own)
    mps = n / median
    res = {
        **info,
        "median_s": median,
        "min_s": min(own),
        "max_s": max(own),
        "rounds": len(own),
        "msgs_per_s": mps,
        "GB_per_s": mps * size / 1e9,
        "round_msgs_per_s": [n / x for x in own],
        "worker_stats": {**pair.bye, "last_round": last[-1] if last else None},
        "machine": machine,
    }
    benchmark.extra_info.update(msgs_per_s=mps, GB_per_s=mps * size / 1e9,
                                round_median_s=median, machine=machine)
    bench_store["stream"].setdefault(key, {})[str(size)] = res
