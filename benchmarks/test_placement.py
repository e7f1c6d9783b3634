"""The gate between rounds (harness.QuietGate): the vCPU placement probe
answers with a cache-line round trip; the wait for a shared L3 stops as soon
as the probe says so, or when the run's budget is spent (then the round is
measured anyway and counted as split); latency rounds are spread in time."""

from __future__ import annotations

import dataclasses
import time

import pytest

from .harness import BenchConfig, Placement, QuietGate


def _cfg(budget: float) -> BenchConfig:
    cfg = BenchConfig.from_env(benchmark_disabled=False)
    return dataclasses.replace(cfg, quick=False, placement_budget_s=budget,
                               quiet_budget_s=0.0)


class Script:
    """Probe answers in order, and the sleeps asked for (no real waiting)."""

    def __init__(self, *answers: float | None) -> None:
        self.answers, self.slept = list(answers), []

    def probe(self) -> float | None:
        return self.answers.pop(0)

    def sleep(self, s: float) -> None:
        self.slept.append(s)


@pytest.mark.multiprocess
@pytest.mark.usefixtures("bench_cfg")  # (two CPUs)
def test_the_c_probe_reports_a_cache_line_round_trip(ring_bench):
    if ring_bench is None:
        pytest.skip("gcc could not build benchmarks/c/ring_bench.c")
    ns = Placement(ring_bench, _cfg(0.0)).probe()
    assert ns is not None and 10 < ns < 100_000  # (ns; ~70-400 on the VM this was made on)


def test_the_wait_ends_when_the_vcpus_share_an_l3_again():
    s = Script(400.0, 380.0, 90.0)
    pl = Placement(None, _cfg(60.0), probe=s.probe, sleep=s.sleep)
    assert pl.wait_shared() == 90.0
    assert s.slept == [Placement.POLL_S] * 2 and pl.waited == 2 * Placement.POLL_S
    assert not s.answers


def test_the_wait_is_bounded_by_the_runs_budget_and_the_gate_counts_split_rounds():
    s = Script(*[400.0] * 5, 90.0, 420.0, 95.0, 100.0)
    pl = Placement(None, _cfg(1.2), probe=s.probe, sleep=s.sleep)
    gate = QuietGate(_cfg(1.2), [], pl)
    gate.setup()  # 400, then 0.5 + 0.5 + 0.2 s of waiting: 400, 400, 400; budget spent
    gate.teardown()  # after the round: 400
    assert s.slept == [0.5, 0.5, pytest.approx(0.2)] and pl.budget == pytest.approx(0.0)
    gate.setup()  # 90: no wait
    gate.teardown()  # 420: the placement changed during the round
    gate.setup()  # 95
    gate.teardown()  # 100
    m = gate.summary(3)
    assert (m["split_rounds"], m["placement_wait_s"]) == (2, 1.2)
    # the probes: 400, 400 | 90, 420 | 95, 100
    assert m["cacheline_ns_median"] == 250.0 and m["cacheline_ns_max"] == 420.0


def test_without_a_probe_nothing_waits_and_nothing_is_reported_split():
    pl = Placement(None, _cfg(60.0), sleep=lambda s: pytest.fail("waited"))
    assert pl.wait_shared() is None
    gate = QuietGate(_cfg(60.0), [], pl)
    gate.setup()
    gate.teardown()
    assert gate.summary(1)["split_rounds"] == 0


def test_rounds_are_spread_at_least_min_gap_apart():
    gate = QuietGate(_cfg(0.0), [], None, min_gap_s=0.05)
    gate.setup()
    gate.teardown()
    ended = time.monotonic()
    gate.setup()  # (a lower bound: time.sleep never returns early)
    assert time.monotonic() - ended >= 0.05
    gate.teardown()
