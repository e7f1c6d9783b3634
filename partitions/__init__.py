"""Partitions: the processes a cluster runs and the ``viridian`` command.

Layer: partitions, the top (it imports vmbus and hv; neither imports it).
Inside it, imports point one way (pyproject.toml's import contracts,
docs/architecture.md):

- ``cli``: the ``viridian`` command (the administrator's side);
- ``root``, ``child``: each role's composition root (``__main__``), the only
  code that knows which features a role has, and its VMBus end;
- ``devices``: one folder per device (echo, Dynamic Memory, storage), on a
  common framework;
- ``reporting``: channel status keys and trace events, shared by both VMBus ends;
- ``runtime``: the partition process, which knows no role and no feature;
- ``guestmem``: a child's page allocator over its guest memory.
"""

__all__: list[str] = []
