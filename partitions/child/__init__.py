"""The child partition process (``python -m partitions.child``); see partitions/runtime.py."""

__all__: list[str] = []
