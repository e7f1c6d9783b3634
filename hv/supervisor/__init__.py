"""The supervisor: the process that plays the hypervisor for one cluster.

Layer: hv.  ``viridian up`` starts it (``python -m hv.supervisor --cluster NAME
--config FILE``); it starts the root partition, then, once the root runs, every
child, each as its own process (``python -m partitions.root`` /
``partitions.child``) holding a socketpair made for exactly that partition
(hv/link.py).  It watches them and serves the control socket (hv/control.py).

It stays thin: one thread, one ``selectors`` loop over

- a **pidfd** per partition (``os.pidfd_open``): readable the moment the
  process exits, kill -9 included; reaped with ``waitid(P_PIDFD)``, so there
  is no SIGCHLD handler and no pid-reuse race;
- each partition's **link** (hv/link.py): boot, hello, memory reports,
  hypercalls (routed by hv/services.py), and its SynIC's EOM eventfd;
- the **control socket** and its client connections;
- a wakeup socket for SIGTERM/SIGINT (``signal.set_wakeup_fd``);

and a timer heap (boot timeout, stop timeout, restart backoff).  With no
timer armed it sleeps in ``epoll_wait`` with no timeout: an idle cluster costs
no CPU.  It never carries channel data.

Modules:

- ``partition``: what the supervisor knows of each partition
  (``Partition``, ``PartitionState``);
- ``lifecycle``: ``Supervisor``, the process and its loop: spawning
  partitions, their links, exits, restarts and stops, the cluster's stop,
  and ``main`` (what ``python -m hv.supervisor`` runs, ``__main__``);
- ``requests``: the control socket: connections, requests, status, traces,
  and the answers to Dynamic Memory requests (``ControlRequests``, which
  ``Supervisor`` inherits).

Trust: partitions are untrusted (every frame and report is checked on
arrival); control-socket clients are the cluster's owner (the socket is
0600), but their requests are still validated, field by field.
"""

from __future__ import annotations

from .lifecycle import Supervisor, main
from .partition import Partition, PartitionState
from .requests import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Partition", "PartitionState", "Supervisor", "main"]
