"""The code review's findings, kept found: checks over the package's source (STYLE.md, 'Stop these')."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mergesearch"
MODULES = sorted(PACKAGE.rglob("*.py"))
# tests and benchmarks read as the package does: they name the modules they use too
ALL_SOURCES = MODULES + sorted((PACKAGE.parent / "tests").rglob("*.py")) + sorted((PACKAGE.parent / "benchmarks").rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", ALL_SOURCES, ids=_rel)
def test_no_one_letter_alias_of_a_mergesearch_module(path):
    bad = [ast.unparse(node) for node in ast.walk(_tree(path)) if isinstance(node, (ast.Import, ast.ImportFrom))
           for alias in node.names
           if alias.asname and len(alias.asname) == 1
           and ((getattr(node, "module", None) or alias.name).startswith("mergesearch"))]
    assert not bad, f"{_rel(path)}: name the module instead of {bad}"


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_private_member_of_another_object(path):
    """`x._name` only on self or cls; a subclass calling its base's hook says why in a comment above it."""
    lines = path.read_text().splitlines()
    bad = []
    for node in ast.walk(_tree(path)):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        said_why = any(line.strip().startswith("#") for line in lines[max(0, node.lineno - 6): node.lineno - 1])
        if not said_why:
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not bad, f"{_rel(path)}: add a public method instead of {bad}"


INITS = sorted(PACKAGE.rglob("__init__.py"))


@pytest.mark.parametrize("path", INITS, ids=_rel)
def test_package_init_only_re_exports(path):
    """A docstring, imports, and the names it exports (__all__, __version__): no functions, classes or logic."""
    body = _tree(path).body
    allowed = (ast.Import, ast.ImportFrom)
    bad = [ast.unparse(node).splitlines()[0] for i, node in enumerate(body)
           if not (isinstance(node, allowed)
                   or (i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
                   or (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id in ("__all__", "__version__")
                                                             for t in node.targets)))]
    assert not bad, f"{_rel(path)} holds more than re-exports: {bad}; move it into a module of its own"


def _private_module_of_another_package(module: str, importer: Path) -> bool:
    """Whether `module` (dotted) is a `_private` module of a sub-package that `importer` is not part of."""
    parts = module.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.startswith("_") and not part.startswith("__"):
            owner = PACKAGE.parent.joinpath(*parts[:i])
            return owner not in importer.parents
    return False


@pytest.mark.parametrize("path", MODULES + sorted((PACKAGE.parent / "benchmarks").rglob("*.py")), ids=_rel)
def test_no_import_of_another_package_private_module(path):
    """A sub-package's `_module.py` is its own (Optuna's convention); other code goes through the face or a public
    module (tests may read private modules: they test them)."""
    bad = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergesearch"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("mergesearch")]
        else:
            continue
        bad += [f"line {node.lineno}: {n}" for n in names if _private_module_of_another_package(n, path)]
    assert not bad, f"{_rel(path)}: import a public module or the package's face instead of {bad}"
