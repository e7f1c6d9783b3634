"""iceoryx2 leaves nothing behind: its shared memory and files live under a
prefix and a root directory of the pair's own, removed when the pair closes,
however its workers ended; and those of a benchmark run killed outright are
removed by the next setup (transports.iox_sweep_dead)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import tempfile

import pytest

from . import transports as tr
from .harness import BenchConfig, check_n, open_stream_pair

pytestmark = pytest.mark.multiprocess


def _traces(prefix: str, root: str) -> list[str]:
    shm = [e for e in os.listdir(tr.IOX_SHM) if e.startswith(prefix)]
    return shm + ([root] if os.path.exists(root) else [])


@pytest.mark.usefixtures("bench_cfg")  # (two CPUs, as every pair needs)
def test_an_iceoryx2_pair_whose_workers_are_killed_leaves_nothing():
    pytest.importorskip("iceoryx2", reason="iceoryx2 is not installed (the 'bench' extra)")
    cfg = BenchConfig.from_env(benchmark_disabled=True)
    with open_stream_pair("iceoryx2", 64, cfg, None) as pair:
        pair.check(check_n(64))
        _, prefix, root = pair.setup.a_args
        assert _traces(prefix, root), "iceoryx2 made nothing under its private names"
        for p in pair.procs:
            os.kill(p.pid, signal.SIGKILL)
    assert _traces(prefix, root) == []


def test_the_state_of_a_killed_benchmark_run_is_swept():
    child = mp.get_context("spawn").Process(target=int)
    child.start()
    child.join(30)
    dead = child.pid  # a benchmark run that was killed: its pid is gone
    shm = os.path.join(tr.IOX_SHM, f"{tr.IOX_TAG}{dead}x1_stale.dynamic")
    with open(shm, "wb"):
        pass
    root = tempfile.mkdtemp(prefix=f"{tr.IOX_ROOT}{dead}-")
    mine = os.path.join(tr.IOX_SHM, f"{tr.IOX_TAG}{os.getpid()}x999_live")  # a live run's
    with open(mine, "wb"):
        pass
    try:
        gone = tr.iox_sweep_dead()
        assert shm in gone and root in gone
        assert not os.path.exists(shm) and not os.path.exists(root)
        assert os.path.exists(mine)
    finally:
        for f in (shm, mine):
            if os.path.exists(f):
                os.unlink(f)
        if os.path.exists(root):
            os.rmdir(root)
