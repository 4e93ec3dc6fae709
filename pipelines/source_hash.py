"""Hash of a module's source and of the project modules it imports: the code behind a cached base model.

A base model cached by `pipelines.pretrain` is keyed by the code that builds it. Hashing the factory's file alone
misses an edit to a helper it imports (a user's layers module, the molecule model's `tfft.projection`): the old
weights would load into new code. `source_hash` follows the import statements (read with ``ast``, nothing is
executed) from the factory's file to every module that resolves to a source file inside the project's roots,
and hashes those files' contents in a stable order. Installed packages (torch, numpy, anything under a
``site-packages`` folder) are not followed: their versions are part of the environment, not of the model.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path

__all__ = ["import_closure", "source_hash"]


def _imported_names(path: Path, package: str) -> set[str]:
    """Absolute module names that ``path``'s import statements may load (``from a import b``: a and a.b)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                    else node.module or ""
            except (ImportError, ValueError):
                continue
            if base:
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _origin(name: str) -> Path | None:
    """The source file of module ``name``, or None (not found, not a .py file, or its lookup fails)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).resolve()


def _inside(path: Path, roots: list[Path]) -> bool:
    if "site-packages" in path.parts or "dist-packages" in path.parts:
        return False
    return any(path.is_relative_to(root) for root in roots)


def import_closure(module: str, roots: list[Path]) -> list[Path]:
    """Source files of ``module`` and of every module it imports, directly or through others, that lie under
    one of ``roots`` (sorted). A module whose file cannot be found contributes nothing."""
    roots = [Path(r).resolve() for r in roots]
    start = _origin(module)
    if start is None:
        return []
    seen: dict[Path, str] = {start: module}
    queue = [(start, module)]
    while queue:
        path, name = queue.pop()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in sorted(_imported_names(path, package)):
            origin = _origin(imported)
            if origin is not None and origin not in seen and _inside(origin, roots):
                seen[origin] = imported
                queue.append((origin, imported))
    return sorted(seen)


def source_hash(module: str, roots: list[Path]) -> str:
    """sha256 (16 hex digits) over the relative paths and contents of `import_closure(module, roots)`; "" when
    the module's file cannot be found."""
    roots = [Path(r).resolve() for r in roots]
    digest = hashlib.sha256()
    files = import_closure(module, roots)
    for path in files:
        root = next((r for r in roots if path.is_relative_to(r)), path.parent)  # the module itself may lie outside
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16] if files else ""
