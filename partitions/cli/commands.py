"""The ``viridian`` command line.

Layer: partitions.cli (the top).  Heavy imports (rich, the ring) happen inside the
commands, so ``viridian --help`` and status queries start fast.

Exit codes: 0 ok; 1 failed (one line on stderr: what, why, hint); 2 usage;
3 no such cluster or partition.
"""

from __future__ import annotations

import sys
import time

import click

from .format import fmt_bytes, fmt_size, fmt_uptime

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_NOT_FOUND = 3


def _parse_sizes(text: str) -> tuple[int, ...]:
    units = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1024, "m": 1 << 20, "mib": 1 << 20}
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        num = p.rstrip("kmib")
        unit = p[len(num) :]
        if not num.isdigit() or unit not in units:
            raise click.BadParameter(f"{part!r} is not a size like 64, 1K or 64KiB")
        out.append(int(num) * units[unit])
    return tuple(out)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="viridian")
def main() -> None:
    """Viridian: Hyper-V's VMBus, emulated with processes and shared memory."""


@main.command()
@click.option(
    "--seconds",
    default=1.5,
    show_default=True,
    type=click.FloatRange(0.1, 60),
    help="How long to stream each message size.",
)
@click.option(
    "--sizes",
    default="64,1K,16K,64K",
    show_default=True,
    help="Message sizes to stream, comma-separated (binary units).",
)
def ringdemo(seconds: float, sizes: str) -> None:
    """Stream packets between two processes through one VMBus ring (no cluster)."""
    from rich.console import Console
    from rich.table import Table

    from hv.abi import PAGE_SIZE

    from . import ringdemo as ring

    size_list = _parse_sizes(sizes)
    console = Console()
    console.print(
        f"[bold]viridian ringdemo[/]: a producer (this process) and a consumer process share "
        f"one VMBus ring ({(ring.RING_BYTES - PAGE_SIZE) >> 20} MiB of data, a memfd) and two "
        "eventfd doorbells."
    )
    t_start = time.perf_counter()
    status = console.status("starting the consumer process ...")
    status.start()

    def progress(size: int, elapsed: float, packets: int) -> None:
        status.update(
            f"streaming {fmt_size(size)} packets: {packets / elapsed / 1e6:6.2f} M msgs/s, "
            f"{packets * size / elapsed / 1e9:6.2f} GB/s"
        )

    try:
        results = ring.run(size_list, seconds, progress)
    except KeyboardInterrupt:
        status.stop()
        console.print("interrupted; consumer stopped, ring released")
        sys.exit(130)
    except (TimeoutError, RuntimeError) as e:
        status.stop()
        click.echo(f"viridian ringdemo: failed: {e}", err=True)
        sys.exit(EXIT_FAILED)
    status.stop()

    table = Table(title="one VMBus ring, two processes")
    table.add_column("message", justify="right")
    table.add_column("msgs/s", justify="right")
    table.add_column("MB/s", justify="right")
    table.add_column("packets", justify="right")
    table.add_column("verified")
    for r in results:
        table.add_row(
            fmt_size(r.size),
            f"{r.msgs_per_s / 1e6:.2f} M",
            f"{r.bytes_per_s / 1e6:,.0f}",
            f"{r.packets:,}",
            "[green]✓[/]" if r.verified else f"[red]✗ {r.bad_packets} bad[/]",
        )
    console.print(table)
    console.print(
        f"stopped in {time.perf_counter() - t_start:.1f} s; consumer exited, "
        "ring memory and doorbells closed (memfd/eventfd: nothing in /dev/shm)."
    )
    console.print(
        "next: [bold]python -m pytest benchmarks[/] measures the ring against the alternatives."
    )
    if not all(r.verified for r in results):
        sys.exit(EXIT_FAILED)


# -- the cluster ------------------------------------------------------------------------------

CLUSTER_HELP = "The cluster's name (several can run side by side)."


def _check_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from hv.rundir import NAME_RE

    if not NAME_RE.match(value):
        raise click.BadParameter(
            f"{value!r}: use 1-32 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit")
    return value


def _cluster_option(f):  # type: ignore[no-untyped-def]
    return click.option("--name", "-n", "cluster", default="default", show_default=True,
                        callback=_check_name, help=CLUSTER_HELP)(f)


def _fail(cmd: str, e: Exception, code: int = EXIT_FAILED) -> None:
    click.echo(f"viridian {cmd}: {e}", err=True)
    sys.exit(getattr(e, "exit_code", code))


