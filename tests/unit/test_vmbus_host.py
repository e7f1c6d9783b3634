"""The root's VMBus host, the parts that need no processes: the doorbell-flood rule."""

from types import SimpleNamespace

from partitions.root.vmbus_host import FLOOD_RATIO, FLOOD_SPURIOUS, HostChannel, VmbusHost


def _channel() -> tuple[HostChannel, SimpleNamespace, list[str]]:
    fails: list[str] = []
    vsp = SimpleNamespace(last_activity=0)
    hc = HostChannel(1, None, None, vsp)  # type: ignore[arg-type]
    bus = SimpleNamespace(fail=lambda _hc, reason, level="warning": fails.append(reason))
    return hc, bus, fails


def test_a_busy_honest_channel_is_no_doorbell_flood() -> None:
    # thousands of empty wake-ups a second, but fewer than the packets read
    hc, bus, fails = _channel()
    for _ in range(4 * FLOOD_SPURIOUS):
        hc.vsp.last_activity += 2
        VmbusHost._spurious(None, bus, hc)  # type: ignore[arg-type]
    assert fails == []


def test_a_doorbell_flood_closes_the_channel_once_past_the_threshold() -> None:
    hc, bus, fails = _channel()
    hc.vsp.last_activity = 100  # some real traffic before the flood
    calls = 0
    while not fails and calls < 10 * FLOOD_SPURIOUS:
        VmbusHost._spurious(None, bus, hc)  # type: ignore[arg-type]
        calls += 1
    assert calls == FLOOD_SPURIOUS + 1 > FLOOD_RATIO * 100
    assert len(fails) == 1 and "doorbell flood" in fails[0]
