"""cffi builder for vmbus._ring_cffi (API mode, out of line).

setup.py names this file in ``cffi_modules``; it is never imported at run time.
The cdef is the part of vmbus_ring.h between the "cdef begin" and "cdef end"
markers, so declarations live in exactly one place and API mode turns any
mismatch with the real header into a build error.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def _cdef() -> str:
    text = (HERE / "vmbus_ring.h").read_text()
    start = text.index("/* cdef begin */") + len("/* cdef begin */")
    end = text.index("/* cdef end */")
    return text[start:end]


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "vmbus._ring_cffi",
    '#include "vmbus_ring.h"',
    # Relative paths: setuptools refuses absolute ones in an sdist build.
    sources=[os.path.relpath(HERE / "vmbus_ring.c")],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