def _rundir(cluster: str):  # type: ignore[no-untyped-def]
    from hv.rundir import RunDir

    return RunDir(cluster)


def _load_config(cmd: str, config_path: str | None):  # type: ignore[no-untyped-def]
    """The cluster config (a file, or the embedded default), checked against this machine."""
    import os

    from hv.config import ConfigError, default_config, load_config

    try:
        cfg = load_config(config_path) if config_path else default_config()
    except ConfigError as e:
        _fail(cmd, f"bad config: {e}")
    ncpus = len(os.sched_getaffinity(0))
    reserved = sum(p.cpu.reserve for p in cfg.partitions)
    if reserved > 100 * ncpus:
        _fail(cmd, f"bad config: {config_path or '<embedded default>'}: partition.cpu.reserve: "
              f"the reserves add up to {reserved:g} % but this machine has {ncpus} CPUs "
              f"({100 * ncpus} %)")
    return cfg


_CONFIG_HELP = ("A TOML cluster config (default: the embedded one; see `viridian config "
                "default`).")


@main.command()
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
              help=_CONFIG_HELP)
@_cluster_option
@click.option("--detach", "-d", is_flag=True,
              help="Return once every partition runs; the cluster keeps running.")
def up(config_path: str | None, cluster: str, detach: bool) -> None:
    """Start a cluster: the supervisor, the root partition, then the children."""
    import signal

    # Foreground: a Ctrl+C or SIGTERM during start-up only counts (into hits),
    # so the start is never cut in half; the cluster then stops at once.
    hits: list[int] | None = None if detach else []
    cfg, rd, out, res = _start("up", config_path, cluster, detach, hits)
    out.line(f"cluster [bold]{cluster}[/] running: {res.partitions} partitions in "
             f"{res.seconds:.2f} s (supervisor pid {res.supervisor_pid})")
    out.line(f"run dir: {rd.path}")
    flag = "" if cluster == "default" else f" --name {cluster}"
    if detach:
        out.line(f"next: [bold]viridian status{flag}[/] · [bold]viridian partition kill "
                 f"{cfg.children[0].name if cfg.children else cfg.root.name}{flag}[/] · "
                 f"[bold]viridian down{flag}[/]")
        return

    # Foreground: follow events until Ctrl-C / SIGTERM, then stop cleanly.
    assert res.client is not None and res.proc is not None
    out.line(f"running in the foreground: [bold]Ctrl+C[/] stops it; "
             f"[bold]viridian status{flag}[/] in another shell")

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    stopped_elsewhere = False
    try:
        signal.signal(signal.SIGINT, interrupt)  # even if started with SIGINT ignored (`&`)
        signal.signal(signal.SIGTERM, interrupt)
        if hits:
            raise KeyboardInterrupt  # (the signal came during start-up)
        for ev in res.client.events(None):
            if ev.get("event") == "stopped":
                stopped_elsewhere = True
                break
            if ev.get("event") != "state":
                continue
            st, name = ev["state"], ev["name"]
            if st == "crashed":
                from .launcher import exit_text

                out.step(False, name, f"crashed ({exit_text(ev)})")
            elif st == "restarting":
                out.step(None, name, f"restarting in {ev.get('backoff_s', 0):.1f} s")
            elif st == "running":
                out.step(True, name, f"running, pid {ev['pid']} (restarts {ev['restarts']})",
                         ev.get("boot_s"))
            elif st == "stopped" and ev.get("exited_pid"):
                out.step(True, name, "stopped")
        else:
            stopped_elsewhere = True
    except KeyboardInterrupt:
        pass
    stop = _stop_foreground(rd, res, out, stopped_elsewhere, hits or [])
    out.line(_stopped_line(res.partitions, stop))
    if stop.left:
        sys.exit(EXIT_FAILED)


