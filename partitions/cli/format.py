"""The CLI's one set of formatters: counts, sizes, rates, latencies, paths.

Layer: partitions.cli (presentation).  Pure functions of plain values.

Trust: ``to_int``, ``to_num`` and ``clean`` are how every other CLI module
turns a value a partition reported (through the status object or a trace
event) into something printable: a wrong type becomes 0, None or ``?``, and
strings lose control characters and are cut short, so nothing a partition
writes can move the cursor or recolour the terminal.
"""

from __future__ import annotations

__all__ = [
    "clean",
    "fmt_bytes",
    "fmt_count",
    "fmt_iec",
    "fmt_size",
    "fmt_uptime",
    "fmt_us",
    "markup_safe",
    "plural",
    "short_path",
    "to_int",
    "to_num",
]


def to_int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def to_num(v: object) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def clean(v: object, limit: int = 40) -> str:
    """``v`` as printable text: control characters dropped, at most ``limit`` characters."""
    s = v if isinstance(v, str) else str(v)
    s = "".join(ch for ch in s if ch.isprintable())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def markup_safe(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def fmt_count(n: float) -> str:
    """A count in at most 5 characters: 987, 12.3k, 456k, 1.23M, 4.56G."""
    v, unit = float(n), ""
    for u in ("k", "M", "G", "T"):
        if abs(v) < 999.5:
            break
        v, unit = v / 1000, u
    return f"{v:.3g}{unit}" if unit else f"{v:.0f}"


def fmt_size(n: int) -> str:
    """An exact size for messages: 64 B, 1 KiB, 1536 B, 64 KiB."""
    for unit, div in (("MiB", 1 << 20), ("KiB", 1024)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def fmt_iec(n: int) -> str:
    """Bytes in IEC units without a space, at most 6 characters: 512B, 9.5KiB, 148MiB."""
    v, unit = float(n), "B"
    for u in ("KiB", "MiB", "GiB", "TiB"):
        if v < 999.5:
            break
        v, unit = v / 1024, u
    if unit == "B":
        return f"{n}B"
    return (f"{v:.1f}" if v < 9.95 else f"{v:.0f}") + unit


def plural(n: int, what: str) -> str:
    return f"{n:,} {what}" + ("" if n == 1 else "s")


def short_path(path: object, limit: int = 28) -> str:
    """A file path in at most ``limit`` characters: the home directory as ``~``,
    then, if still too long, ``…`` and as many whole trailing components as fit
    (the file name itself cut from the left when it alone is too long)."""
    import os

    s = clean(path, 4096)
    home = os.path.expanduser("~")
    if home not in ("", "/", "~") and (s == home or s.startswith(home + "/")):
        s = "~" + s[len(home):]
    if len(s) <= limit:
        return s
    parts = s.split("/")
    tail = parts[-1]
    for comp in reversed(parts[:-1]):
        if len(comp) + 1 + len(tail) + 2 > limit:
            break
        tail = f"{comp}/{tail}"
    out = "…/" + tail
    return out if len(out) <= limit else "…" + s[-(limit - 1):]


def fmt_us(us: float | None) -> str:
    """A latency: 33µs, 850µs, 1.2ms, 15ms, 1.5s."""
    if us is None or us < 0:
        return "-"
    if us < 999.5:
        return f"{us:.0f}µs"
    ms = us / 1000
    if ms < 999.5:
        return f"{ms:.1f}ms" if ms < 9.95 else f"{ms:.0f}ms"
    return f"{ms / 1000:.1f}s"


def fmt_bytes(n: int | None) -> str:
    """A size for status lines: 512 B, 1.5 KiB, 64 MiB, 2 GiB ("?" when unknown)."""
    if n is None:
        return "?"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def fmt_uptime(s: float) -> str:
    """An uptime as h:mm:ss."""
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
