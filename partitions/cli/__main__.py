"""``python -m partitions.cli``: the ``viridian`` command."""

from . import main

main()