def _start(cmd: str, config_path: str | None, cluster: str, detach: bool,
           hits: list[int] | None = None):  # type: ignore[no-untyped-def]
    """Start a cluster for ``up`` or ``demo``: load the config, say what starts, start it.

    With ``hits``, SIGINT and SIGTERM only count from before the start: a
    Ctrl+C then cannot leave a cluster half-made.

    Returns:
        (config, RunDir, launcher.Reporter, launcher.StartResult).
    """
    from hv.config import dump_toml

    from .launcher import CliError, Reporter, start_cluster

    cfg = _load_config(cmd, config_path)
    rd = _rundir(cluster)
    out = Reporter()
    if hits is not None:
        _count_signals(hits)
    source = config_path or "the embedded default config"
    out.line(f"[bold]viridian {cmd}[/]: cluster [bold]{cluster}[/], {len(cfg.partitions)} "
             f"partitions from {source}")
    try:
        res = start_cluster(rd, dump_toml(cfg), len(cfg.partitions), detach, out)
    except CliError as e:
        _fail(cmd, e)
    return cfg, rd, out, res


def _count_signals(hits: list[int]) -> None:
    """From now on SIGINT and SIGTERM only count (into ``hits``): no exception
    can cut a stop, or a start, in half."""
    import signal

    signal.signal(signal.SIGINT, lambda *_: hits.append(1))
    signal.signal(signal.SIGTERM, lambda *_: hits.append(1))


def _stop_foreground(rd, res, out, stopped_elsewhere: bool, hits: list[int]):  # type: ignore[no-untyped-def]
    """Stop a cluster this process started in the foreground (``up``, ``demo``).

    Gracefully (children, then the root, then the supervisor); one more
    Ctrl+C or SIGTERM (``hits`` growing) forces it.  Then reap the supervisor
    and check, with ``down``'s check, that nothing is left (what is, is
    swept and named in the result).

    Returns:
        launcher.StopResult.
    """
    import subprocess

    from .launcher import stop_cluster

    _count_signals(hits)
    seen = len(hits)
    if stopped_elsewhere:
        res.client.close()
        out.line("the cluster was stopped from elsewhere")
        stop = stop_cluster(rd, out, quiet=True)
    else:
        out.line("Gracefully stopping... (press Ctrl+C again to force)")
        stop = stop_cluster(rd, out, force_check=lambda: len(hits) > seen, client=res.client)
    try:
        res.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        res.proc.kill()
        res.proc.wait(timeout=5)
    return stop


def _stopped_line(partitions: int, stop) -> str:  # type: ignore[no-untyped-def]
    """The line users learn to trust: ``stopped 3 partitions in 0.4 s; 0 processes, ... left``."""
    from .launcher import describe_cleanup

    return (f"stopped {partitions} partitions in {stop.seconds:.1f} s; "
            f"{describe_cleanup(stop.left)} left")


@main.command()
@click.option("--seconds", default=20.0, show_default=True, type=click.FloatRange(0, None),
              help="How long to stream; 0: until Ctrl+C.")
@click.option("--size", "size_text", default="1K", show_default=True,
              help="Echo payload bytes (binary units: 64, 1K, 64K; at most 64K).")
@click.option("--window", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Echo requests each child keeps in flight.")
@click.option("--name", "-n", "cluster", default="demo", show_default=True,
              callback=_check_name, help=CLUSTER_HELP)
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
              help=_CONFIG_HELP)
