"""The root partition process (``python -m partitions.root``); see partitions/runtime.py."""

__all__: list[str] = []
