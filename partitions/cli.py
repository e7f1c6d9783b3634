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


def _fmt_size(n: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1024)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    main()
