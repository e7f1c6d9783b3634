"""The leak guard of conftest.py, run on tests that leak (in a subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

LEAKY = """
import os, subprocess, sys, uuid

def test_clean():
    r, w = os.pipe()
    os.close(r)
    os.close(w)

def test_leaks_an_fd():
    os.pipe()

def test_leaks_a_child():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

def test_leaks_a_shm_entry():
    open(f"/dev/shm/viridian-leak-guard-{uuid.uuid4().hex}", "w").close()

def test_fails_and_leaks_an_fd():
    fds = os.pipe()
    assert not fds  # the failure is reported; the fds its traceback holds are not

def test_next_one_is_not_blamed():
    pass
"""


def test_leak_guard_fails_leaky_tests_and_cleans_up(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-W", "ignore::ResourceWarning", timeout=60
    )
    result.assert_outcomes(passed=5, failed=1, errors=3)
    out = result.stdout.str()
    assert "ERROR at teardown of test_leaks_an_fd" in out
    assert "file descriptors left open" in out and "pipe:" in out
    assert "ERROR at teardown of test_leaks_a_child" in out
    assert "child processes left running (killed)" in out
    assert "ERROR at teardown of test_leaks_a_shm_entry" in out
    assert "/dev/shm entries left behind (unlinked)" in out
    assert "ERROR at teardown of test_fails_and_leaks_an_fd" not in out
    assert "ERROR at teardown of test_next_one_is_not_blamed" not in out
    assert not [n for n in Path("/dev/shm").iterdir() if "viridian-leak-guard" in n.name]