def demo(seconds: float, size_text: str, window: int, cluster: str,
         config_path: str | None) -> None:
    """Run a cluster and stream echo requests through every child's VMBus channel, live.

    Each child with a Dynamic Memory channel also allocates and frees memory
    in bursts, so the root's balancer hot-adds and balloons: the view shows
    each partition's memory over the last minute.  Each child with a disk
    reads random 4 KiB blocks in a short bench about once a second: the view
    shows the disks side by side (child1's synthetic SCSI over VMBus, child2's
    emulated IDE whose every register access traps), with their rates.

    The cluster (the embedded default: a root and two children) belongs to this
    command: it stops when the demo ends, after --seconds or at Ctrl+C, and a
    summary and a leftover check follow.  `viridian ringdemo` is the older demo
    of one ring between two processes, without a cluster.
    """
    from .demo import Demo, DemoOptions

    sizes = _parse_sizes(size_text)
    if len(sizes) != 1 or not 1 <= sizes[0] <= 65536:
        raise click.BadParameter(f"{size_text!r}: one size from 1 to 64K", param_hint="--size")
    hits: list[int] = []  # Ctrl+C during start-up: start, then stop at once (nothing half-made)
    _cfg, rd, out, res = _start("demo", config_path, cluster, False, hits)
    assert res.client is not None and res.proc is not None
    show = Demo(rd.control_socket, res.client, DemoOptions(seconds, sizes[0], window), hits,
                out.console, logs_dir=rd.logs)
    outcome = "interrupted"
    try:
        if not hits:
            out.line(f"run dir: {rd.path}")
            out.line(f"streaming {fmt_size(sizes[0])} echo requests, window {window}, through "
                     "every child's VMBus channel to the root, "
                     + (f"for {seconds:g} s (Ctrl+C ends it sooner)" if seconds
                        else "until Ctrl+C"))
            outcome = show.run()
        show.finish()
    finally:
        stop = _stop_foreground(rd, res, out, outcome == "stopped", hits)
    for heading, summary, if_empty in (
            ("summary (each child's end of its channel; packets and bytes count both "
             "directions):", show.summary_lines, "no echo stream ran"),
            ("dynamic memory (each child's DM channel; assigned: the least and most seen):",
             show.memory_summary_lines, None),
            ("disks (the demo's random 4 KiB reads, as the root counted them; benches "
             "timed by each child):", show.disk_summary_lines, None)):
        lines = summary()
        if lines:
            out.line(heading)
            for line in lines:
                out.console.print(line, markup=False, soft_wrap=True)
        elif if_empty:
            out.line(if_empty)
    out.line(_stopped_line(res.partitions, stop))
    if stop.left:
        sys.exit(EXIT_FAILED)
    if outcome == "stopped":
        click.echo("viridian demo: the cluster was stopped before the demo ended", err=True)
        sys.exit(EXIT_FAILED)
    corrupt, mismatches = show.corrupt_pages(), show.mismatches()
    if corrupt:
        click.echo(f"viridian demo: {corrupt} memory pages came back changed "
                   "across hot-adds and balloons", err=True)
        sys.exit(EXIT_FAILED)
    if mismatches:
        click.echo(f"viridian demo: {mismatches} echoes came back different from what "
                   "was sent", err=True)
        sys.exit(EXIT_FAILED)
    out.line("next: [bold]viridian up -d[/] keeps a cluster running · [bold]viridian trace "
             "root[/] shows its VMBus traffic · [bold]viridian status[/] its channels")


@main.command()
@_cluster_option
def down(cluster: str) -> None:
    """Stop a cluster: children first, then the root, then the supervisor.

    Idempotent: a cluster that is not running is fine (and one whose supervisor
    died is cleaned up).
    """
    from .launcher import Reporter, describe_cleanup, stop_cluster

    rd = _rundir(cluster)
    out = Reporter()
    sup = rd.supervisor()
    if sup is not None:
        out.line(f"[bold]viridian down[/]: stopping cluster [bold]{cluster}[/] "
                 f"(supervisor pid {sup.pid})")
    res = stop_cluster(rd, out)
    if not res.was_running:
        if res.left:
            out.line(f"cluster {cluster!r} was not running (its supervisor had died); "
                     f"cleaned up {describe_cleanup(res.left)}")
        else:
            out.line(f"cluster {cluster!r} is not running; nothing to stop")
        return
    out.line(f"stopped {res.partitions} partitions in {res.seconds:.1f} s; "
             f"{res.left.counts()} left")
    if res.left:
        click.echo(f"viridian down: left behind and now removed: {res.left.describe()}",
                   err=True)
        sys.exit(EXIT_FAILED)


@main.command()
@_cluster_option
@click.option("--json", "as_json", is_flag=True, help="The status as JSON "
              "(docs/status-schema.md).")
def status(cluster: str, as_json: bool) -> None:
    """Show a cluster's partitions (state, PID, CPU, memory, uptime, restarts), channels, disks."""
    import json

    from .launcher import CliError, request

    rd = _rundir(cluster)
    try:
        st = request(rd, "status")["status"]
    except CliError as e:
        _fail("status", e)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    _print_status(st)


@main.command()
@click.argument("partition_name", metavar="PARTITION")
@_cluster_option
@click.option("--count", "-c", type=click.IntRange(1, None),
              help="Stop after this many events.")
@click.option("--json", "as_json", is_flag=True,
              help="The raw event objects, one JSON object per line.")
