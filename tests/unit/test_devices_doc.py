"""docs/devices.md, run as written: its files become a device folder that
partitions.devices imports, and its other Python blocks run in order."""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "devices.md"
FENCE = re.compile(r"^```python(?: file=(\S+))?\n(.*?)^```", re.S | re.M)


def test_the_devices_guide_runs_as_written(tmp_path: Path) -> None:
    import partitions.devices as devices
    from partitions.devices.framework import DEVICES

    blocks = FENCE.findall(DOC.read_text())
    files = [(name, code) for name, code in blocks if name]
    steps = [code for name, code in blocks if not name]
    assert files and steps
    prefix = "partitions/devices/"
    for name, code in files:  # the new device's folder, as the guide lays it out
        assert name.startswith(prefix), name
        target = tmp_path / name[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code)
    devices.__path__.append(str(tmp_path))
    ns: dict = {}
    try:
        for i, code in enumerate(steps):
            exec(compile(code, f"{DOC.name} (block {i + 1})", "exec"), ns)
        assert "upper" in DEVICES and DEVICES["upper"].vsp.__module__ == \
            "partitions.devices.upper.device"
    finally:
        devices.__path__.remove(str(tmp_path))
        DEVICES.pop("upper", None)
        for mod in [m for m in sys.modules if m.startswith("partitions.devices.upper")]:
            del sys.modules[mod]
