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


# cffi's API mode drops and retakes the GIL around every C call: ~30 ns, a
# fifth of a 64-byte write.  The ring's calls are bounded copies and checks
# that never block (the longest, a 1 MiB drain, takes ~20 us; Python's own
# switch interval is 5 ms), so this module keeps the GIL, except in the waits'
# spins (another thread of the process may be the peer, or simply have work,
# while we wait) and in the unmask, whose membarrier(2) can take ~11 us here.
# The latency reads (vmbr_spin_read_io, vmbr_spin_read_payload_io) keep it
# too: retaking it after the packet came is on the round trip's critical path
# (~70 ns of ~0.9 us, measured), and their spin is bounded by io_spin_ns
# (20 us by default); a peer that is a thread of the same process gets the GIL
# when the spin gives up and the read blocks in poll().  Only this glue (cffi's
# generated wrappers) touches the Python API; csrc/ stays free of it.
GLUE = """
#include "vmbus_ring.h"
#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#define Py_END_ALLOW_THREADS }
/* (PyGILState_Check: the same calls reached through ffi.addressof come
 * without the GIL, cffi's generic call path having released it already.) */
#define VIRIDIAN_NOGIL(call) \\
    __extension__({ int _held = PyGILState_Check(); \\
                    PyThreadState *_ts = _held ? PyEval_SaveThread() : NULL; \\
                    int64_t _rc = (call); \\
                    if (_held) PyEval_RestoreThread(_ts); \\
                    _rc; })
#define vmbr_spin_readable(r, ns) VIRIDIAN_NOGIL((vmbr_spin_readable)(r, ns))
#define vmbr_unmask_interrupts(r) VIRIDIAN_NOGIL((vmbr_unmask_interrupts)(r))
#define vmbr_spin_writable(r, need, ns) VIRIDIAN_NOGIL((vmbr_spin_writable)(r, need, ns))
"""

ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "vmbus._ring_cffi",
    GLUE,
    # Relative paths: setuptools refuses absolute ones in an sdist build.
    sources=[os.path.relpath(HERE / "vmbus_ring.c")],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
