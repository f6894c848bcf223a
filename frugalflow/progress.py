"""Progress bars for long loops (layers, distillation steps, evaluation windows): a rich bar on
stderr when stderr is a terminal, nothing otherwise, so logs keep only their own lines.

    bar = ProgressBar("evaluate candidate: windows")
    perplexity(model, windows, on_progress=bar)   # any (done, total) callback site
    bar.close()                                   # also closed when done reaches total
"""
from __future__ import annotations

import os
import sys
from typing import TextIO


def shown(stream: TextIO | None = None) -> bool:
    """True when `stream` (default stderr) is a terminal and FRUGALFLOW_PROGRESS is not `off`."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("FRUGALFLOW_PROGRESS", "auto") != "off"


class ProgressBar:
    """A (done, total) callback drawing one transient rich bar; a no-op where bars are not shown
    (`force` overrides the terminal check)."""

    def __init__(self, description: str, stream: TextIO | None = None, force: bool | None = None):
        self.description = description
        self.stream = sys.stderr if stream is None else stream
        self.active = shown(self.stream) if force is None else force
        self._progress = None
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        if not self.active:
            return
        if self._progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(file=self.stream, force_terminal=True)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=total)
        self._progress.update(self._task, completed=done, total=total)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
