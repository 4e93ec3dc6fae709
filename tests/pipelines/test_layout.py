"""The shape of the code: small modules, short functions, and tests that patch nothing.

Every stage and helper of the pipeline reads top to bottom (README "How a setting reaches the code"): a module
over 250 lines or a function over 60 lines (docstring included) is a sign that two concepts share it. The library
(`tfft/`) and the rewards (`rewards/`) keep functions as short and modules under 300 lines (their docstrings carry
the equations). Tests set
what they need through fixtures and arguments (``set_env``, ``import_path`` in ``tests/conftest.py``), never by
replacing code at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = {"pipelines": 250, "tfft": 300, "rewards": 300}


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(MAX_MODULE_LINES))
def test_modules_and_functions_are_small(folder):
    long_modules, long_functions = [], []
    for path in _modules(folder):
        text = path.read_text()
        name = str(path.relative_to(ROOT))
        if text.count("\n") > MAX_MODULE_LINES[folder]:
            long_modules.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_no_test_patches_code_at_run_time():
    """No pytest ``monkeypatch`` and no ``unittest.mock.patch``: the code under test is the code that ships."""
    banned = ("monkeypatch", "mock.patch", "patch.object")
    found = [f"{path.relative_to(ROOT)}: {word}" for path in _modules("tests") if path != Path(__file__)
             for word in banned if word in path.read_text()]
    assert not found, found