def trace(partition_name: str, cluster: str, count: int | None, as_json: bool) -> None:
    """Print a partition's VMBus control messages and packet headers as they happen.

    One line per event, like tcpdump: time, PARTITION, `>` (sent) or `<`
    (received) or `-` (happened there), the peer, then the decoded message
    or the packet header.  Ctrl+C stops; stderr then says how many events
    were shown and how many the partition dropped (it sends at most 150 per
    50 ms).  PARTITION is a name or an id (the root is 0); a partition that
    restarts is traced again once it runs.
    """
    import json
    import os
    import signal

    from hv.control import ControlError

    from .format import clean
    from .launcher import CliError, cli_error, connect
    from .views import trace_line

    rd = _rundir(cluster)
    try:
        client = connect(rd)
    except CliError as e:
        _fail("trace", e)
    try:
        ans = client.request("trace", name=partition_name)
    except ControlError as e:
        client.close()
        _fail("trace", cli_error(e))
    except TimeoutError as e:
        client.close()
        _fail("trace", CliError(str(e), EXIT_FAILED))
    pname = clean(ans.get("name", partition_name), 32)
    click.echo(f"viridian trace: tracing {pname} ({clean(ans.get('state', '?'))}) in cluster "
               f"{cluster}; Ctrl+C stops", err=True)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    shown = dropped = 0
    ended = ""
    try:
        for ev in client.events(None):
            if ev.get("event") != "trace":
                continue
            n = ev.get("dropped")
            dropped += n if isinstance(n, int) and n > 0 else 0
            items = ev.get("events")
            lines = []
            for item in items if isinstance(items, list) else []:
                if count is not None and shown >= count:
                    break
                if isinstance(item, dict):
                    lines.append(json.dumps(item) if as_json else trace_line(pname, item))
                    shown += 1
            if ev.get("exited"):
                now = time.time()
                lines.append(json.dumps({"exited": True, "t": round(now, 6)}) if as_json else
                             f"{time.strftime('%H:%M:%S', time.localtime(now))}"
                             f".{int(now % 1 * 1e6):06d} {pname:<6} - exited (traced again "
                             "once it runs)")
            if lines:
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()
            if count is not None and shown >= count:
                break
        else:
            ended = ("the cluster stopped" if rd.supervisor() is None
                     else "the supervisor ended the trace: this reader fell behind")
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `viridian trace root | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        client.close()
    click.echo(f"viridian trace: {shown} events shown, {dropped} dropped by {pname}"
               + (f" ({ended})" if ended else ""), err=True)


def _print_status(st: dict) -> None:  # type: ignore[type-arg]
    from rich import box
    from rich.console import Console
    from rich.table import Table


    colours = {"running": "green", "starting": "yellow", "restarting": "yellow",
               "stopping": "yellow", "crashed": "red", "stopped": "dim"}
    # Fits 80 columns: 9 columns of at most 67 characters, one space apart.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  show_edge=False, title_justify="left",
                  title=f"cluster [bold]{st['cluster']}[/] · supervisor pid "
                  f"{st['supervisor_pid']} · up {fmt_uptime(st['uptime_s'])}")
    for col, just, width in (("ID", "right", 2), ("Name", "left", 12), ("State", "left", 10),
                             ("PID", "right", 7), ("CPU %", "right", 5),
                             ("Memory", "right", 8), ("Visible", "right", 8),
                             ("Uptime", "right", 7), ("Restarts", "right", 8)):
        table.add_column(col, justify=just, no_wrap=True,  # type: ignore[arg-type]
                         max_width=width, overflow="ellipsis")
    for p in st["partitions"]:
        mem = p["memory"]
        c = colours.get(p["state"], "")
        table.add_row(
            str(p["id"]), p["name"], f"[{c}]{p['state']}[/]", str(p["pid"] or "-"),
            f"{p['cpu']['usage_percent']:.1f}" if p["pid"] else "-",
            fmt_bytes(mem["assigned_bytes"]) if mem["assigned_bytes"] else "-",
            fmt_bytes(mem["guest_visible_bytes"]) if mem["guest_visible_bytes"] else "-",
            fmt_uptime(p["uptime_s"]) if p["pid"] else "-", str(p["restarts"]))
    console = Console(highlight=False)
    console.print(table)
    console.print("ID 0 is the root; Memory: assigned, Visible: what the partition reports")
    broke = [f"{p['name']} {p['vmbus_errors']:,}" for p in st["partitions"]
             if isinstance(p.get("vmbus_errors"), int) and p["vmbus_errors"] > 0]
    if broke:
        console.print("[yellow]VMBus protocol errors[/] (the root's log has the first 20 "
                      f"per child): {', '.join(broke)}")
    from .views import CHANNEL_LEGEND, DISK_LEGEND, channel_tables, disk_tables

    chans = channel_tables(st)
    for t in chans:
        console.print()
        console.print(t)
    if chans:
        console.print(CHANNEL_LEGEND)
    disks = disk_tables(st)
    for t in disks:
        console.print()
        console.print(t)
    if disks:
        console.print(DISK_LEGEND)
    console.print(f"run dir: {st['run_dir']}", overflow="fold")


@main.group()
def partition() -> None:
    """Act on one partition of a running cluster (by name, or id; the root is 0)."""


def _partition_op(op: str, verb: str):  # type: ignore[no-untyped-def]
    @partition.command(op, help=f"{verb.capitalize()} a partition.")
    @click.argument("partition_name", metavar="NAME")
    @_cluster_option
    def cmd(partition_name: str, cluster: str) -> None:
        from .launcher import CliError, Reporter, wait_partition

        try:
            ans, ev, secs = wait_partition(_rundir(cluster), op, partition_name)
        except CliError as e:
            _fail(f"partition {op}", e)
        out = Reporter()
        name = ans["name"]
        if op == "kill":
            out.step(True, name, "killed (SIGKILL); it stays stopped", secs)
            out.line(f"next: [bold]viridian partition start {name}[/] starts it again")
        elif op == "stop":
            out.step(True, name, "stopped", secs)
        else:
            out.step(True, name, f"running, pid {ev['pid']}", secs)

    return cmd


for _op, _verb in (("start", "start"), ("stop", "gracefully stop"),
                   ("restart", "stop, then start"), ("kill", "kill -9 (turn off)")):
    _partition_op(_op, _verb)


@partition.command("set")
@click.argument("partition_name", metavar="NAME")
@click.option("--cpu-weight", type=click.IntRange(1, 10000), help="Relative share, 1-10000.")
@click.option("--cpu-limit", type=click.FloatRange(0, 100, min_open=True),
              help="Cap, % of one CPU (0-100].")
@click.option("--cpu-reserve", type=click.FloatRange(0, 100), help="Floor, % of one CPU.")
@_cluster_option
def partition_set(partition_name: str, cpu_weight: int | None, cpu_limit: float | None,
                  cpu_reserve: float | None, cluster: str) -> None:
    """Change a running partition's CPU weight, limit or reserve (applies at once)."""
    from .launcher import CliError, Reporter, request

    args = {k: v for k, v in (("cpu_weight", cpu_weight), ("cpu_limit", cpu_limit),
                              ("cpu_reserve", cpu_reserve)) if v is not None}
    if not args:
        raise click.UsageError("give at least one of --cpu-weight, --cpu-limit, --cpu-reserve")
    try:
        ans = request(_rundir(cluster), "partition.set", name=partition_name, **args)
    except CliError as e:
        _fail("partition set", e)
    c = ans["cpu"]
    Reporter().step(True, ans["name"], f"cpu weight {c['weight']}, limit "
                    f"{c['limit_percent']:g} %, reserve {c['reserve_percent']:g} %")


# -- dynamic memory ---------------------------------------------------------------------------

MEMORY_TIMEOUT_S = 20.0  # memory.add / memory.balloon answer when the guest did (up to ~15 s)


class _SizeType(click.ParamType):
    """A size like 128M or 1G (binary units, whole 4 KiB pages): hv.config's parser."""

    name = "SIZE"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        from hv.config import parse_size

        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = _SizeType()


class _PartitionOrCommand(click.Group):
    """A group whose first argument is a subcommand or a partition name.

    ``viridian memory child1`` runs the hidden ``show`` command;
    ``viridian memory add child1 128M`` runs ``add``.  The first positional
    token decides (``--name X`` and ``--json`` may come before it); a
    partition named like a subcommand is shown with ``memory show NAME``.
    """

    default_command = "show"
    _TAKES_VALUE = ("--name", "-n")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                i += 1
                break
            if a in self._TAKES_VALUE:
                i += 2
                continue
            if not a.startswith("-") or a == "-":
                break
            i += 1
        if i < len(args):
            if args[i] in self.commands:  # options before the subcommand go after it
                args = [args[i], *args[:i], *args[i + 1 :]]
            else:
                args = [self.default_command, *args]
        elif args and not any(a in ("-h", "--help") for a in args):
            args = [self.default_command, *args]  # options only: show says what is missing
        return super().parse_args(ctx, args)


@main.group(cls=_PartitionOrCommand, subcommand_metavar="PARTITION | COMMAND [ARGS]...")
def memory() -> None:
    """Show or change a partition's memory (Dynamic Memory: hot-add, balloon, limits).

    `viridian memory [--name CLUSTER] [--json] PARTITION` shows it: assigned,
    visible, demand, pressure, ballooned, resident, the limits, buffer, weight,
    and whether the root's balancer moves it (dynamic).  PARTITION is a name
    or an id (the root is 0).  Sizes are binary: 128M, 1G.
    """


def _memory_partition(st: dict, ref: str) -> dict | None:  # type: ignore[type-arg]
    for p in st["partitions"]:
        if p["name"] == ref or (ref.isdigit() and p["id"] == int(ref)):
            return p  # type: ignore[no-any-return]
    return None


@memory.command("show", hidden=True)
@click.argument("partition_name", metavar="PARTITION")
@_cluster_option
@click.option("--json", "as_json", is_flag=True,
              help="The partition's raw `memory` object (docs/status-schema.md).")
def memory_show(partition_name: str, cluster: str, as_json: bool) -> None:
    """Show a partition's memory: assigned, visible, demand, limits, balancer settings."""
    import json

    from .launcher import CliError, request

    try:
        st = request(_rundir(cluster), "status")["status"]
    except CliError as e:
        _fail("memory", e)
    p = _memory_partition(st, partition_name)
    if p is None:
        _fail("memory", CliError(f"no such partition: {partition_name}", EXIT_NOT_FOUND))
    if as_json:
        click.echo(json.dumps(p["memory"], indent=2))
        return
    _print_memory(p)


def _print_memory(p: dict) -> None:  # type: ignore[type-arg]
    from rich.console import Console
    from rich.markup import escape


    m = p["memory"]

    def size(key: str) -> str:
        v = m.get(key)
        return fmt_bytes(v) if isinstance(v, int) and not isinstance(v, bool) else "-"

    pressure = m.get("pressure_percent")
    rows = [
        ("assigned", f"{size('assigned_bytes')}  [dim](the supervisor's accounting)[/]"),
        ("visible", f"{size('guest_visible_bytes')}  [dim](what the partition reports)[/]"),
        ("demand", size("demand_bytes") + (f"  [dim](pressure {pressure:g} %)[/]" if isinstance(
            pressure, (int, float)) and not isinstance(pressure, bool) else "")),
        ("ballooned", size("ballooned_bytes")),
        ("resident", f"{size('resident_bytes')}  [dim](pages the kernel holds for it)[/]"),
        ("limits", f"startup {size('startup_bytes')} · minimum {size('minimum_bytes')} · "
                   f"maximum {size('maximum_bytes')}"),
        ("buffer", f"{m.get('buffer_percent', '-')} %"),
        ("weight", str(m.get("weight", "-"))),
        ("dynamic", "[green]on[/]  [dim](the root's balancer adds and balloons by demand)[/]"
         if m.get("dynamic") else "off  [dim](memory moves by `viridian memory add/balloon`)[/]"),
    ]
    dm = next((c for c in p.get("channels", []) if isinstance(c, dict)
               and c.get("class") == "dynmem" and "child" not in c), None)
    if dm is not None:
        d = dm.get("device") if isinstance(dm.get("device"), dict) else {}
        rows.append(("DM channel", escape(
            f"relid {dm.get('relid')} {dm.get('state')}"
            + (f" ({d.get('state')}): " + ", ".join(
                f"{d.get(k, 0)} {what}{'' if d.get(k, 0) == 1 else 's'}"
                for k, what in (("hot_adds", "hot-add"), ("balloons", "balloon"),
                                ("corrupt_pages", "corrupt page"))) if d else ""))))
    console = Console(highlight=False)
    console.print(f"[bold]{escape(p['name'])}[/] (id {p['id']}, {p['role']}, {p['state']})")
    for key, value in rows:
        console.print(f"  [bold]{key:<10}[/] {value}", soft_wrap=True)


def _memory_change(cmd: str, op: str, partition_name: str, nbytes: int, cluster: str) -> None:
    """memory.add / memory.balloon: one operation through the child's DM channel."""
    from .launcher import CliError, Reporter, request

    t0 = time.monotonic()
    try:
        ans = request(_rundir(cluster), op, timeout=MEMORY_TIMEOUT_S, name=partition_name,
                      bytes=nbytes)
    except CliError as e:
        _fail(cmd, e)
    except TimeoutError:
        _fail(cmd, CliError(f"no answer from the supervisor within {MEMORY_TIMEOUT_S:g} s"))
    except OSError as e:
        _fail(cmd, CliError(f"lost the supervisor: {e}"))
    except KeyboardInterrupt:
        _fail(cmd, CliError("interrupted: the operation may still complete (see `viridian "
                            f"memory {partition_name}`)", 130))
    ms = ans.get("ms")
    took = ms if isinstance(ms, (int, float)) else (time.monotonic() - t0) * 1000
    verb = "hot-added" if op == "memory.add" else "ballooned"
    pages = ans.get("pages")
    out = Reporter()
    out.console.print(f"  [green]✓[/] {ans['name']:<12.12} {verb} {fmt_bytes(nbytes)}"
                      + (f" ({pages} pages)" if isinstance(pages, int) else "")
                      + f" in {took:.1f} ms: {fmt_bytes(ans['assigned_bytes'])} assigned",
                      soft_wrap=True)
    if ans.get("note"):
        out.console.print(f"  note: {ans['note']}", markup=False, soft_wrap=True)


