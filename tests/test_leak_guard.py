"""The leak guard of conftest.py, run on tests that leak (in a subprocess)."""

from __future__ import annotations

import uuid
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
    open(f"/dev/shm/viridian-leak-guard-{os.environ['LEAK_GUARD_TAG']}", "w").close()

def test_fails_and_leaks_an_fd():
    fds = os.pipe()
    assert not fds  # the failure is reported; the fds its traceback holds are not

def test_next_one_is_not_blamed():
    pass
"""


def test_leak_guard_fails_leaky_tests_and_cleans_up(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = uuid.uuid4().hex
    leak = Path(f"/dev/shm/viridian-leak-guard-{tag}")
    monkeypatch.setenv("LEAK_GUARD_TAG", tag)
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_leaky=LEAKY)
    try:
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "-W", "ignore::ResourceWarning", timeout=60
        )
    finally:
        leak.unlink(missing_ok=True)  # the guard reports shm leaks; it never unlinks
    result.assert_outcomes(passed=5, failed=1, errors=3)
    out = result.stdout.str()
    assert "ERROR at teardown of test_leaks_an_fd" in out
    assert "file descriptors left open" in out and "pipe:" in out
    assert "ERROR at teardown of test_leaks_a_child" in out
    assert "child processes left running (killed)" in out
    assert "ERROR at teardown of test_leaks_a_shm_entry" in out
    assert f"/dev/shm entries left behind: ['viridian-leak-guard-{tag}']" in out
    assert "ERROR at teardown of test_fails_and_leaks_an_fd" not in out
    assert "ERROR at teardown of test_next_one_is_not_blamed" not in out
