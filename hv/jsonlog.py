"""JSON-lines logs: one object per line, appended with one write() per record.

Layer: hv.  Used by the supervisor and by every partition process for the files
in ``RUN/logs/`` (hv/rundir.py).  A record is ``{"t": <unix time>, "level":
..., <context>, "event": ..., <fields>}``.  Each record is a single
``O_APPEND`` write, so the supervisor and a partition can both append to a
partition's file, and a record survives kill -9 of its writer.  Deliberately
smaller than ``logging``: partitions start in tens of milliseconds.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

__all__ = ["JsonLog"]


class JsonLog:
    """Appends records to ``path`` (None: a log that drops everything)."""

    def __init__(self, path: str | os.PathLike[str] | None, **context: Any) -> None:
        self.path = os.fspath(path) if path else None
        self._fd = (os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                    if path else -1)
        self.context = context

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        if self._fd < 0:
            return
        rec = {"t": round(time.time(), 6), "level": level, **self.context, "event": event,
               **fields}
        try:
            os.write(self._fd, json.dumps(rec, default=str).encode() + b"\n")
        except OSError:
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
