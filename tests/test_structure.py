"""The package's plan, checked: subpackages import only those below them, no module is over 400
lines and no function over 60, and Python keeps no lists of dataset or method names (conf/ does)."""

import ast
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "tadfkd"
# lowest first; a subpackage may import those before it (data and models share a floor)
LAYERS = [
    {"base"},
    {"data", "models"},
    {"teachers"},
    {"distillation"},
    {"run"},
    {"analysis"},
    {"bench"},
]
FLOOR = {name: floor for floor, names in enumerate(LAYERS) for name in names}
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def subpackage(path: Path) -> str | None:
    """The subpackage a module belongs to, or None for an entry module at tadfkd/'s top."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def imported_subpackages(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            if node.module == "tadfkd":
                names = [f"tadfkd.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tadfkd" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_belongs_to_a_known_subpackage_or_is_an_entry_point():
    entry_points = {"__init__.py", "train_teacher.py", "report.py"}
    for path in MODULES:
        package = subpackage(path)
        assert package in FLOOR or (package is None and path.name in entry_points), path


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_subpackage_imports_only_the_floors_below_it(path):
    package = subpackage(path)
    if package is None:  # entry modules may import anything but each other
        return
    above = {
        name
        for name in imported_subpackages(ast.parse(path.read_text()))
        if name in FLOOR and FLOOR[name] > FLOOR[package]
    }
    assert not above, f"{path} imports {sorted(above)}, above {package}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_are_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path} is over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, (
                f"{path}:{node.lineno} {node.name} is {length} lines"
            )


def option_names(group: str) -> set[str]:
    return {path.stem for path in (ROOT / "conf" / group).glob("*.yaml")}


def string_literals(tree: ast.AST) -> set[str]:
    """The string constants of a module, docstrings left out."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if node.body and isinstance(node.body[0], ast.Expr):
                value = node.body[0].value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    docstrings.add(id(value))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    }


@pytest.mark.parametrize("group", ["dataset", "method"])
def test_python_names_no_dataset_or_method(group):
    # "tadfkd" is also the package's and the W&B project's name; the benchmark's settings and the
    # bad-input battery are command lines, like the tests
    names = option_names(group) - {"tadfkd"}
    assert names, group
    for path in MODULES:
        if subpackage(path) == "bench":
            continue
        found = names & string_literals(ast.parse(path.read_text()))
        assert not found, (
            f"{path} names the {group} option(s) {sorted(found)}: they belong in conf/"
        )
