"""The ``viridian`` command line.

Layer: partitions (the top).  Heavy imports (rich, the ring) happen inside the
commands, so ``viridian --help`` and status queries start fast.

Exit codes: 0 ok; 1 failed (one line on stderr: what, why, hint); 2 usage;
3 no such cluster or partition.
"""

from __future__ import annotations

import sys
import time

import click

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
def demo(seconds: float, sizes: str) -> None:
    """Stream packets between two processes through a VMBus ring and show the rate."""
    from rich.console import Console
    from rich.table import Table

    from . import ringdemo

    size_list = _parse_sizes(sizes)
    console = Console()
    console.print(
        f"[bold]viridian demo[/]: a producer (this process) and a consumer process share "
        f"one VMBus ring ({(ringdemo.RING_BYTES - 4096) >> 20} MiB of data, a memfd) and two "
        "eventfd doorbells."
    )
    t_start = time.perf_counter()
    status = console.status("starting the consumer process ...")
    status.start()

    def progress(size: int, elapsed: float, packets: int) -> None:
        status.update(
            f"streaming {_fmt_size(size)} packets: {packets / elapsed / 1e6:6.2f} M msgs/s, "
            f"{packets * size / elapsed / 1e9:6.2f} GB/s"
        )

    try:
        results = ringdemo.run(size_list, seconds, progress)
    except KeyboardInterrupt:
        status.stop()
        console.print("interrupted; consumer stopped, ring released")
        sys.exit(130)
    except (TimeoutError, RuntimeError) as e:
        status.stop()
        click.echo(f"viridian demo: failed: {e}", err=True)
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
            _fmt_size(r.size),
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


@main.command()
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
              help="A TOML cluster config (default: the embedded one; see `viridian config "
              "default`).")
@_cluster_option
@click.option("--detach", "-d", is_flag=True,
              help="Return once every partition runs; the cluster keeps running.")
def up(config_path: str | None, cluster: str, detach: bool) -> None:
    """Start a cluster: the supervisor, the root partition, then the children."""
    import signal

    from hv.config import ConfigError, default_config, dump_toml, load_config

    from .launcher import CliError, Reporter, describe_cleanup, start_cluster, stop_cluster

    try:
        cfg = load_config(config_path) if config_path else default_config()
    except ConfigError as e:
        _fail("up", f"bad config: {e}")
    import os

    ncpus = len(os.sched_getaffinity(0))
    reserved = sum(p.cpu.reserve for p in cfg.partitions)
    if reserved > 100 * ncpus:
        _fail("up", f"bad config: {config_path or '<embedded default>'}: partition.cpu.reserve: "
              f"the reserves add up to {reserved:g} % but this machine has {ncpus} CPUs "
              f"({100 * ncpus} %)")
    rd = _rundir(cluster)
    out = Reporter()
    source = config_path or "the embedded default config"
    out.line(f"[bold]viridian up[/]: cluster [bold]{cluster}[/], {len(cfg.partitions)} "
             f"partitions from {source}")
    try:
        res = start_cluster(rd, dump_toml(cfg), len(cfg.partitions), detach, out)
    except CliError as e:
        _fail("up", e)
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

    signal.signal(signal.SIGINT, interrupt)  # even if started with SIGINT ignored (a `&` job)
    signal.signal(signal.SIGTERM, interrupt)
    stopped_elsewhere = False
    try:
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
    hits: list[int] = []
    signal.signal(signal.SIGINT, lambda *_: hits.append(1))
    signal.signal(signal.SIGTERM, lambda *_: hits.append(1))
    if stopped_elsewhere:
        res.client.close()
        out.line("the cluster was stopped from elsewhere")
        stop = stop_cluster(rd, out, quiet=True)
    else:
        out.line("Gracefully stopping... (press Ctrl+C again to force)")
        stop = stop_cluster(rd, out, force_check=lambda: bool(hits), client=res.client)
    import subprocess

    try:
        res.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        res.proc.kill()
        res.proc.wait(timeout=5)
    out.line(f"stopped {res.partitions} partitions in {stop.seconds:.1f} s; "
             f"{describe_cleanup(stop.left)} left")
    if stop.left:
        sys.exit(EXIT_FAILED)


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
    """Show a cluster's partitions: state, PID, CPU, memory, uptime, restarts."""
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


def _fmt_uptime(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _print_status(st: dict) -> None:  # type: ignore[type-arg]
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from .launcher import _fmt_bytes

    colours = {"running": "green", "starting": "yellow", "restarting": "yellow",
               "stopping": "yellow", "crashed": "red", "stopped": "dim"}
    # Fits 80 columns: 9 columns of at most 67 characters, one space apart.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  show_edge=False, title_justify="left",
                  title=f"cluster [bold]{st['cluster']}[/] · supervisor pid "
                  f"{st['supervisor_pid']} · up {_fmt_uptime(st['uptime_s'])}")
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
            _fmt_bytes(mem["assigned_bytes"]) if mem["assigned_bytes"] else "-",
            _fmt_bytes(mem["guest_visible_bytes"]) if mem["guest_visible_bytes"] else "-",
            _fmt_uptime(p["uptime_s"]) if p["pid"] else "-", str(p["restarts"]))
    console = Console(highlight=False)
    console.print(table)
    console.print("ID 0 is the root; Memory: assigned, Visible: what the partition reports")
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


@main.group()
def config() -> None:
    """Cluster configuration files."""


@config.command("default")
def config_default() -> None:
    """Print the embedded default cluster as TOML (`viridian up --config` reads it back)."""
    from hv.config import DEFAULT_CONFIG_TOML

    click.echo(DEFAULT_CONFIG_TOML, nl=False)


def _fmt_size(n: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1024)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    main()