@memory.command("add")
@click.argument("partition_name", metavar="PARTITION")
@click.argument("nbytes", metavar="SIZE", type=SIZE)
@_cluster_option
def memory_add(partition_name: str, nbytes: int, cluster: str) -> None:
    """Hot-add SIZE (128M, 1G) to a running child through its Dynamic Memory channel.

    Answers when the guest took the memory, with the new assigned size and how
    long it took; refused (exit 1, with the reason) above the child's maximum,
    without enough host memory, or when the guest refuses.
    """
    _memory_change("memory add", "memory.add", partition_name, nbytes, cluster)


@memory.command("balloon")
@click.argument("partition_name", metavar="PARTITION")
@click.argument("nbytes", metavar="SIZE", type=SIZE)
@_cluster_option
def memory_balloon(partition_name: str, nbytes: int, cluster: str) -> None:
    """Take SIZE back from a running child (its free pages go back to the host).

    Refused (exit 1, with the reason) below the child's minimum or when the
    guest does not give the pages.
    """
    _memory_change("memory balloon", "memory.balloon", partition_name, nbytes, cluster)


@memory.command("set")
@click.argument("partition_name", metavar="PARTITION")
@click.option("--min", "minimum", type=SIZE, help="Minimum: balloons never go below.")
@click.option("--max", "maximum", type=SIZE, help="Maximum: hot-adds never go above.")
@click.option("--buffer", type=click.IntRange(5, 2000),
              help="% of demand the balancer keeps free on top, 5-2000.")
