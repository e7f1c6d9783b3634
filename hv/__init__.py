"""The hypervisor layer: the supervisor process and the services it plays Hyper-V with.

Layer: hv, the bottom Python layer.  It imports nothing from ``vmbus`` or
``partitions`` (both may import it).  Each module belongs to one side: the
supervisor's, a partition's, or both (what the two sides say to each other).
Bottom up:

Shared by the sides:

- ``abi``: the numbers defined once: page size, hypercall and status codes,
  privilege bits, SynIC sizes, VMBus connection IDs, Viridian's limits;
- ``wire``: hypercall input/output values, byte-exact inputs, the frames a
  partition and the supervisor exchange (``Frame``, ``FrameDecoder``,
  ``FrameWriter``);
- ``link``: the socketpair made for one partition, its runtime (JSON)
  frames, and the supervisor's non-blocking end;
- ``memwire``: the MEMORY frame (``MemoryMessage``) and ``GuestMemoryError``;
- ``synic``: one partition's SynIC pages and lines, over ``eventfd`` and the
  private ``_atomic``; it still holds both ends (``SynicHost`` for the
  supervisor, ``SynicGuest`` for the partition);
- ``intercept``: trapped port I/O from a child, through the supervisor, to a
  device worker in the root; it still holds all three ends
  (``InterceptClient``, ``InterceptRoute``, ``InterceptServer``);
- ``proc``, ``jsonlog``, ``control``, ``config``, ``rundir``: process
  helpers, JSON-lines logs, the control protocol and its client, the cluster
  configuration, the run directory (shared with the ``viridian`` CLI).

The supervisor's side:

- ``memory``: each partition's guest memory as sealed memfd ranges
  (``GuestMemory``: hot-add, balloon, limits, grants to the root);
- ``router``: ``HypercallRouter``, the sans-IO permission checks and routing;
- ``cpu``: ``CpuArbiter``, weight / limit / reserve;
- ``services``: the one facade the supervisor calls for all of the above;
- ``supervisor``: the process (``lifecycle``) and its control socket
  (``requests``); ``python -m hv.supervisor``.

A partition's side:

- ``client``: ``HypercallClient``, blocking hypercalls over the link;
- ``partition_memory``: ``GuestMemoryView`` (its own memory) and the root's
  ``GrantTable``.

Public names live in the modules; importing ``hv`` imports none of them.
"""

__all__: list[str] = []
