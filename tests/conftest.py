"""Suite-wide fixtures: every test must leave the OS as it found it.

``_no_leaks`` (autouse) snapshots, before each test, the entries of /dev/shm,
this process's open file descriptors and its child processes, and compares
after the test.  Anything new fails the test (as a teardown error).  Leftover
children are killed and reaped first, so one leaky test cannot make the next
one fail too; a /dev/shm entry is only reported, never unlinked (the next
test's snapshot includes it): /dev/shm records no creator, and unlinking what
might be another program's object would break that program.  Leaked fds are only
reported, never closed: an fd belongs to some live object (an mmap keeps its
own dup), and closing it behind that object's back would corrupt whatever
reuses the number.

When the test itself already failed, its traceback keeps its locals (and so
their fds) alive; the fd check is skipped then, to report one failure once.

/dev/shm is machine-wide: other programs (a benchmark run next to the suite,
say) create entries there while a test runs.  A new entry that a process
outside this one's tree has open or mapped is theirs and is left alone; only
the others count as this test's leak.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import psutil
import pytest

pytest_plugins = ["pytester"]  # tests/test_leak_guard.py runs this file on leaky tests

_SHM = "/dev/shm"
_FD_DIR = "/proc/self/fd"


def _fds() -> dict[int, str]:
    """Open fds of this process -> what they point at."""
    out = {}
    for name in os.listdir(_FD_DIR):
        fd = int(name)
        try:
            out[fd] = os.readlink(f"{_FD_DIR}/{name}")
        except OSError:  # the fd listdir itself used, already closed
            continue
    return out


def _tolerated_fd(target: str) -> bool:
    # The directory fd that os.listdir(/proc/self/fd) itself had open.
    return target.startswith("/proc/")


def _shm() -> set[str]:
    try:
        return set(os.listdir(_SHM))
    except FileNotFoundError:
        return set()


def _foreign_holders(names: set[str]) -> set[str]:
    """Those of the /dev/shm entries that another process has open or mapped."""
    paths = {f"{_SHM}/{n}": n for n in names}
    held: set[str] = set()
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(_SHM + "/")
                    if i >= 0 and (n := paths.get(line[i:].rstrip("\n"))) is not None:
                        held.add(n)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                n = paths.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
                if n is not None:
                    held.add(n)
        except OSError:  # gone, or not ours to look at
            continue
    return held


def _child_pids(pid: int) -> list[int]:
    """Direct children, from /proc/PID/task/*/children (no scan of all of /proc)."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out.extend(map(int, f.read().split()))
    return out


def _children() -> dict[int, psutil.Process]:
    try:
        pids, todo = [], [os.getpid()]
        while todo:
            kids = _child_pids(todo.pop())
            pids += kids
            todo += kids
    except OSError:  # no CONFIG_PROC_CHILDREN, or a task exiting under us
        try:
            return {p.pid: p for p in psutil.Process().children(recursive=True)}
        except psutil.Error:
            return {}
    found = {}
    for pid in pids:
        try:
            found[pid] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests run on request only (``-m slow``, or any ``-m`` naming it),
    as the marker's help says; a plain run skips them."""
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    rep = yield
    if rep.when == "call":
        item.stash[_failed_key] = rep.failed
    return rep


_failed_key = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    shm_before = _shm()
    fds_before = _fds()
    kids_before = _children()
    yield
    problems = []

    kids = {pid: p for pid, p in _children().items() if pid not in kids_before}
    if kids:
        descr = []
        for p in kids.values():
            try:
                descr.append(f"{p.pid} {' '.join(p.cmdline())[:120]!r} ({p.status()})")
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                descr.append(f"{p.pid} (gone)")
        psutil.wait_procs(list(kids.values()), timeout=5)
        problems.append("child processes left running (killed): " + "; ".join(descr))

    new_shm = _shm() - shm_before
    if new_shm:  # (children are dead by now: what is still held is someone else's)
        new_shm -= _foreign_holders(new_shm)
    if new_shm:
        problems.append(f"/dev/shm entries left behind: {sorted(new_shm)}")

    if not request.node.stash.get(_failed_key, False):
        after = _fds()
        leaked = {
            fd: t for fd, t in after.items() if fds_before.get(fd) != t and not _tolerated_fd(t)
        }
        if leaked:
            problems.append(f"file descriptors left open: {leaked}")

    if problems:
        pytest.fail("test leaked OS resources:\n  " + "\n  ".join(problems), pytrace=False)
