"""Content hash of the code a computation runs: the given frugalflow modules and, transitively, every
frugalflow module they import (at module level or inside a function; a package's `__init__` with
each of its modules), read from the source files. Stage keys hash their method's code this way
(tasks/compress.py) and evaluation keys the evaluation's (frugalflow/evaluate/suite.py), so an edit
elsewhere in the library reuses their cached outputs and an edit of the code they run does not."""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "frugalflow"
ROOT = Path(__file__).resolve().parent


def _source(name: str, root: Path) -> Path | None:
    """The file of module `name` (frugalflow.x.y) under the package folder `root`, or None."""
    base = root.joinpath(*name.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _imported(name: str, path: Path) -> set[str]:
    """The frugalflow modules (and names that may be modules) `path` imports anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if _ours(alias.name)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if _ours(module):
                found.add(module)
                found |= {f"{module}.{alias.name}" for alias in node.names}  # `from frugalflow.x import y`: y may be a module
    return found


def modules_used(*names: str, root: Path = ROOT) -> list[str]:
    """`names` and every frugalflow module they reach through imports, with the packages above each."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen or (path := _source(name, root)) is None:
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += parents + sorted(_imported(name, path))
    return sorted(seen)


@lru_cache(maxsize=64)
def _hash(names: tuple[str, ...], root: Path) -> str:
    digest = hashlib.sha256()
    for name in modules_used(*names, root=root):
        digest.update(name.encode() + b"\0" + _source(name, root).read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def code_hash(*names: str, root: Path = ROOT) -> str:
    """12 hex digits over the source of `modules_used(*names)` (cached per process: code does not change
    under a running process)."""
    return _hash(tuple(sorted(names)), Path(root).resolve())
