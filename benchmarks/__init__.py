"""Viridian's benchmark suite (issue 2 §8): run with ``python -m pytest benchmarks``.

See benchmarks/README.md.  A package so that worker processes started with
multiprocessing's "spawn" can import ``benchmarks.transports``.
"""
