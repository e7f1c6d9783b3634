"""The C extension as built: it imports, it is the ABI vmbus/ring.py expects,
it is an API-mode (compiled) cffi module, and its source compiles cleanly."""

from __future__ import annotations

import importlib.machinery
import shutil
import subprocess
import sys
from pathlib import Path

import _cffi_backend
import pytest

import vmbus.ring
from hv.abi import PAGE_SIZE
from vmbus import _ring_cffi

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def test_abi_stamp_matches() -> None:
    assert _ring_cffi.lib.VMBR_ABI_VERSION == vmbus.ring.ABI_VERSION


def test_the_c_page_is_the_abi_page() -> None:
    # the C ring keeps its own VMBR_PAGE_BYTES; Python's page size is hv.abi's
    assert _ring_cffi.lib.VMBR_PAGE_BYTES == vmbus.ring.PAGE_BYTES == PAGE_SIZE


def test_module_is_api_mode_compiled_extension() -> None:
    # API mode: an extension module with the C functions linked in, not a
    # dlopen()ed library described at run time (ABI mode).
    assert _ring_cffi.__file__ is not None
    assert _ring_cffi.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert isinstance(_ring_cffi.ffi, _cffi_backend.FFI)
    assert type(_ring_cffi.lib).__name__ == "Lib"  # ABI mode gives a FFILibrary
    assert type(_ring_cffi.lib.vmbr_write).__name__ == "builtin_function_or_method"
    assert _ring_cffi.ffi.sizeof("struct vmbr_ring") >= 64


def test_layout_constants_match_the_spec() -> None:
    lib = _ring_cffi.lib
    assert (
        lib.VMBR_OFF_WRITE_INDEX,
        lib.VMBR_OFF_READ_INDEX,
        lib.VMBR_OFF_INTERRUPT_MASK,
        lib.VMBR_OFF_PENDING_SEND_SZ,
        lib.VMBR_OFF_FEATURE_BITS,
    ) == (0, 4, 8, 0xC, 0x40)
    assert (lib.VMBR_CONTROL_BYTES, lib.VMBR_DESC_BYTES, lib.VMBR_TRAILER_BYTES) == (4096, 16, 8)
    assert lib.VMBR_MAX_PACKET_BYTES == 65535 * 8
    assert (
        lib.VMBR_PKT_DATA_INBAND,
        lib.VMBR_PKT_DATA_USING_XFER_PAGES,
        lib.VMBR_PKT_DATA_USING_GPA_DIRECT,
        lib.VMBR_PKT_COMP,
    ) == (6, 7, 9, 0xB)
    assert lib.VMBR_FEAT_PENDING_SEND_SZ == 1 and lib.VMBR_FLAG_COMPLETION_REQUESTED == 1


@pytest.mark.multiprocess
def test_imports_from_outside_the_source_tree(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", "import vmbus.ring as r; print(r.lib.VMBR_ABI_VERSION)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == vmbus.ring.ABI_VERSION


@pytest.mark.multiprocess
@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_c_source_compiles_without_warnings(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            "gcc",
            "-std=c11",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
            str(CSRC),
            "-c",
            str(CSRC / "vmbus_ring.c"),
            "-o",
            str(tmp_path / "vmbus_ring.o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert (tmp_path / "vmbus_ring.o").stat().st_size > 0
