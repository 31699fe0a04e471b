"""STYLE.md's size limits, kept by a test: no module in bridged/ over 400 lines, no function over 60."""

from __future__ import annotations

import ast
from pathlib import Path

BRIDGED = Path(__file__).resolve().parent.parent / "bridged"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # from the ``def`` line to the last line of the body, docstring included

# What may stay over a limit, each with the reason. Keep it empty: split the
# code instead. An entry that is no longer over fails test_allowed_is_still_needed.
ALLOWED_MODULES: set[str] = set()
ALLOWED_FUNCTIONS: set[str] = set()


def _modules() -> list[Path]:
    return sorted(BRIDGED.rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(BRIDGED).as_posix()


def _module_lines() -> dict[str, int]:
    return {_name(path): len(path.read_text(encoding="utf-8").splitlines()) for path in _modules()}


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    """(qualified name, lines) of every function and method, nested ones too."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = prefix + node.name
            found.append((name, node.end_lineno - node.lineno + 1))
            found += _functions(node, name + ".")
        elif isinstance(node, ast.ClassDef):
            found += _functions(node, prefix + node.name + ".")
        else:
            found += _functions(node, prefix)
    return found


def _function_lines() -> dict[str, int]:
    lines = {}
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for name, count in _functions(tree):
            key = f"{_name(path)}::{name}"
            lines[key] = max(count, lines.get(key, 0))  # a name defined twice (if/else): the longer
    return lines


def test_no_module_over_the_limit():
    """Every module in bridged/ has at most 400 lines, unless allowed above."""
    over = {name: n for name, n in _module_lines().items()
            if n > MAX_MODULE_LINES and name not in ALLOWED_MODULES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them): {over}"


def test_no_function_over_the_limit():
    """Every function and method in bridged/ has at most 60 lines, unless allowed above."""
    over = {name: n for name, n in _function_lines().items()
            if n > MAX_FUNCTION_LINES and name not in ALLOWED_FUNCTIONS}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (split them): {over}"


def test_allowed_is_still_needed():
    """Each allow-list entry names a module or function that exists and is still over its limit."""
    modules, functions = _module_lines(), _function_lines()
    stale = [name for name in ALLOWED_MODULES if modules.get(name, 0) <= MAX_MODULE_LINES]
    stale += [name for name in ALLOWED_FUNCTIONS if functions.get(name, 0) <= MAX_FUNCTION_LINES]
    assert not stale, f"no longer over the limit, remove from the allow-list: {stale}"


def test_the_measure_sees_methods_and_nested_functions():
    """The function measure reaches methods and nested functions, with their full length."""
    tree = ast.parse("class A:\n    def m(self):\n        def inner():\n            pass\n        return 1\n")
    assert _functions(tree) == [("A.m", 4), ("A.m.inner", 2)]
