"""The fuzz harnesses stay runnable: each replays its seeds and a few hundred
random inputs (mutated seeds, random bytes) without atheris, in the default
suite, so a harness that rots (an API it calls changed, a seed no longer
valid) fails here rather than in CI's fuzz smoke.  The harnesses' own checks
apply: any exception that escapes is a failure.  Plus a short real run of one
harness under atheris, skipped when atheris is not installed.
"""

from __future__ import annotations

import importlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NAMES = sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))
RANDOM_INPUTS = 300


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    b = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        how = rng.randrange(4)
        if how == 0 and b:  # flip a byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif how == 1:  # insert bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif how == 2 and b:  # cut
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 16)]
        else:  # an interesting value
            i = rng.randrange(len(b) + 1)
            b[i : i + 4] = rng.choice([b"\0\0\0\0", b"\xff\xff\xff\xff", b"\x00\x10\0\0",
                                       b"\x07\0\0\0", b"\x80\0\0\0"])
    return bytes(b)


@pytest.mark.parametrize("name", NAMES)
def test_harness_replays_seeds_and_random_inputs(name: str) -> None:
    mod = importlib.import_module(f"fuzz_{name}")
    try:
        seeds = list(mod.seeds())
        assert seeds, "a harness needs seeds"
        for s in seeds:
            mod.TestOneInput(s)
        rng = random.Random(f"fuzz-{name}")
        for i in range(RANDOM_INPUTS):
            if i % 3 == 0:
                data = rng.randbytes(rng.randint(0, 300))
            else:
                data = _mutate(rng, rng.choice(seeds))
            mod.TestOneInput(data)
    finally:
        if hasattr(mod, "close"):
            mod.close()


def test_a_harness_runs_under_atheris(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (pip install -e '.[dev]')")
    out = subprocess.run(
        [sys.executable, str(HERE / "run.py"), "vmbus_messages", "--runs", "2000",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vmbus_messages: " in out.stdout and "0 findings" in out.stdout, out.stdout
