"""The files a recipe's path or glob pattern names (corpora, named evaluation sets), for the stages
that read them and the checks that they exist."""
from __future__ import annotations

import glob
from pathlib import Path


def matching_files(pattern: str, root: str | Path = ".") -> list[Path]:
    """The files `pattern` names (relative to `root` unless absolute; ** recurses)."""
    full = pattern if Path(pattern).is_absolute() else str(Path(root) / pattern)
    return [Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file()]
