"""What ``viridian up`` / ``down`` / ``partition ...`` do, below the click layer.

Layer: partitions.  Starting a cluster: validate the config, take the
cluster's lock (a second ``up`` of the same name fails here), sweep what a
crashed run left, write the config into the run directory, start
``python -m hv.supervisor`` in its own session with the lock fd and a
readiness pipe, then follow its event stream (hv/control.py ``watch``) and
print one line per partition as it comes up.  Stopping: ask for ``stop``,
print a line per partition as it stops, wait for the supervisor to exit, then
check that nothing is left (hv/rundir.py ``leftovers``) and say so in one line.

Every wait here has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hv.control import ControlClient, ControlError
from hv.rundir import Leftovers, Manifest, RunDir

from .format import fmt_bytes

__all__ = ["CliError", "Reporter", "start_cluster", "stop_cluster", "wait_partition"]

EXIT_FAILED = 1
EXIT_NOT_FOUND = 3
READY_TIMEOUT_S = 15.0
STOP_DEADLINE_S = 20.0
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class CliError(Exception):
    """One line for stderr, and the exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Reporter:
    """Prints the step lines (``✓ name  detail  0.12 s``) through rich."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False)

    def step(self, ok: bool | None, name: str, detail: str, seconds: float | None = None) -> None:
        glyph = {True: "[green]✓[/]", False: "[red]✗[/]", None: "[yellow]•[/]"}[ok]
        took = f"{seconds:6.2f} s" if seconds is not None else ""
        self.console.print(f"  {glyph} {name:<12.12} {detail:<48.48} {took}".rstrip())

    def line(self, text: str) -> None:
        self.console.print(text)


def exit_text(ev: dict[str, Any]) -> str:
    ex = ev.get("exit") or {}
    if ex.get("signal_name"):
        return f"killed by {ex['signal_name']}"
    if ex.get("code") is not None:
        return f"exit status {ex['code']}"
    return str(ev.get("error", "exited"))


def _cluster_missing(rd: RunDir) -> CliError:
    if rd.is_stale():
        return CliError(f"no such cluster: {rd.cluster!r} is not running (its supervisor died; "
                        f"`viridian up --name {rd.cluster}` cleans up and starts it again)",
                        EXIT_NOT_FOUND)
    return CliError(f"no such cluster: {rd.cluster!r} is not running "
                    f"(start it with `viridian up --name {rd.cluster}`)", EXIT_NOT_FOUND)


def connect(rd: RunDir, timeout: float = 5.0) -> ControlClient:
    """A control client of a running cluster.

    Raises:
        CliError: exit 3 when the cluster is not running.
    """
    if rd.supervisor() is None:
        raise _cluster_missing(rd)
    try:
        return ControlClient(rd.control_socket, timeout)
    except ControlError:
        raise _cluster_missing(rd) from None


def cli_error(e: ControlError) -> CliError:
    """A supervisor's refusal as the CLI reports it: exit 3 for a cluster or
    partition that is not there, 1 otherwise."""
    return CliError(str(e), EXIT_NOT_FOUND if e.code == "not_found" else EXIT_FAILED)


def request(rd: RunDir, op: str, *, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """One control request; maps protocol errors to CLI errors and exit codes."""
    with connect(rd, timeout) as c:
        try:
            return c.request(op, **args)
        except ControlError as e:
            raise cli_error(e) from None


def describe_cleanup(found: Leftovers) -> str:
    return found.counts() + (f" ({found.describe()})" if found else "")


# -- up ------------------------------------------------------------------------------------


@dataclass
class StartResult:
    seconds: float
    supervisor_pid: int
    partitions: int
    proc: subprocess.Popen[bytes] | None = None
    client: ControlClient | None = None
    states: dict[str, str] = field(default_factory=dict)


def start_cluster(rd: RunDir, config_toml: str, partitions: int, detach: bool,
                  out: Reporter, timeout: float | None = None) -> StartResult:
    """Start the supervisor and wait until every partition runs.

    Args:
        rd: the cluster's run directory.
        config_toml: the validated configuration, as TOML.
        partitions: how many partitions the config has (for the deadline).
        detach: run the supervisor in the background (it outlives this process);
            else it is tied to this process (it stops when this process dies).
        out: where the step lines go.
        timeout: the start-up deadline; default 10 s + 0.25 s per partition.

    Returns:
        the result; in foreground mode ``proc`` is the supervisor to reap and
        ``client`` a control connection that already follows events.

    Raises:
        CliError: already running, the supervisor failed, or a partition did
            not come up (the cluster is then stopped again).
    """
    t0 = time.monotonic()
    rd.create()
    try:
        lock_fd = rd.lock()
    except BlockingIOError:
        sup = rd.supervisor()
        who = f" (supervisor pid {sup.pid})" if sup else ""
        raise CliError(f"cluster {rd.cluster!r} is already running{who}; "
                       f"`viridian down --name {rd.cluster}` stops it") from None
    try:
        if rd.is_stale():
            found = rd.sweep()
            out.line(f"cleaned up a crashed run of {rd.cluster}: removed {found.counts()}")
            if found:
                out.line(f"  ({found.describe()}; its logs are in logs.prev/)")
        rd.create()
        rd.config_file.write_text(config_toml)
        r, w = os.pipe2(os.O_CLOEXEC)
        err = os.open(rd.logs / "supervisor.stderr",
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        argv = [sys.executable, "-m", "hv.supervisor", "--cluster", rd.cluster,
                "--config", str(rd.config_file), "--ready-fd", str(w), "--lock-fd", str(lock_fd),
                "--daemon" if detach else "--attached"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (_PROJECT_ROOT, env.get("PYTHONPATH")) if x)
        try:
            proc = subprocess.Popen(argv, pass_fds=(w, lock_fd), stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err, start_new_session=True, env=env)
        finally:
            os.close(w)
            os.close(err)
    finally:
        os.close(lock_fd)  # the supervisor holds the lock now (same open file description)
    try:
        ready = _read_ready(r, READY_TIMEOUT_S)
    finally:
        os.close(r)
    if detach:
        proc.wait(timeout=READY_TIMEOUT_S)  # the --daemon parent exits at once
    if not ready.get("ok"):
        if not detach:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        msg = ready.get("error") or _stderr_tail(rd)
        raise CliError(f"the supervisor did not start: {msg}")
    sup_pid = int(ready["pid"])
    out.step(True, "supervisor", f"pid {sup_pid}", time.monotonic() - t0)

    client = ControlClient(rd.control_socket, timeout=5.0)
    deadline = t0 + (timeout if timeout is not None else 10.0 + 0.25 * partitions)
    states: dict[str, str] = {}
    try:
        snap = client.watch()
        pending = {p["name"] for p in snap["partitions"]}
        for p in snap["partitions"]:
            states[p["name"]] = p["state"]
            if p["state"] == "running":
                pending.discard(p["name"])
                out.step(True, p["name"], f"pid {p['pid']}, "
                         f"{fmt_bytes(p['memory']['guest_visible_bytes'])} visible", p["boot_s"])
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CliError(f"{len(pending)} partitions not running after "
                               f"{time.monotonic() - t0:.1f} s: {', '.join(sorted(pending))}")
            ev = next(client.events(left), None)
            if ev is None:
                raise CliError("the supervisor exited during start-up: " + _stderr_tail(rd))
            if ev.get("event") != "state":
                continue
            name, state = ev["name"], ev["state"]
            states[name] = state
            if state == "running":
                pending.discard(name)
                out.step(True, name, f"pid {ev['pid']}, "
                         f"{fmt_bytes(ev.get('guest_visible_bytes'))} visible", ev.get("boot_s"))
            elif state == "crashed":
                out.step(False, name, f"crashed at boot ({exit_text(ev)}); see "
                         f"{rd.logs / (name + '.stderr')}")
                if ev.get("error") or (ev.get("restarts", 0) == 0
                                       and snap_policy(snap, name) == "never"):
                    raise CliError(f"partition {name} failed to start ({exit_text(ev)})")
    except (CliError, TimeoutError, ControlError) as e:
        client.close()
        out.line("[red]start-up failed[/]; stopping the cluster again")
        stop_cluster(rd, out, quiet=True)
        if not detach:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        raise e if isinstance(e, CliError) else CliError(str(e)) from None
    res = StartResult(time.monotonic() - t0, sup_pid, len(states), states=states)
    if detach:
        client.close()
    else:
        res.proc, res.client = proc, client
    return res


def snap_policy(snap: dict[str, Any], name: str) -> str:
    return next((p.get("restart_policy", "never") for p in snap["partitions"]
                 if p["name"] == name), "never")


def _read_ready(fd: int, timeout: float) -> dict[str, Any]:
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return {"ok": False, "error": f"no answer within {timeout:.0f} s"}
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    try:
        obj = json.loads(buf.split(b"\n", 1)[0] or b"{}")
    except ValueError:
        obj = {}
    return obj if isinstance(obj, dict) and obj else {"ok": False, "error": None}


def _stderr_tail(rd: RunDir) -> str:
    try:
        lines = (rd.logs / "supervisor.stderr").read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    last = lines[-1].strip() if lines else "no output"
    return f"{last} (see {rd.logs / 'supervisor.stderr'})"


# -- down ----------------------------------------------------------------------------------


@dataclass
class StopResult:
    partitions: int
    seconds: float
    left: Leftovers
    was_running: bool = True


def stop_cluster(rd: RunDir, out: Reporter, quiet: bool = False,
                 force_check: Callable[[], bool] | None = None,
                 client: ControlClient | None = None) -> StopResult:
    """Stop a cluster gracefully, then verify (and sweep) that nothing is left.

    Args:
        rd: the cluster.
        out: where the step lines go.
        quiet: no per-partition lines.
        force_check: called while waiting; True switches to a forced stop.
        client: a connection that already follows events (foreground ``up``).

    Returns:
        what stopped and what was left (already removed).  A cluster that was
        not running, or had crashed, is swept and reported as not running.
    """
    t0 = time.monotonic()
    sup = rd.supervisor()
    if sup is None:
        if client is not None:
            client.close()
        found = rd.sweep() if rd.is_stale() else Leftovers()
        return StopResult(0, time.monotonic() - t0, found, was_running=False)
    manifest = Manifest.load(rd.manifest_file)
    pidfd = _pidfd(sup.pid)
    stopped = 0
    forced = False
    try:
        if client is None:
            client = ControlClient(rd.control_socket, timeout=5.0)
            client.watch()
        with ControlClient(rd.control_socket, timeout=5.0) as c:
            c.request("stop")
        asked = time.monotonic()
        deadline = asked + STOP_DEADLINE_S
        for ev in _events_until(client, deadline, force_check):
            if ev.get("event") == "force":
                forced = True
                with contextlib.suppress(ControlError, OSError, TimeoutError), \
                        ControlClient(rd.control_socket, timeout=2.0) as c:
                    c.request("stop", force=True)
                continue
            if ev.get("event") == "stopped":
                break
            if ev.get("event") == "state" and ev.get("exited_pid"):  # a process ended
                stopped += 1
                if not quiet:
                    how = "stopped" if ev["state"] == "stopped" else exit_text(ev)
                    out.step(ev["state"] == "stopped", ev["name"], how, time.monotonic() - asked)
    except (ControlError, TimeoutError, OSError):
        pass  # the supervisor went away or hung: the pid wait below decides
    finally:
        if client is not None:
            client.close()
    if not _wait_pidfd(pidfd, max(0.5, STOP_DEADLINE_S - (time.monotonic() - t0))):
        forced = True
        out.line(f"[red]the supervisor (pid {sup.pid}) did not exit: killing it[/]")
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _wait_pidfd(pidfd, 2.0)
    os.close(pidfd)
    if not quiet:
        out.step(True, "supervisor", "exited" + (" (forced)" if forced else ""),
                 time.monotonic() - t0)
    left = rd.leftovers(manifest)
    if left:
        rd.sweep()
    return StopResult(stopped, time.monotonic() - t0, left)


def _events_until(client: ControlClient, deadline: float,
                  force_check: Callable[[], bool] | None) -> Any:
    """Events until ``deadline``; yields ``{"event": "force"}`` once if force_check fires."""
    forced = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            ev = next(client.events(min(left, 0.2) if force_check else left), None)
        except TimeoutError:
            ev = {}
        if force_check is not None and not forced and force_check():
            forced = True
            yield {"event": "force"}
        if ev is None:
            return
        if ev:
            yield ev


def _pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)  # readable at once: gone


def _wait_pidfd(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


# -- partition ops ---------------------------------------------------------------------------


def wait_partition(rd: RunDir, op: str, name: str, timeout: float = 20.0
                   ) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Send ``partition.<op>`` and wait for its outcome.

    Returns:
        (the answer, the last event of that partition, seconds).

    Raises:
        CliError: exit 3 no such cluster or partition; exit 1 refused or timed out.
    """
    t0 = time.monotonic()
    with connect(rd) as watch:
        watch.watch()
        with connect(rd) as c:
            try:
                ans = c.request(f"partition.{op}", name=name)
            except ControlError as e:
                raise cli_error(e) from None
        target = {"start": ("running",), "restart": ("running",), "stop": ("stopped",),
                  "kill": ("stopped",)}[op]
        pname = ans["name"]
        seen_stop = op != "restart" or ans.get("state") not in ("stopping",)
        deadline = t0 + timeout
        last: dict[str, Any] = {}
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CliError(f"{pname} did not reach {target[0]} within {timeout:.0f} s "
                               f"(last state: {last.get('state', ans.get('state'))})")
            ev = next(watch.events(left), None)
            if ev is None:
                raise CliError("the supervisor exited")
            if ev.get("event") != "state" or ev.get("name") != pname:
                continue
            last = ev
            if ev["state"] in ("stopped", "crashed"):
                seen_stop = True
            if op in ("start", "restart") and ev["state"] == "crashed":
                raise CliError(f"{pname} crashed while starting ({exit_text(ev)})")
            if ev["state"] in target and seen_stop:
                return ans, ev, time.monotonic() - t0
