"""`pipelines.source_hash`: the import closure of a module inside the project's roots, and its hash."""

from __future__ import annotations

from pathlib import Path

from pipelines.source_hash import import_closure, source_hash


def _package(root: Path, name: str) -> Path:
    """A package ``name`` (a name per test: Python caches a package's folder once imported)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "a.py").write_text(f"import torch\nimport numpy as np\nfrom . import b\nfrom {name}.c import VALUE\n")
    (folder / "b.py").write_text("from .d import *\n")
    (folder / "c.py").write_text("VALUE = 1\n")
    (folder / "d.py").write_text("X = 2\n")
    (folder / "unused.py").write_text("Y = 3\n")
    return folder


def test_the_closure_follows_project_imports_only(tmp_path, import_path):
    _package(tmp_path, "proj_one")
    import_path(tmp_path)
    names = [p.name for p in import_closure("proj_one.a", [tmp_path])]
    # `from . import b` (the package itself and b), `from proj_one.c import`, b's `from .d import *`; not unused.py
    assert names == ["__init__.py", "a.py", "b.py", "c.py", "d.py"]
    assert not any("torch" in str(p) for p in import_closure("proj_one.a", [tmp_path]))  # installed: not followed
    assert import_closure("proj_one.missing", [tmp_path]) == [] and source_hash("proj_one.missing", [tmp_path]) == ""


def test_the_hash_changes_with_a_transitive_import_and_not_with_an_unused_module(tmp_path, import_path):
    folder = _package(tmp_path, "proj_two")
    import_path(tmp_path)
    before = source_hash("proj_two.a", [tmp_path])
    assert len(before) == 16 and source_hash("proj_two.a", [tmp_path]) == before
    (folder / "unused.py").write_text("Y = 4\n")
    assert source_hash("proj_two.a", [tmp_path]) == before
    (folder / "d.py").write_text("X = 5\n")
    assert source_hash("proj_two.a", [tmp_path]) != before
