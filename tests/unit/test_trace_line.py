"""`viridian trace`'s line format over events a partition sent (hostile values included)."""

from __future__ import annotations

from partitions.cli.views import trace_line


def test_trace_line_directions_and_packets() -> None:
    line = trace_line("root", {"t": 0, "dir": "in", "peer": "child1", "what": "packet",
                               "relid": 1, "type": 6, "flags": 1, "trans_id": 42, "len": 64})
    assert " root   < child1 relid 1 packet type=0x6 flags=0x1 trans_id=42 len=64" in line
    assert " > " in trace_line("child1", {"dir": "out", "peer": "root", "what": "OFFER"})


def test_trace_line_survives_values_of_any_type() -> None:
    for bad in ([], {}, 5, None, "sideways"):
        line = trace_line("child1", {"dir": bad, "peer": ["x"], "what": {"y": 1}, "relid": "z",
                                     "t": "now", "fields": 3})
        assert " - " in line  # no direction: '-'
