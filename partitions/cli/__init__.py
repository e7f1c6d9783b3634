"""The ``viridian`` command line: the administrator's side of a cluster.

Layer: partitions.cli, the top of the stack.  It reaches a running cluster
only through hv.control (the control socket), hv.rundir (the run directory)
and hv.config (the cluster's configuration); it never imports a partition's
or a device's code.

- ``commands``: the click commands (``viridian up``, ``demo``, ``status``...)
- ``launcher``: starting, watching and stopping a cluster's supervisor
- ``views``: the tables and lines that show a cluster (status, live view, trace)
- ``demo``: ``viridian demo``'s workloads and live loop
- ``ringdemo``: ``viridian ringdemo``, one ring between two processes
- ``format``: the one set of formatters
"""

from .commands import main

__all__ = ["main"]
