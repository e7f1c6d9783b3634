"""Issue 2's ratios measured head to head (issue 2's targets are ratios
between rows of one run).

This machine is a shared 2-vCPU VM whose speed shifts from one minute to the
next: the C ring alone streamed 64 KiB at 33 GB/s and at 63 GB/s within ten
minutes, and the pure-Python ring at 64 B at 1.6M and 3.2M msgs/s.  The rows of
bench_stream.py and bench_latency.py run one after another, minutes apart, so a
ratio of two rows can compare two different machines.  Here the two transports
of each target run side by side (both worker pairs started, each idle on its
control pipe while the other runs) and their rounds alternate, A B B A A B ...,
so that both see the same machine; the target is judged on the median of the
per-round ratios (streams) or on the pooled p50s (latency).  The separate rows
stay in the main table; the report prints both figures.
"""

from __future__ import annotations

import contextlib
import statistics

import pytest

from .bench_latency import _open as open_pingpong
from .harness import (
    QuietGate,
    calibrate,
    check_n,
    open_stream_pair,
    percentiles,
    skip_unless_available,
    stream_k,
)

NOT_USED_OK = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")

# id: (kind, size, A, B); a target's ratio is A / B (streams: msgs/s; latency: p50).
PAIRS = {
    "64B-viridian-packet-vs-pyring": ("stream", 64, "viridian-packet", "pyring"),
    "64B-viridian-packet-vs-mp-queue": ("stream", 64, "viridian-packet", "mp-queue"),
    "64B-viridian-batch-vs-c-ring": ("stream", 64, "viridian-batch", "c-ring"),
    "64KiB-viridian-batch-vs-c-ring-batch": ("stream", 65536, "viridian-batch", "c-ring-batch"),
    "64KiB-viridian-packet-vs-c-ring": ("stream", 65536, "viridian-packet", "c-ring"),
    "64KiB-viridian-batch-vs-iceoryx2": ("stream", 65536, "viridian-batch", "iceoryx2"),
    "rtt-viridian-block-vs-c-eventfd": ("latency", 64, "viridian-block", "c-eventfd"),
}


@pytest.mark.multiprocess
@NOT_USED_OK
@pytest.mark.parametrize("pid", list(PAIRS))
def test_paired(benchmark, pid, bench_cfg, bench_store, ring_bench, placement):
    cfg = bench_cfg
    kind, size, a, b = PAIRS[pid]
    for key in (a, b):
        skip_unless_available(key, size, ring_bench)
    benchmark.group = "head to head"
    with contextlib.ExitStack() as stack:
        pairs = {}
        if kind == "stream":
            ns = {}
            for key in (a, b):
                pair = stack.enter_context(
                    open_stream_pair(key, size, cfg, ring_bench, bench_store["notes"]))
                pair.check(check_n(size))
                ns[key] = calibrate(pair, size, stream_k(key, size, cfg), cfg)
                pairs[key] = pair
        else:
            for key in (a, b):
                pair, _spin = open_pingpong(key, cfg, ring_bench)
                stack.callback(pair.close)
                pairs[key] = pair
        samples: dict[str, list] = {a: [], b: []}
        flip = [False]

        def one_round() -> None:
            order = (b, a) if flip[0] else (a, b)
            flip[0] = not flip[0]
            for key in order:
                p = pairs[key]
                if kind == "stream":
                    p.round(ns[key])
                    samples[key].append(ns[key] / p.timings[-1])
                else:
                    samples[key].append(p.pings(cfg.lat_pings, cfg.lat_skip))

        gate = QuietGate(cfg, [pid_ for p in pairs.values() for pid_ in p.pids], placement,
                         min_gap_s=0.0 if kind == "stream" else cfg.lat_gap_s)
        rounds = cfg.rounds if kind == "stream" else cfg.lat_rounds
        warm = cfg.warmup if kind == "stream" else 0 if cfg.quick else 1  # (as the rows)
        benchmark.pedantic(one_round, setup=gate.setup, teardown=gate.teardown,
                           rounds=rounds, warmup_rounds=warm, iterations=1)
        machine = gate.summary(rounds)
    res: dict = {"kind": kind, "size": size, "a": a, "b": b, "rounds": rounds,
                 "machine": machine}
    if kind == "stream":
        ra, rb = samples[a][-rounds:], samples[b][-rounds:]
        rr = [x / y for x, y in zip(ra, rb, strict=True)]
        res.update(a_msgs_per_s=statistics.median(ra), b_msgs_per_s=statistics.median(rb),
                   ratio=statistics.median(rr), round_ratios=rr)
    else:
        pa = percentiles([x for r in samples[a][-rounds:] for x in r])
        pb = percentiles([x for r in samples[b][-rounds:] for x in r])
        res.update(a_p50_us=pa["p50_us"], b_p50_us=pb["p50_us"],
                   ratio=pa["p50_us"] / pb["p50_us"])
    benchmark.extra_info.update(res)
    bench_store["paired"][pid] = res
