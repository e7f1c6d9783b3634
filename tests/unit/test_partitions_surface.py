"""The partitions package's floor plan, checked: public surfaces, no reach-ins,
devices that do not know each other, an hv that knows no partition."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = ROOT / "partitions"
#: The CLI's modules (another part of the house; not checked here).
CLI = {"cli.py", "launcher.py", "liveview.py", "ringdemo.py"}
#: Private names still imported across modules, each with its owner's fix.
KNOWN_REACH_INS: set[tuple[str, str, str]] = set()


def _modules() -> list[Path]:
    return sorted(p for p in PARTITIONS.rglob("*.py")
                  if p.parent != PARTITIONS or p.name not in CLI)


def _dotted(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of each import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text())
    pkg = _dotted(path) if path.name == "__init__.py" else _dotted(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            out.append((base, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_declares_real_public_names(path: Path) -> None:
    if path.name == "__main__.py" or path == PARTITIONS / "__init__.py" or (
            path.name == "__init__.py" and "__all__" not in path.read_text()):
        pytest.skip("an entry point or a namespace package")
    mod = importlib.import_module(_dotted(path))
    names = getattr(mod, "__all__", None)
    assert names is not None, f"{path}: no __all__"
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{path}: __all__ names what is not there: {missing}"


def test_no_module_imports_another_modules_private_names() -> None:
    found = set()
    for path in _modules():
        for module, names in _imports(path):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and not module.endswith("_cffi"):
                    found.add((str(path.relative_to(ROOT)), module, n))
    assert found <= KNOWN_REACH_INS, sorted(found - KNOWN_REACH_INS)


def test_devices_do_not_import_each_other() -> None:
    devices = PARTITIONS / "devices"
    folders = {p.name for p in devices.iterdir() if (p / "__init__.py").exists()}
    for folder in folders:
        for path in (devices / folder).rglob("*.py"):
            for module, _ in _imports(path):
                parts = module.split(".")
                if parts[:2] == ["partitions", "devices"] and len(parts) > 2:
                    assert parts[2] in (folder, "framework"), \
                        f"{path.relative_to(ROOT)} imports {module}"


def test_hv_imports_nothing_of_partitions_or_vmbus() -> None:
    for path in (ROOT / "hv").rglob("*.py"):
        for module, _ in _imports(path):
            assert module.split(".")[0] not in ("partitions", "vmbus"), \
                f"{path.relative_to(ROOT)} imports {module}"


def test_the_runtime_knows_no_feature() -> None:
    text = (PARTITIONS / "runtime.py").read_text()
    for word in ("storvsc", "dynmem", "VmbusHost", "VmbusGuest", "StorageHost",
                 "StorageGuest", ".grants", ".storage", "role =="):
        assert word not in text, word
