"""Process and host helpers shared by the supervisor and every partition process.

Layer: hv (lowest Python layer).  Nothing here knows about VMBus.
"""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["die_with_parent", "host_available"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies
    (kill -9 included), and exit at once if the parent is already gone.

    Call it first thing in a child process.  Linux only.
    """
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def host_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (what the host can still give)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
