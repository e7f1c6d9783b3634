"""The floor plan holds: layers point one way, no import cycles, every
package declares its public surface and no module reaches into another's
private names.

The import contracts live in pyproject.toml ([tool.importlinter]) and are
checked here with import-linter (CI also runs ``lint-imports``); the surface
rules below are this project's own, read from the source with ``ast``.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("hv", "vmbus", "partitions")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> list[pathlib.Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def declares_all(node: ast.stmt) -> bool:
    targets = (node.targets if isinstance(node, ast.Assign)
               else [node.target] if isinstance(node, ast.AnnAssign) else [])
    return any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)


def test_import_contracts_hold() -> None:
    lint = pathlib.Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (the dev extra has it)")
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " 0 broken." in r.stdout, r.stdout[-2000:]


@pytest.mark.parametrize("path", [p for p in sources() if p.name == "__init__.py"],
                         ids=module_name)
def test_every_package_declares_its_public_surface(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text())
    declared = [n for n in tree.body if declares_all(n)]
    assert declared, f"{module_name(path)} has no __all__"
    assert ast.get_docstring(tree), f"{module_name(path)} has no docstring saying what it is"


@pytest.mark.parametrize("path", sources(), ids=module_name)
def test_all_names_real_objects(path: pathlib.Path) -> None:
    name = module_name(path)
    if name.endswith("__main__"):
        return  # (importing it would run the command)
    tree = ast.parse(path.read_text())
    if not any(declares_all(n) for n in tree.body):
        return
    mod = importlib.import_module(name)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"
    assert len(set(mod.__all__)) == len(mod.__all__), f"{name}.__all__ repeats a name"


def private_reach_ins(source: str, me: str, is_package: bool = False) -> list[str]:
    """``from pkg.mod import _name`` and ``mod._name`` where pkg.mod is another
    module of this project: what module ``me`` takes of another's private names."""
    package = me if is_package else me.rpartition(".")[0]
    tree = ast.parse(source)
    ours: dict[str, str] = {}  # local alias -> the project module it names
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__") and base != me:
                    found.append(f"from {base} import {a.name}")
                ours[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    ours[a.asname or a.name.split(".")[0]] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in ours and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append(f"{node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("path", sources(), ids=module_name)
def test_no_module_reaches_into_anothers_private_names(path: pathlib.Path) -> None:
    assert private_reach_ins(path.read_text(), module_name(path),
                             path.name == "__init__.py") == []


def test_the_reach_in_check_sees_every_form() -> None:
    # (a check that cannot fail proves nothing: it must see each form)
    src = ("from vmbus.packet import _U32X2\nfrom .doorbell import _x\nimport hv.config as c\n"
           "c._y\nfrom . import ring\nring._z\nfrom .ring import _own\n")
    assert private_reach_ins(src, "vmbus.ring") == [
        "from vmbus.packet import _U32X2", "from vmbus.doorbell import _x", "c._y", "ring._z"]


def test_the_runtime_knows_no_feature() -> None:
    """The partition runtime is role-agnostic: features register with it from
    the composition roots (partitions/root/__main__.py, child/__main__.py)."""
    text = (ROOT / "partitions" / "runtime.py").read_text()
    for word in ("storvsc", "dynmem", "VmbusHost", "VmbusGuest", "StorageHost",
                 "StorageGuest", ".grants", ".storage", "role =="):
        assert word not in text, word
