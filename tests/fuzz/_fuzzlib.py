"""What every fuzz harness shares: a byte reader, instrumented imports, ``main``.

A harness is a module ``fuzz_NAME.py`` in this folder with

* ``TestOneInput(data: bytes) -> None``: feeds ``data`` to one parser of bytes
  another partition wrote and catches only that parser's declared errors;
  anything else that escapes (another exception, an assertion of the
  harness's own invariants) is a finding;
* ``seeds() -> Iterable[bytes]``: valid inputs built with the project's own
  encoders, the starting corpus;
* optionally ``close()``: releases what the harness keeps between inputs (fds,
  files), for the pytest replay that checks for leaks.

It imports the code under test inside ``instrumented()`` and ends with
``if __name__ == "__main__": main(TestOneInput)``.  ``tests/fuzz/run.py`` runs
it under atheris (coverage-guided libFuzzer); ``tests/fuzz/test_harnesses.py``
replays its seeds and random inputs without atheris.

Inputs are decoded with ``Reader``, not atheris' FuzzedDataProvider, so that
the replay test needs no atheris and seeds can be written byte by byte: a
seed is what ``Writer`` makes from the same choices a harness reads back.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_TESTS = os.path.dirname(_HERE)
_ROOT = os.path.dirname(_TESTS)
for _p in (_ROOT, _TESTS):  # the project and tests/ringtools.py, when run as a script
    if _p not in sys.path:
        sys.path.insert(0, _p)

#: Set by run.py in the harness's environment: instrument and fuzz.
FUZZING = os.environ.get("VIRIDIAN_FUZZ") == "1"
#: The project's packages whose code atheris instruments for coverage.
PACKAGES = ["vmbus", "hv", "partitions"]


def instrumented() -> contextlib.AbstractContextManager[Any]:
    """Imports inside this block are instrumented for coverage when fuzzing.

    (Only first imports are: a harness imports every module it reaches,
    lazily imported ones included, inside the block.)"""
    if not FUZZING:
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=PACKAGES)  # type: ignore[no-any-return]


def instrument(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Instrument a function of the harness itself (its module is ``__main__``,
    not imported inside ``instrumented()``), when fuzzing."""
    if not FUZZING:
        return fn
    import atheris

    return atheris.instrument_func(fn)  # type: ignore[no-any-return]


class Reader:
    """Reads choices out of fuzz bytes; past the end every read gives 0 / b"".

    Never raises: a short input is a valid input that chose zeros."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def bytes(self, n: int) -> bytes:
        b = self.data[self.pos : self.pos + n]
        self.pos += len(b)
        return b

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.bytes(nbytes), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def below(self, n: int) -> int:
        """0 <= value < n (one byte for n <= 256, two up to 65536, else four)."""
        if n <= 1:
            return 0
        return self.uint(1 if n <= 256 else 2 if n <= 65536 else 4) % n

    def pick(self, seq: Any) -> Any:
        return seq[self.below(len(seq))]

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def chunk(self, limit: int = 255) -> bytes:
        """A length-prefixed byte string (one length byte, or two past 255)."""
        return self.bytes(self.uint(1 if limit <= 255 else 2) % (limit + 1))

    def rest(self) -> bytes:
        return self.bytes(self.left())


class Writer:
    """Makes seeds: the inverse of ``Reader`` for the same sequence of choices."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def raw(self, b: bytes) -> Writer:
        self.parts.append(bytes(b))
        return self

    def uint(self, nbytes: int, v: int) -> Writer:
        return self.raw(v.to_bytes(nbytes, "little"))

    def u8(self, v: int) -> Writer:
        return self.uint(1, v)

    def u16(self, v: int) -> Writer:
        return self.uint(2, v)

    def u32(self, v: int) -> Writer:
        return self.uint(4, v)

    def u64(self, v: int) -> Writer:
        return self.uint(8, v)

    def below(self, n: int, v: int) -> Writer:
        assert 0 <= v < n or n <= 1
        if n <= 1:
            return self
        return self.uint(1 if n <= 256 else 2 if n <= 65536 else 4, v)

    def pick(self, seq: Any, item: Any) -> Writer:
        return self.below(len(seq), list(seq).index(item))

    def flag(self, v: bool) -> Writer:
        return self.u8(int(v))

    def chunk(self, b: bytes, limit: int = 255) -> Writer:
        assert len(b) <= limit
        self.uint(1 if limit <= 255 else 2, len(b))
        return self.raw(b)

    def done(self) -> bytes:
        return b"".join(self.parts)


def u32s(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


@contextlib.contextmanager
def expect(*allowed: type[BaseException]) -> Iterator[None]:
    """Swallow exactly the declared errors of the parser under test."""
    try:
        yield
    except allowed:
        pass


def main(test_one_input: Callable[[bytes], None]) -> None:
    """Fuzz ``test_one_input`` with atheris; argv is libFuzzer's (run.py builds it).

    ``--write-seeds DIR`` instead writes the harness's seeds into DIR (one
    file each) and exits: run.py's starting corpus."""
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        _write_seeds(sys.argv[2])
        return
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def _write_seeds(folder: str) -> None:
    import hashlib

    seeds = sys.modules["__main__"].seeds
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    for data in seeds():
        with open(os.path.join(folder, hashlib.sha1(data).hexdigest()), "wb") as f:
            f.write(data)