@click.option("--weight", type=click.IntRange(0, 10000),
              help="Who gets memory first when the host is short, 0-10000.")
@click.option("--dynamic/--static", default=None,
              help="Whether the root's balancer moves this partition's memory by demand.")
@_cluster_option
def memory_set(partition_name: str, minimum: int | None, maximum: int | None,
               buffer: int | None, weight: int | None, dynamic: bool | None,
               cluster: str) -> None:
    """Change a partition's memory limits and balancer settings (applies at once)."""
    from .launcher import CliError, Reporter, request

    args = {k: v for k, v in (("minimum", minimum), ("maximum", maximum), ("buffer", buffer),
                              ("weight", weight), ("dynamic", dynamic)) if v is not None}
    if not args:
        raise click.UsageError("give at least one of --min, --max, --buffer, --weight, "
                               "--dynamic/--static")
    try:
        ans = request(_rundir(cluster), "memory.set", name=partition_name, **args)
    except CliError as e:
        _fail("memory set", e)
    m = ans["memory"]
    Reporter().console.print(
        f"  [green]✓[/] {ans['name']:<12.12} minimum {fmt_bytes(m['minimum_bytes'])}, "
        f"maximum {fmt_bytes(m['maximum_bytes'])}, buffer {m['buffer_percent']} %, "
        f"weight {m['weight']}, dynamic {'on' if m['dynamic'] else 'off'}", soft_wrap=True)


@main.group()
def config() -> None:
    """Cluster configuration files."""


@config.command("default")
def config_default() -> None:
    """Print the embedded default cluster as TOML (`viridian up --config` reads it back)."""
    from hv.config import DEFAULT_CONFIG_TOML

    click.echo(DEFAULT_CONFIG_TOML, nl=False)

