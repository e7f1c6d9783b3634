# Only what cffi cannot declare in pyproject.toml (cffi has no declarative form).
from setuptools import setup

setup(cffi_modules=["csrc/build_ring.py:ffibuilder"])
