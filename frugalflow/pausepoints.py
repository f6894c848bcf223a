"""Named points where a test can freeze a run to kill it there (tests/test_kill.py).

Inert unless the environment variable FRUGALFLOW_TEST_PAUSE_AT names the point: then the
process writes "<point> <pid>" to the file FRUGALFLOW_TEST_PAUSE_FILE (when set) and sleeps
until it is killed. Points: `stage<i>.compute` (first progress report of stage i),
`stage<i>.step<n>` (distillation step n done, its checkpoint written), `stage<i>.save` (the
stage's output written to its temporary folder, not yet sealed), `evaluate.<label>` (first
perplexity progress of an evaluation), `register` (a model version created, no alias yet).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

ENV, FILE_ENV = "FRUGALFLOW_TEST_PAUSE_AT", "FRUGALFLOW_TEST_PAUSE_FILE"


def pause_point(name: str) -> None:
    if os.environ.get(ENV) != name:
        return
    marker = os.environ.get(FILE_ENV)
    if marker:
        Path(marker).write_text(f"{name} {os.getpid()}\n")
    while True:  # until the test sends SIGKILL
        time.sleep(60)
